//! Tests across network namespaces the test creates (and removes, even on failure):
//! a node behind a masquerading NAT reached through a relay, and mDNS discovery on a LAN.
//! Skipped, with a message, only where namespaces cannot be created (not root, no netns).

use pollen_tests::mesh::{Node, Operator, test_bytes};
use std::process::Command;
use std::time::Duration;

/// Namespaces and the commands that built them; deleted on drop.
struct Lab {
    namespaces: Vec<String>,
}

impl Lab {
    /// Try to create namespaces; `None` (skip) where that is not possible here.
    fn new(names: &[&str]) -> Option<Lab> {
        let mut lab = Lab { namespaces: vec![] };
        for n in names {
            let out = Command::new("ip").args(["netns", "add", n]).output();
            match out {
                Ok(o) if o.status.success() => lab.namespaces.push(n.to_string()),
                Ok(o) => {
                    eprintln!(
                        "SKIP: cannot create network namespace {n}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                    return None;
                }
                Err(e) => {
                    eprintln!("SKIP: cannot run `ip` to create network namespaces: {e}");
                    return None;
                }
            }
            lab.ns(n, &["ip", "link", "set", "lo", "up"]);
        }
        Some(lab)
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("run command");
        assert!(
            out.status.success(),
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ns(&self, ns: &str, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", ns];
        v.extend_from_slice(args);
        self.run(&v);
    }

    /// A veth pair between two namespaces with an address (CIDR) on each end.
    fn link(&self, a: (&str, &str, &str), b: (&str, &str, &str)) {
        let (ns_a, if_a, ip_a) = a;
        let (ns_b, if_b, ip_b) = b;
        self.run(&[
            "ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
            "netns", ns_b,
        ]);
        self.ns(ns_a, &["ip", "addr", "add", ip_a, "dev", if_a]);
        self.ns(ns_a, &["ip", "link", "set", if_a, "up"]);
        self.ns(ns_b, &["ip", "addr", "add", ip_b, "dev", if_b]);
        self.ns(ns_b, &["ip", "link", "set", if_b, "up"]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn tag() -> String {
    format!("{}", std::process::id() % 100_000)
}

#[test]
fn node_behind_nat_is_reached_through_a_relay() {
    let t = tag();
    let (router, relay_ns, pub_ns, nat_ns) = (
        format!("pr{t}"),
        format!("py{t}"),
        format!("pp{t}"),
        format!("pn{t}"),
    );
    let Some(lab) = Lab::new(&[&router, &relay_ns, &pub_ns, &nat_ns]) else {
        return;
    };
    // Router with three links: relay (10.231.1.0/24), publisher (10.231.2.0/24), and the
    // NAT's inside (10.231.3.0/24). The public hosts have no route to the inside.
    lab.link(
        (&router, "r-y", "10.231.1.1/24"),
        (&relay_ns, "y-r", "10.231.1.2/24"),
    );
    lab.link(
        (&router, "r-p", "10.231.2.1/24"),
        (&pub_ns, "p-r", "10.231.2.2/24"),
    );
    lab.link(
        (&router, "r-n", "10.231.3.1/24"),
        (&nat_ns, "n-r", "10.231.3.2/24"),
    );
    lab.ns(
        &relay_ns,
        &["ip", "route", "add", "10.231.2.0/24", "via", "10.231.1.1"],
    );
    lab.ns(
        &pub_ns,
        &["ip", "route", "add", "10.231.1.0/24", "via", "10.231.2.1"],
    );
    lab.ns(
        &nat_ns,
        &["ip", "route", "add", "default", "via", "10.231.3.1"],
    );
    lab.ns(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    lab.ns(
        &router,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.231.3.0/24",
            "-j",
            "MASQUERADE",
        ],
    );
    // The site's firewall lets it talk to the relay only: anything else must come to it
    // through the relay.
    lab.ns(
        &router,
        &[
            "iptables",
            "-A",
            "FORWARD",
            "-s",
            "10.231.3.0/24",
            "-d",
            "10.231.2.0/24",
            "-j",
            "DROP",
        ],
    );

    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    // The relay has no trust root: it relays and answers the DHT, but holds no model.
    let relay_args = vec!["--relay-server".to_string()];
    let relay = Node::start_in(
        Some(&relay_ns),
        "/ip4/10.231.1.2/tcp/4001",
        true,
        &tmp.path().join("relay"),
        &relay_args,
    );
    let relay_addr = relay.addr();
    let mut pub_args = trust.clone();
    pub_args.extend(["--bootstrap".to_string(), relay_addr.clone()]);
    let publisher = Node::start_in(
        Some(&pub_ns),
        "/ip4/10.231.2.2/tcp/4001",
        true,
        &tmp.path().join("pub"),
        &pub_args,
    );
    let file = tmp.path().join("model.onnx");
    std::fs::write(&file, test_bytes(3 << 20, 9)).unwrap();
    let m = op.manifest(std::slice::from_ref(&file), "site.model", 1, 1 << 20);
    // Publish from the test's namespace through the publisher's own CLI inside its namespace.
    let key = op.dir.join("publisher.key");
    let out = Command::new("ip")
        .args(["netns", "exec", &pub_ns])
        .arg(pollen_tests::pollen_bin())
        .args([
            "publish",
            file.to_str().unwrap(),
            "--channel",
            "site.model",
            "--version",
            "1",
            "--key",
            key.to_str().unwrap(),
            "--node",
            &publisher.url(),
        ])
        .env("POLLEN_API_TOKEN", pollen_tests::TEST_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = m;
    let mut nat_args = trust.clone();
    nat_args.extend([
        "--bootstrap".to_string(),
        relay_addr.clone(),
        "--relay".to_string(),
        relay_addr.clone(),
    ]);
    let natted = Node::start_in(
        Some(&nat_ns),
        "/ip4/10.231.3.2/tcp/4001",
        true,
        &tmp.path().join("nat"),
        &nat_args,
    );
    if std::env::var_os("POLLEN_TEST_KEEP").is_some() {
        std::thread::sleep(Duration::from_secs(8));
        let _ = std::fs::copy(natted.dir.join("node.log"), "/tmp/nat.log");
        let _ = std::fs::copy(tmp.path().join("relay").join("node.log"), "/tmp/relay.log");
        let _ = std::fs::copy(tmp.path().join("pub").join("node.log"), "/tmp/pub.log");
    }
    let s = natted.wait(Duration::from_secs(90), "complete behind NAT", |s| {
        Node::has_release(s, "site.model", 1)
    });
    assert!(
        s.listen.iter().any(|a| a.contains("/p2p-circuit")),
        "listens through the relay: {:?}",
        s.listen
    );
    let via = s
        .peers
        .iter()
        .find(|p| p.chunks_from > 0)
        .expect("a source");
    assert!(
        via.relayed,
        "chunks came over a relayed connection: {:?}",
        s.peers
    );
    let ps = publisher.status();
    assert!(
        ps.peers.iter().any(|p| p.node_id == s.node_id && p.relayed),
        "the publisher reached the NATed node through the relay"
    );
}

#[test]
fn mdns_finds_peers_on_a_lan_without_bootstrap() {
    let t = tag();
    let (a_ns, b_ns) = (format!("ma{t}"), format!("mb{t}"));
    let Some(lab) = Lab::new(&[&a_ns, &b_ns]) else {
        return;
    };
    lab.link(
        (&a_ns, "m-a", "10.232.0.1/24"),
        (&b_ns, "m-b", "10.232.0.2/24"),
    );
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    let a = Node::start_in(
        Some(&a_ns),
        "/ip4/10.232.0.1/tcp/0",
        false,
        &tmp.path().join("a"),
        &trust,
    );
    let b = Node::start_in(
        Some(&b_ns),
        "/ip4/10.232.0.2/tcp/0",
        false,
        &tmp.path().join("b"),
        &trust,
    );
    let sa = a.wait(Duration::from_secs(30), "found b by mDNS", |s| {
        !s.peers.is_empty()
    });
    let sb = b.status();
    assert_eq!(sa.peers[0].node_id, sb.node_id);
}
