//! What deploy/ ships, checked as an operator would use it: the systemd
//! unit and its user (systemd-analyze, systemd-sysusers), the example
//! configurations served for real, the Kubernetes manifests against the
//! Kubernetes schemas, and the two-host walkthroughs run end to end.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

/// The repository's deploy/ directory.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Where .ci/run installs the PyPI validator (it ships the schemas).
const KUBERNETES_VALIDATE: &str = "/usr/local/bin/kubernetes-validate";

/// A root for `systemd-analyze --root`: the host's system units (the
/// targets ours names), our unit, its binary and ExecReload's kill.
fn unit_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let units = root.join("usr/lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    for unit in fs::read_dir("/usr/lib/systemd/system").expect("systemd's units") {
        let unit = unit.unwrap();
        if unit.file_type().unwrap().is_file() {
            fs::copy(unit.path(), units.join(unit.file_name())).unwrap();
        }
    }
    let ours = root.join("etc/systemd/system");
    fs::create_dir_all(&ours).unwrap();
    fs::copy(
        deploy_dir().join("systemd/nbdferry.service"),
        ours.join("nbdferry.service"),
    )
    .unwrap();
    for (from, to) in [
        (
            Path::new(env!("CARGO_BIN_EXE_nbdferry")),
            "usr/bin/nbdferry",
        ),
        (Path::new("/bin/kill"), "bin/kill"),
    ] {
        let to = root.join(to);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        if fs::hard_link(from, &to).is_err() {
            fs::copy(from, &to).unwrap();
        }
    }
    root
}

#[test]
fn systemd_unit_verifies_and_scores_as_hardened() {
    require_peer("systemd-analyze");
    let dir = tmpdir();
    let root = unit_root(dir.path());
    // Documentation=man:nbdferry-serve(1) must name a page we generate.
    let man = dir.path().join("man");
    run(nbdferry().args(["manpage", "--dir"]).arg(man.join("man1")));

    let out = run_output(
        peer("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg("/etc/systemd/system/nbdferry.service")
            .env("MANPATH", &man),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    // A bad setting is only a warning: any line on stderr fails the test.
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify ({}):\n{err}",
        out.status
    );

    let out = run(peer("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(format!("--root={}", root.display()))
        .arg("nbdferry.service"));
    let score: f64 = out
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for nbdferry.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score <= 2.0, "exposure {score} (want <= 2.0):\n{out}");
}

#[test]
fn systemd_user_matches_the_container_image() {
    require_peer("systemd-sysusers");
    let dir = tmpdir();
    fs::create_dir(dir.path().join("etc")).unwrap();
    run(peer("systemd-sysusers")
        .arg(format!("--root={}", dir.path().display()))
        .arg(deploy_dir().join("systemd/nbdferry.sysusers")));
    let passwd = fs::read_to_string(dir.path().join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nbdferry:x:10809:10809:")),
        "{passwd}"
    );
    let image = fs::read_to_string(deploy_dir().join("container/Containerfile")).unwrap();
    assert!(
        image.contains("--uid 10809") && image.contains("USER 10809:10809"),
        "the image's user is not the unit's"
    );
}

/// `text` with each `(from, to)` replaced; every `from` must be there, so
/// that an edit of the example fails here instead of passing unchecked.
fn relocate(text: &str, moves: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    for (from, to) in moves {
        assert!(out.contains(from), "`{from}` not in:\n{text}");
        out = out.replace(from, to);
    }
    out
}

/// Serves `config` (an example with its paths moved under `dir`) and
/// checks the daemon is ready and serves `export` over TLS to `client`.
fn serve_example(dir: &Path, config: &str, client: &str, export: &str) {
    let cfg = dir.join("nbdferry.toml");
    fs::write(&cfg, config).unwrap();
    let s = Server::serve_config(&dir.join("state"), &cfg);
    run(nbdferry()
        .args(["health", "--ready", "--admin"])
        .arg(dir.join("state/admin.sock")));
    let creds = dir.join(format!("{client}-pki"));
    run(nbdferry()
        .args(["certs", "client"])
        .arg(dir.join("pki"))
        .arg(client)
        .arg(&creds));
    let uri = format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        s.port(),
        creds.display()
    );
    let info = run(nbdferry().args(["info", &uri]));
    assert!(info.contains(&format!("{}", 16 * MIB)), "{info}");
    s.stop();
}

fn example_images(dir: &Path, names: &[&str]) -> PathBuf {
    let images = dir.join("images");
    fs::create_dir(&images).unwrap();
    for name in names {
        make_sparse_image(&images.join(format!("{name}.raw")), 16 * MIB, 3);
    }
    run(nbdferry().args(["certs", "init"]).arg(dir.join("pki")));
    images
}

#[test]
fn example_config_of_the_systemd_unit_serves() {
    let dir = tmpdir();
    let d = dir.path();
    let images = example_images(d, &["disk1", "golden"]);
    let text = fs::read_to_string(deploy_dir().join("systemd/nbdferry.toml")).unwrap();
    let config = relocate(
        &text,
        &[
            (
                r#"listen = ["0.0.0.0:10809", "[::]:10809"]"#,
                r#"listen = ["127.0.0.1:0"]"#.into(),
            ),
            (
                "/run/nbdferry/nbd.sock",
                d.join("nbd.sock").display().to_string(),
            ),
            ("/etc/nbdferry/pki", d.join("pki").display().to_string()),
            ("0.0.0.0:10810", "127.0.0.1:0".into()),
            ("/srv/nbdferry", images.display().to_string()),
        ],
    );
    serve_example(d, &config, "backup-01", "golden");
}

#[test]
fn example_config_of_the_kubernetes_configmap_serves() {
    let dir = tmpdir();
    let d = dir.path();
    let images = example_images(d, &["disk1"]);
    let manifest = fs::read_to_string(deploy_dir().join("kubernetes/configmap.yaml")).unwrap();
    // The block scalar under `nbdferry.toml: |`, indented by four.
    let text: String = manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("nbdferry.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or_default()))
        .collect();
    let config = relocate(
        &text,
        &[
            ("0.0.0.0:10809", "127.0.0.1:0".into()),
            ("/etc/nbdferry/pki", d.join("pki").display().to_string()),
            ("0.0.0.0:10810", "127.0.0.1:0".into()),
            ("/srv/nbdferry", images.display().to_string()),
        ],
    );
    serve_example(d, &config, "nbdferry-backup", "disk1");
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    assert!(
        Path::new(KUBERNETES_VALIDATE).is_file(),
        "{KUBERNETES_VALIDATE} not found: .ci/run installs it from PyPI \
         (python3 -m venv /opt/nbdferry-ci; pip install kubernetes-validate)"
    );
    let dir = deploy_dir().join("kubernetes");
    let mut manifests: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 6, "{manifests:?}");
    let out = run_output(
        Command::new(KUBERNETES_VALIDATE)
            .args(["--strict", "--quiet"])
            .args(&manifests),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "kubernetes-validate ({}):\n{text}",
        out.status
    );
    let all: String = manifests
        .iter()
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    for kind in [
        "DaemonSet",
        "Service",
        "NetworkPolicy",
        "CronJob",
        "ConfigMap",
    ] {
        assert!(all.contains(&format!("kind: {kind}\n")), "no {kind}");
    }
    // The backup job runs the command line the backup command takes.
    let cron = fs::read_to_string(dir.join("backup-cronjob.yaml")).unwrap();
    let args: Vec<&str> = cron
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- "))
        .collect();
    assert_eq!(
        args,
        [
            "backup",
            "run",
            "--admin",
            "https://nbdferry.nbdferry.svc:10810",
            "--disk",
            "disk1",
            "--repo",
            "/repo",
            "--tls-creds",
            "/etc/nbdferry/backup-pki"
        ]
    );
}

/// Runs deploy/walkthroughs/NAME.sh (root: network namespaces) and
/// checks it got to its end.
fn walkthrough(name: &str) {
    require_peer("ip");
    let script = deploy_dir().join(format!("walkthroughs/{name}.sh"));
    let out = run(Command::new("bash")
        .arg(&script)
        .env("NBDFERRY", env!("CARGO_BIN_EXE_nbdferry")));
    assert!(
        out.contains(&format!("walkthrough passed: {name}")),
        "{out}"
    );
}

#[test]
fn walkthrough_tls_between_two_hosts() {
    walkthrough("tls");
}

#[test]
fn walkthrough_migrate_between_two_hosts() {
    walkthrough("migrate");
}

#[test]
fn walkthrough_backup_server() {
    walkthrough("backup");
}

#[test]
fn container_image_builds_and_runs() {
    require_peer("buildah");
    require_peer("mmdebstrap");
    let tag = format!("localhost/nbdferry:interop-{}", std::process::id());
    // The first run makes the Debian base image (a few minutes).
    let out = run_output_deadline(
        Command::new("bash")
            .arg(deploy_dir().join("container/build-local.sh"))
            .arg(env!("CARGO_BIN_EXE_nbdferry"))
            .arg(&tag),
        std::time::Duration::from_secs(900),
    );
    let _ = run_output(
        peer("buildah")
            .args(["rmi", &tag])
            .env("STORAGE_DRIVER", "vfs"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("image built: {tag}")),
        "build-local.sh ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
