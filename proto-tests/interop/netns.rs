//! Two hosts on one machine: network namespaces joined by a veth pair,
//! 198.18.0.1/30 and 198.18.0.2/30 (a benchmarking range that exists only
//! inside them), optionally shaped with `tc tbf`. Needs root (CI runs as
//! root); the namespaces and the link go when the pair is dropped.

use std::process::Command;

use crate::harness::{peer, require_peer, run};

pub const IP_A: &str = "198.18.0.1";
pub const IP_B: &str = "198.18.0.2";

pub struct HostPair {
    pub a: String,
    pub b: String,
}

fn ip(args: &[&str]) {
    run(peer("ip").args(args));
}

impl HostPair {
    /// Two namespaces and the link between them, shaped to `rate` (a tc
    /// rate, e.g. "200mbit") both ways when given.
    pub fn new(rate: Option<&str>) -> HostPair {
        let tag = format!("{}{}", std::process::id(), crate::harness::unique());
        let pair = HostPair {
            a: format!("nfA{tag}"),
            b: format!("nfB{tag}"),
        };
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &pair.a]);
        ip(&["link", "set", &vb, "netns", &pair.b]);
        for (ns, dev, addr) in [(&pair.a, &va, IP_A), (&pair.b, &vb, IP_B)] {
            let cidr = format!("{addr}/30");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            if let Some(rate) = rate {
                run(peer("ip")
                    .args(["netns", "exec", ns])
                    .arg(require_peer("tc"))
                    .args([
                        "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                        "latency", "100ms",
                    ]));
            }
        }
        pair
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            // Deleting a namespace takes its end of the veth pair along.
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}
