//! `/metrics` as Prometheus sees it: a real Prometheus server (Debian's
//! `prometheus`) scrapes the admin API's mutual-TLS listener with a viewer's
//! client certificate, and its query API shows the request and byte
//! counters grow by what nbdcopy moved. The Unix socket serves the same
//! text.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};

use crate::harness::*;

const SIZE: u64 = 16 * MIB;

/// A process of this test, killed by pid when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        terminate_child(&mut self.0, READY_DEADLINE);
    }
}

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query that returns one sample (None while it
/// returns none, or Prometheus does not answer yet).
fn query(port: u16, promql: &str) -> Option<f64> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        c,
        "GET /api/v1/query?query={} HTTP/1.0\r\nHost: x\r\n\r\n",
        encode(promql)
    )
    .ok()?;
    let mut answer = String::new();
    c.read_to_string(&mut answer).ok()?;
    let body = answer.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let value = v["data"]["result"].get(0)?["value"][1].as_str()?;
    value.parse().ok()
}

fn scrape_config(dir: &Path, pki: &Path, admin_port: u16) -> String {
    let p = |f: &str| pki.join(f).display().to_string();
    let text = format!(
        r#"global:
  scrape_interval: 1s
scrape_configs:
  - job_name: nbdferry
    scheme: https
    tls_config:
      ca_file: {ca}
      cert_file: {cert}
      key_file: {key}
    static_configs:
      - targets: ["127.0.0.1:{admin_port}"]
"#,
        ca = p("ca-cert.pem"),
        cert = p("client-cert.pem"),
        key = p("client-key.pem"),
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn prometheus_scrapes_request_and_byte_counters_over_mutual_tls() {
    let prometheus = require_peer("prometheus");
    require_peer("nbdcopy");
    let dir = tmpdir();
    let d = dir.path();
    let pki = d.join("pki");
    run(nbdferry()
        .args(["certs", "init"])
        .arg(&pki)
        .args(["--client-name", "monitor"]));
    let img = d.join("disk.raw");
    make_empty_image(&img, SIZE);
    let cfg = d.join("nbdferry.toml");
    std::fs::write(
        &cfg,
        format!(
            "admin-listen = \"127.0.0.1:0\"\ntls-creds = \"{}\"\ntls = \"allow\"\n\
             [[admin.grant]]\nclient = \"monitor\"\nrole = \"viewer\"\n\
             [[export]]\nname = \"disk\"\npath = \"{}\"\n",
            pki.display(),
            img.display()
        ),
    )
    .unwrap();
    let state = d.join("state");
    let s = Server::serve_config(&state, &cfg).with_name("disk");
    let log = s.log_text();
    let admin_port: u16 = log
        .lines()
        .find_map(|l| l.strip_prefix("admin API on https://127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no admin API line in:\n{log}"));

    let web = free_port();
    let _prom = Spawned(
        std::process::Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                scrape_config(d, &pki, admin_port)
            ))
            .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus"),
    );
    // Scraped and healthy before any I/O: the counters start from what
    // Prometheus saw first.
    wait_until(CMD_DEADLINE, "prometheus to scrape nbdferry", || {
        query(web, r#"up{job="nbdferry"}"#) == Some(1.0)
    });

    // Write the disk full of data, then read it back.
    let data = d.join("data.raw");
    make_filled_image(&data, SIZE, 0x5a);
    run(peer("nbdcopy").arg(&data).arg(s.uri()));
    let back = d.join("back.raw");
    run(peer("nbdcopy").arg(s.uri()).arg(&back));
    assert_same_content(&data, &back);

    let at_least = |promql: &str, want: f64| {
        wait_until(CMD_DEADLINE, promql, || {
            query(web, promql).is_some_and(|v| v >= want)
        });
    };
    let size = SIZE as f64;
    at_least(r#"sum(nbdferry_written_bytes_total{export="disk"})"#, size);
    at_least(r#"sum(nbdferry_read_bytes_total{export="disk"})"#, size);
    at_least(
        r#"sum(nbdferry_requests_total{export="disk",command="write"})"#,
        1.0,
    );
    at_least(
        r#"sum(nbdferry_request_duration_seconds_count{export="disk",command="read"})"#,
        1.0,
    );
    at_least(r#"sum(nbdferry_disk_snapshots{disk="disk"})"#, 0.0);

    // The local socket serves the same text to its (admin) caller.
    let (status, text) = admin_http(&state.join("admin.sock"), "GET", "/metrics", "");
    assert_eq!(status, 200, "{text}");
    for name in [
        "# TYPE nbdferry_read_bytes_total counter",
        "# TYPE nbdferry_request_duration_seconds histogram",
        "nbdferry_connections{export=\"disk\"}",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }

    // A snapshot's gauge lives as long as the snapshot: after its deletion
    // no scrape reports it.
    let series = r#"nbdferry_snapshot_preserved_bytes{disk="disk",snapshot="s1"}"#;
    let sock = state.join("admin.sock");
    let metrics = || admin_http(&sock, "GET", "/metrics", "").1;
    let (status, body) = admin_http(
        &sock,
        "POST",
        "/v1/disks/disk/snapshots",
        r#"{"name":"s1"}"#,
    );
    assert!(status < 300, "{status} {body}");
    let text = metrics();
    assert!(text.contains(series), "{series} missing from:\n{text}");
    assert!(
        text.contains(r#"nbdferry_disk_snapshots{disk="disk"} 1"#),
        "{text}"
    );
    let (status, body) = admin_http(&sock, "DELETE", "/v1/disks/disk/snapshots/s1", "");
    assert!(status < 300, "{status} {body}");
    let text = metrics();
    assert!(
        !text.contains(series),
        "a deleted snapshot is still reported:\n{text}"
    );
    assert!(
        text.contains(r#"nbdferry_disk_snapshots{disk="disk"} 0"#),
        "{text}"
    );
    s.stop();
}
