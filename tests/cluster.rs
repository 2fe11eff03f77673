//! The cluster on etcd: thinbd nodes in network namespaces on a bridge, etcd in a namespace of
//! its own, all made and torn down here. Nodes register under leases; a node killed, paused or
//! cut off from etcd is shown down once its lease runs out, and up again when it is back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use thinbd_tests::netns::{Etcd, Fabric, NetNode};
use thinbd_tests::{require, send_signal};

/// Seconds of lease: short so that the test sees nodes go down quickly.
const TTL: &str = "2";

/// Waits until node `from` sees exactly `want` (name → up).
fn wait_for(fabric: &Fabric, from: &NetNode, want: &[(&str, bool)], within: Duration) {
    let want: BTreeMap<String, bool> = want.iter().map(|(n, u)| (n.to_string(), *u)).collect();
    let deadline = Instant::now() + within;
    loop {
        let seen = from.nodes_up(fabric);
        if seen == want {
            return;
        }
        assert!(Instant::now() < deadline, "{} sees {seen:?}, want {want:?}\nits log:\n{}", from.name, from.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn nodes_register_and_their_leases_decide_up_and_down() {
    if !require("etcd") || !require("nft") {
        return;
    }
    let Some(fabric) = Fabric::up(4) else { return };
    let etcd = Etcd::start(&fabric, 4);
    let args = ["--node-lease-ttl", TTL, "--zone"];
    let mut nodes: Vec<NetNode> = (1..=3)
        .map(|i| NetNode::start(&fabric, i, &etcd.endpoint, &[&args[..], &[&format!("zone-{}", i % 2)]].concat()))
        .collect();
    let all_up = [("node-1", true), ("node-2", true), ("node-3", true)];
    for n in &nodes {
        wait_for(&fabric, n, &all_up, Duration::from_secs(10));
    }
    // What a node registered: its addresses, zone and space.
    let list: serde_json::Value =
        serde_json::from_str(&nodes[0].cli(&fabric, &["node", "list", "-o", "json"])).expect("json");
    assert_eq!(list["clustered"], true);
    let n3 = list["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "node-3").expect("node-3").clone();
    assert_eq!(n3["nbd_address"], "10.77.0.3:10809");
    assert_eq!(n3["api_address"], "10.77.0.3:10810");
    assert_eq!(n3["zone"], "zone-1");
    assert!(n3["capacity_bytes"].as_u64().unwrap() > 0 && n3["available_bytes"] == n3["capacity_bytes"]);

    // kill -9: down once the lease runs out, seen by the others; up again after a restart.
    nodes[2].kill9();
    let third_down = [("node-1", true), ("node-2", true), ("node-3", false)];
    wait_for(&fabric, &nodes[0], &third_down, Duration::from_secs(10));
    wait_for(&fabric, &nodes[1], &third_down, Duration::from_secs(5));
    let metrics = fabric.run_in(1, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("10.77.0.1:10811").expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    });
    assert!(metrics.contains("thinbd_cluster_node_up{node=\"node-3\"} 0"), "{metrics}");
    assert!(metrics.contains("thinbd_cluster_node_up{node=\"node-1\"} 1"), "{metrics}");
    nodes[2].spawn(&fabric);
    wait_for(&fabric, &nodes[0], &all_up, Duration::from_secs(10));

    // Paused past its lease (SIGSTOP): down; resumed, it notices the lost lease and registers
    // again.
    send_signal(nodes[1].pid(), "STOP");
    wait_for(&fabric, &nodes[0], &[("node-1", true), ("node-2", false), ("node-3", true)], Duration::from_secs(10));
    send_signal(nodes[1].pid(), "CONT");
    wait_for(&fabric, &nodes[0], &all_up, Duration::from_secs(10));
    assert!(nodes[1].log_text().contains("registering again"), "{}", nodes[1].log_text());

    // Cut off from etcd (a partition): down; healed: up.
    fabric.cut(3, 4);
    wait_for(&fabric, &nodes[0], &third_down, Duration::from_secs(10));
    fabric.heal();
    wait_for(&fabric, &nodes[0], &all_up, Duration::from_secs(15));

    // A clean stop revokes the lease: down at once, not after the lease.
    nodes[0].cli(&fabric, &["node", "list"]);
    send_signal(nodes[1].pid(), "TERM");
    wait_for(&fabric, &nodes[0], &[("node-1", true), ("node-2", false), ("node-3", true)], Duration::from_secs(1));
}

#[test]
fn serve_refuses_to_start_without_its_etcd() {
    if !require("etcd") {
        return;
    }
    let Some(fabric) = Fabric::up(1) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = fabric
        .command(1, thinbd_tests::thinbd_bin())
        .args(["serve", "--data-dir"])
        .arg(tmp.path())
        .args(["--nbd-listen", "10.77.0.1:10809", "--api-listen", "10.77.0.1:10810"])
        .args(["--metrics-listen", "10.77.0.1:10811", "--etcd", "http://10.77.0.1:2379"])
        .output()
        .expect("run thinbd");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("joining the cluster at http://10.77.0.1:2379"), "{err}");
}
