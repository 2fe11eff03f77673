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

const ALL_UP: [(&str, bool); 3] = [("node-1", true), ("node-2", true), ("node-3", true)];

/// Three thinbd nodes (namespaces 1 to 3) and etcd (4), all seen up by node-1; `extra(i)`:
/// node i's further `serve` arguments. `None` (skipped) where the tools are missing.
fn three_nodes(extra: impl Fn(usize) -> Vec<String>) -> Option<(Fabric, Etcd, Vec<NetNode>)> {
    three_nodes_with(extra, &[])
}

/// [`three_nodes`] whose CLI calls run with `cli_env` (TLS settings).
fn three_nodes_with(
    extra: impl Fn(usize) -> Vec<String>,
    cli_env: &[(String, String)],
) -> Option<(Fabric, Etcd, Vec<NetNode>)> {
    if !require("etcd") || !require("nft") {
        return None;
    }
    let fabric = Fabric::up(4)?;
    let etcd = Etcd::start(&fabric, 4);
    let nodes: Vec<NetNode> = (1..=3)
        .map(|i| {
            let args: Vec<String> =
                ["--node-lease-ttl".to_string(), TTL.to_string()].into_iter().chain(extra(i)).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut node = NetNode::start(&fabric, i, &etcd.endpoint, &args);
            node.cli_env = cli_env.to_vec();
            node
        })
        .collect();
    wait_for(&fabric, &nodes[0], &ALL_UP, Duration::from_secs(10));
    Some((fabric, etcd, nodes))
}

#[test]
fn nodes_register_and_their_leases_decide_up_and_down() {
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|i| vec!["--zone".into(), format!("zone-{}", i % 2)]) else {
        return;
    };
    for n in &nodes {
        wait_for(&fabric, n, &ALL_UP, Duration::from_secs(10));
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
    let metrics = metrics_of(&fabric, 1);
    assert!(metrics.contains("thinbd_cluster_node_up{node=\"node-3\"} 0"), "{metrics}");
    assert!(metrics.contains("thinbd_cluster_node_up{node=\"node-1\"} 1"), "{metrics}");
    nodes[2].spawn(&fabric);
    wait_for(&fabric, &nodes[0], &ALL_UP, Duration::from_secs(10));

    // Paused past its lease (SIGSTOP): down; resumed, it notices the lost lease and registers
    // again.
    send_signal(nodes[1].pid(), "STOP");
    wait_for(&fabric, &nodes[0], &[("node-1", true), ("node-2", false), ("node-3", true)], Duration::from_secs(10));
    send_signal(nodes[1].pid(), "CONT");
    wait_for(&fabric, &nodes[0], &ALL_UP, Duration::from_secs(10));
    assert!(nodes[1].log_text().contains("registering again"), "{}", nodes[1].log_text());

    // Cut off from etcd (a partition): down; healed: up.
    fabric.cut(3, 4);
    wait_for(&fabric, &nodes[0], &third_down, Duration::from_secs(10));
    fabric.heal();
    wait_for(&fabric, &nodes[0], &ALL_UP, Duration::from_secs(15));
}

/// A clean stop revokes the lease: the node is down at once, not after its (long) lease.
#[test]
fn a_clean_stop_shows_the_node_down_at_once() {
    if !require("etcd") {
        return;
    }
    let Some(fabric) = Fabric::up(3) else { return };
    let etcd = Etcd::start(&fabric, 3);
    let watcher = NetNode::start(&fabric, 1, &etcd.endpoint, &["--node-lease-ttl", TTL]);
    let stopping = NetNode::start(&fabric, 2, &etcd.endpoint, &["--node-lease-ttl", "60"]);
    wait_for(&fabric, &watcher, &[("node-1", true), ("node-2", true)], Duration::from_secs(10));
    send_signal(stopping.pid(), "TERM");
    wait_for(&fabric, &watcher, &[("node-1", true), ("node-2", false)], Duration::from_secs(10));
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

/// Placement: volumes created through one node spread over the nodes by the room left on them;
/// any node answers for any volume (forwarding to the node that holds it); names are unique in
/// the cluster; a volume whose node is down is still listed, with its node.
#[test]
fn volumes_are_placed_by_room_and_reachable_from_any_node() {
    // node-3 has a bigger pool: it takes more of the volumes.
    let capacity = |i| vec!["--capacity".to_string(), if i == 3 { "40GiB" } else { "10GiB" }.to_string()];
    let Some((fabric, _etcd, mut nodes)) = three_nodes(capacity) else { return };

    let mut placed = BTreeMap::new();
    for i in 0..8 {
        let out = nodes[0]
            .cli(&fabric, &["volume", "create", &format!("v{i}"), "--size", "5GiB", "--replicas", "1", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        *placed.entry(v["node"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    // Room: node-3 40 GiB, the others 10 GiB; 5 GiB each: node-3 takes volumes until its room
    // is down to the others' 10 GiB (6 volumes), then node-1 and node-2 (ties go by name).
    assert_eq!(placed.get("node-3"), Some(&6), "{placed:?}");
    assert_eq!((placed.get("node-1"), placed.get("node-2")), (Some(&1), Some(&1)), "{placed:?}");

    // Names are unique across the cluster, whichever node is asked.
    let dup = fabric
        .command(2, thinbd_tests::thinbd_bin())
        .args(["volume", "create", "v0", "--size", "1GiB", "--replicas", "1", "--api", "10.77.0.2:10810"])
        .output()
        .unwrap();
    assert!(!dup.status.success());
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&dup.stderr)
    );

    // Every node shows every volume, and where its data is.
    let show = |n: &NetNode, name: &str| -> serde_json::Value {
        serde_json::from_str(&n.cli(&fabric, &["volume", "show", name, "-o", "json"])).expect("json")
    };
    let list = |n: &NetNode| -> Vec<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(&n.cli(&fabric, &["volume", "list", "-o", "json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap().into(), v["node"].as_str().unwrap().into()))
            .collect()
    };
    let everywhere = list(&nodes[0]);
    assert_eq!(everywhere.len(), 8);
    assert_eq!(list(&nodes[1]), everywhere);
    let (name, holder) = everywhere.iter().find(|(_, n)| n == "node-1").cloned().unwrap();
    let from_3 = show(&nodes[2], &name);
    assert_eq!(from_3["node"], holder);
    // Operations go to the holder, by name or UUID.
    let uuid = from_3["uuid"].as_str().unwrap().to_string();
    nodes[2].cli(&fabric, &["volume", "resize", &uuid, "--size", "6GiB"]);
    assert_eq!(show(&nodes[0], &name)["size_bytes"], 6u64 << 30);
    nodes[1].cli(&fabric, &["volume", "delete", &name]);
    assert_eq!(list(&nodes[2]).len(), 7);
    // The name is free again.
    nodes[1].cli(&fabric, &["volume", "create", &name, "--size", "1GiB", "--replicas", "1"]);

    // Clones and restores go where the source's layers are, whichever node is asked.
    let (src, src_node) = everywhere.iter().find(|(n, h)| h == "node-3" && *n != name).cloned().unwrap();
    let clone: serde_json::Value =
        serde_json::from_str(&nodes[0].cli(&fabric, &["volume", "clone", &src, &format!("{src}-clone"), "-o", "json"]))
            .unwrap();
    assert_eq!(clone["node"], src_node.as_str());
    nodes[1].cli(&fabric, &["snapshot", "create", &src, "s1"]);
    let restored: serde_json::Value = serde_json::from_str(
        &nodes[1].cli(&fabric, &["volume", "clone", &format!("{src}@s1"), &format!("{src}-restored"), "-o", "json"]),
    )
    .unwrap();
    assert_eq!(restored["node"], src_node.as_str());
    assert_eq!(show(&nodes[0], &format!("{src}-restored"))["node"], src_node.as_str());
    let taken = fabric
        .command(1, thinbd_tests::thinbd_bin())
        .args(["volume", "clone", &src, &name, "--api", "10.77.0.1:10810"])
        .output()
        .unwrap();
    assert!(!taken.status.success(), "a clone took a name in use");
    for extra in [format!("{src}-clone"), format!("{src}-restored")] {
        nodes[0].cli(&fabric, &["volume", "delete", &extra]);
    }

    // A node down: its volumes are still listed (from the cluster store), with their node.
    nodes[2].kill9();
    wait_for(&fabric, &nodes[0], &[("node-1", true), ("node-2", true), ("node-3", false)], Duration::from_secs(10));
    let listed = list(&nodes[0]);
    assert_eq!(listed.len(), 8);
    assert_eq!(listed.iter().filter(|(_, n)| n == "node-3").count(), 6);
    // Shown unavailable (CSI: an abnormal volume condition), and back when the node is.
    let (on_3, _) = listed.iter().find(|(_, n)| n == "node-3").cloned().unwrap();
    assert_eq!(show(&nodes[1], &on_3)["available"], false);
    nodes[2].spawn(&fabric);
    wait_for(&fabric, &nodes[0], &ALL_UP, Duration::from_secs(10));
    let back = show(&nodes[1], &on_3);
    assert_eq!((back["available"].as_bool(), back["node"].as_str()), (Some(true), Some("node-3")));
}

/// Attach from anywhere: a volume whose data is on node-3 is published (through node-1's API)
/// to node-1, which writes to it over the network; then to node-2, which reads every byte
/// back. The grant names the holder's NBD address; the old node's grant is gone.
#[test]
fn data_written_from_one_node_reads_back_on_another() {
    let Some((fabric, _etcd, nodes)) = three_nodes(|_| Vec::new()) else { return };
    // Created through node-1; whichever node holds it, the writer and the reader are the others.
    let out = fabric
        .command(1, thinbd_tests::thinbd_bin())
        .args([
            "volume",
            "create",
            "shared",
            "--size",
            "64MiB",
            "--replicas",
            "1",
            "--api",
            "10.77.0.1:10810",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let holder =
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["node"].as_str().unwrap().to_string();
    let writer = if holder == "node-1" { 2 } else { 1 };
    let reader = 6 - writer - holder.trim_start_matches("node-").parse::<usize>().unwrap();

    let publish = |via: &NetNode, node: usize| -> (String, String) {
        let g: serde_json::Value = serde_json::from_str(
            &via.cli(&fabric, &["volume", "publish", "shared", "--node", &format!("node-{node}"), "-o", "json"]),
        )
        .unwrap();
        (g["nbd_address"].as_str().unwrap().to_string(), g["export_name"].as_str().unwrap().to_string())
    };
    let data = thinbd_tests::pattern(7, 1 << 20);
    let (addr, export) = publish(&nodes[0], writer);
    assert_eq!(addr, format!("{}:10809", fabric.ip(holder.trim_start_matches("node-").parse().unwrap())));
    let written = data.clone();
    let (a, e) = (addr.clone(), export.clone());
    fabric.run_in(writer, move || {
        thinbd_tests::runtime().block_on(async {
            let c =
                thinbd_protocol::client::Client::connect(a.as_str(), thinbd_protocol::client::ClientOptions::new(&e))
                    .await
                    .expect("connect to the holder");
            c.write(3 << 20, &written, 0).await.unwrap();
            c.flush().await.unwrap();
            c.disconnect().await.unwrap();
        })
    });
    nodes[1].cli(&fabric, &["volume", "unpublish", "shared", "--node", &format!("node-{writer}")]);
    let (addr2, export2) = publish(&nodes[1], reader);
    assert_eq!(addr2, addr);
    let got = fabric.run_in(reader, move || {
        thinbd_tests::runtime().block_on(async {
            // The writer's grant is gone.
            let old = thinbd_protocol::client::ClientOptions::new(&export);
            assert!(thinbd_protocol::client::Client::connect(addr.as_str(), old).await.is_err());
            let c = thinbd_protocol::client::Client::connect(
                addr.as_str(),
                thinbd_protocol::client::ClientOptions::new(&export2),
            )
            .await
            .expect("connect to the holder");
            let got = c.read(3 << 20, 1 << 20).await.unwrap();
            c.disconnect().await.unwrap();
            got
        })
    });
    assert!(got == data, "node-{reader} read back other bytes than node-{writer} wrote");
}

/// Targets: a node that opens a grant's export on its own thinbd becomes the volume's target
/// (a new epoch, taken by compare-and-swap in etcd) and forwards to the node holding the data.
/// A second node taking over gets the next epoch; the first node's link is fenced by the
/// holder once its grant is revoked, so its writes no longer land.
#[test]
fn the_attaching_node_is_the_target_and_forwards_to_the_holder() {
    let Some((fabric, _etcd, nodes)) = three_nodes(|_| Vec::new()) else { return };
    let created: serde_json::Value = serde_json::from_str(
        &nodes[0].cli(&fabric, &["volume", "create", "tv", "--size", "64MiB", "--replicas", "1", "-o", "json"]),
    )
    .unwrap();
    let holder: usize = created["node"].as_str().unwrap().trim_start_matches("node-").parse().unwrap();
    let (first, second) = match holder {
        1 => (2, 3),
        2 => (1, 3),
        _ => (1, 2),
    };
    let show = |n: &NetNode| -> serde_json::Value {
        serde_json::from_str(&n.cli(&fabric, &["volume", "show", "tv", "-o", "json"])).unwrap()
    };
    let grant = |node: usize| -> String {
        let g: serde_json::Value = serde_json::from_str(&nodes[0].cli(
            &fabric,
            &["volume", "publish", "tv", "--node", &format!("node-{node}"), "--single-writer", "-o", "json"],
        ))
        .unwrap();
        g["export_name"].as_str().unwrap().to_string()
    };
    use thinbd_protocol::client::{Client, ClientOptions};
    let data = thinbd_tests::pattern(11, 256 << 10);

    // The first node attaches on its own thinbd, which forwards.
    let export = grant(first);
    let local = format!("{}:10809", fabric.ip(first));
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let (tx_done, rx_done) = std::sync::mpsc::channel::<(bool, bool)>();
    let written = data.clone();
    let first_thread = {
        fabric.spawn_in(first, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(local.as_str(), ClientOptions::new(&export)).await.expect("attach via target");
                c.write(1 << 20, &written, 0).await.unwrap();
                c.flush().await.unwrap();
                let back = c.read(1 << 20, written.len() as u32).await.unwrap();
                tx_done.send((back == written, true)).unwrap();
                // Wait until the attachment moved, then try to write again: it must fail.
                rx_go.recv().unwrap();
                let stale = c.write(0, &[0xee; 4096], 0).await;
                let _ = c.flush().await;
                tx_done.send((stale.is_err(), false)).unwrap();
            })
        })
    };
    let (read_back, _) = rx_done.recv_timeout(Duration::from_secs(20)).expect("first node attached");
    assert!(read_back, "the first node read other bytes than it wrote");
    let s = show(&nodes[1]);
    assert_eq!(s["target_node"], format!("node-{first}"));
    assert_eq!(s["target_epoch"], 1);
    assert_eq!(s["node"], format!("node-{holder}"));

    // The attachment moves: revoked on the holder (fence), published to the second node.
    nodes[0].cli(&fabric, &["volume", "unpublish", "tv", "--node", &format!("node-{first}")]);
    tx_go.send(()).unwrap();
    let (stale_failed, _) = rx_done.recv_timeout(Duration::from_secs(20)).expect("stale write answered");
    assert!(stale_failed, "a write through the revoked target was acknowledged");
    first_thread.join().unwrap();
    let export = grant(second);
    let export2 = export.clone();
    let local = format!("{}:10809", fabric.ip(second));
    let got = fabric.run_in(second, move || {
        thinbd_tests::runtime().block_on(async {
            let c = Client::connect(local.as_str(), ClientOptions::new(&export)).await.expect("attach via target");
            let whole = c.read(0, 2 << 20).await.unwrap();
            c.disconnect().await.unwrap();
            whole
        })
    });
    assert!(got[1 << 20..(1 << 20) + data.len()] == data[..], "the second node does not see the first node's data");
    assert!(got[..4096].iter().all(|b| *b == 0), "the revoked target's write landed");
    let s = show(&nodes[2]);
    assert_eq!(
        (s["target_node"].as_str(), s["target_epoch"].as_u64()),
        (Some(format!("node-{second}").as_str()), Some(2))
    );

    // The target restarts (kill -9): a client reconnecting to it gets the next epoch and the
    // same data.
    let mut nodes = nodes;
    let t = nodes.iter().position(|n| n.index == second).unwrap();
    nodes[t].kill9();
    nodes[t].spawn(&fabric);
    let local = format!("{}:10809", fabric.ip(second));
    let again = fabric.run_in(second, move || {
        thinbd_tests::runtime().block_on(async {
            let c = Client::connect(local.as_str(), ClientOptions::new(&export2)).await.expect("reattach");
            let back = c.read(1 << 20, 256 << 10).await.unwrap();
            c.disconnect().await.unwrap();
            back
        })
    });
    assert!(again == data, "data changed across the target's restart");
    let s = show(&nodes[0]);
    assert_eq!(s["target_epoch"].as_u64(), Some(3), "a restarted target takes a new epoch");
}

/// A volume of `replicas` copies on three nodes: created through node-1, published for one
/// writer; returns the (first) holder's index, the two others, and the grant's export name.
fn single_writer_volume(
    fabric: &Fabric,
    nodes: &[NetNode],
    name: &str,
    replicas: &str,
) -> (usize, usize, usize, String) {
    let created: serde_json::Value = serde_json::from_str(
        &nodes[0].cli(fabric, &["volume", "create", name, "--size", "64MiB", "--replicas", replicas, "-o", "json"]),
    )
    .unwrap();
    let holder: usize = created["node"].as_str().unwrap().trim_start_matches("node-").parse().unwrap();
    let others: Vec<usize> = (1..=3).filter(|i| *i != holder).collect();
    (holder, others[0], others[1], publish_for_one_writer(fabric, &nodes[0], name))
}

/// Publishes volume `name` (through `via`) to the node "app" for one writer; its export name.
fn publish_for_one_writer(fabric: &Fabric, via: &NetNode, name: &str) -> String {
    let g: serde_json::Value = serde_json::from_str(
        &via.cli(fabric, &["volume", "publish", name, "--node", "app", "--single-writer", "-o", "json"]),
    )
    .unwrap();
    g["export_name"].as_str().unwrap().to_string()
}

fn target_of(fabric: &Fabric, via: &NetNode, name: &str) -> (String, u64) {
    let s: serde_json::Value = serde_json::from_str(&via.cli(fabric, &["volume", "show", name, "-o", "json"])).unwrap();
    (s["target_node"].as_str().unwrap_or_default().to_string(), s["target_epoch"].as_u64().unwrap_or(0))
}

/// A stale target cannot write: the target is paused (SIGSTOP) with a client's write queued
/// on it; another node takes over with the same grant (a newer epoch, which the holder
/// persists and fences older links with); when the paused target resumes, the queued write
/// fails and its bytes are not on the volume. The holder refuses a link of the older epoch,
/// after its own restart too.
#[test]
fn a_stale_target_cannot_write_after_a_newer_one_took_over() {
    use thinbd_protocol::client::{Client, ClientOptions};
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    let (holder, stale, fresh, export) = single_writer_volume(&fabric, &nodes, "st", "1");
    let first = thinbd_tests::pattern(21, 64 << 10);
    let late = vec![0xeeu8; 64 << 10];
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let client = {
        let (addr, export, first, late) = (format!("{}:10809", fabric.ip(stale)), export.clone(), first.clone(), late);
        fabric.spawn_in(stale, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach via target");
                c.write(0, &first, 0).await.unwrap();
                c.flush().await.unwrap();
                tx.send("attached").unwrap();
                rx_go.recv().unwrap();
                // Sent while the target is paused: it sits in the target's socket.
                let queued = c.write(0, &late, 0).await;
                tx.send(if queued.is_err() { "refused" } else { "ACKNOWLEDGED" }).unwrap();
            })
        })
    };
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok("attached"));
    assert_eq!(target_of(&fabric, &nodes[0], "st"), (format!("node-{stale}"), 1));
    let stale_pid = nodes.iter().find(|n| n.index == stale).unwrap().pid();
    send_signal(stale_pid, "STOP");
    tx_go.send(()).unwrap();
    // Nothing answers the write while the target is paused (a write served before the pause
    // would be acknowledged rightly, at epoch 1, before the takeover).
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(300)),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout),
        "the paused target answered"
    );

    // Another node takes over with the same grant: epoch 2.
    let newer = thinbd_tests::pattern(22, 64 << 10);
    let (addr, e, n) = (format!("{}:10809", fabric.ip(fresh)), export.clone(), newer.clone());
    fabric.run_in(fresh, move || {
        thinbd_tests::runtime().block_on(async {
            let c = Client::connect(addr.as_str(), ClientOptions::new(&e)).await.expect("take over");
            c.write(0, &n, 0).await.unwrap();
            c.flush().await.unwrap();
            c.disconnect().await.unwrap();
        })
    });
    assert_eq!(target_of(&fabric, &nodes[0], "st"), (format!("node-{fresh}"), 2));

    send_signal(stale_pid, "CONT");
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok("refused"), "the stale target's write was acknowledged");
    client.join().unwrap();
    let (addr, e) = (format!("{}:10809", fabric.ip(fresh)), export.clone());
    let back = fabric.run_in(fresh, move || {
        thinbd_tests::runtime().block_on(async {
            let c = Client::connect(addr.as_str(), ClientOptions::new(&e)).await.expect("reattach");
            let got = c.read(0, 64 << 10).await.unwrap();
            c.disconnect().await.unwrap();
            got
        })
    });
    assert!(back == newer, "the volume does not hold the newer target's write");

    // The holder refuses links of the older epoch, and still does after a restart (the
    // promise is in its metadata).
    let stale_link = |fabric: &Fabric| {
        let addr = format!("{}:10809", fabric.ip(holder));
        let name = format!("{export};epoch=1");
        fabric.run_in(stale, move || {
            thinbd_tests::runtime()
                .block_on(async { Client::connect(addr.as_str(), ClientOptions::new(&name)).await.err() })
        })
    };
    let refused = stale_link(&fabric).expect("a link of epoch 1 was accepted after epoch 2");
    assert!(refused.to_string().contains("stale"), "{refused}");
    let h = nodes.iter().position(|n| n.index == holder).unwrap();
    nodes[h].kill9();
    // The attachment is in etcd: another node tells it while the holder is down.
    let other = nodes.iter().find(|n| n.index != holder).unwrap();
    let s: serde_json::Value =
        serde_json::from_str(&other.cli(&fabric, &["volume", "show", "st", "-o", "json"])).unwrap();
    assert_eq!((s["available"].as_bool(), s["published_nodes"].clone()), (Some(false), serde_json::json!(["app"])));
    nodes[h].spawn(&fabric);
    assert!(stale_link(&fabric).is_some(), "after a restart the holder accepted a link of epoch 1");
    // Single writer across nodes: a second writer, published through another node, is refused.
    let out = nodes[2].cli_output(&fabric, &["volume", "publish", "st", "--node", "intruder"]);
    assert!(!out.status.success(), "a second writer was published next to a single writer");
    assert!(String::from_utf8_lossy(&out.stderr).contains("single writer"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A client keeps writing through its target while the target is killed (kill -9) and
/// restarted: it reconnects, the target takes a new epoch, and every acknowledged write reads
/// back from another node. The volume has three copies, so the killed target held one too;
/// the read-only reader at the end links to the copies without serving them as targets.
#[test]
fn a_client_writes_on_across_a_target_restart() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use thinbd_protocol::client::{Client, ClientOptions};
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    let (_holder, target, reader, export) = single_writer_volume(&fabric, &nodes, "rw", "3");
    const BLOCK: usize = 64 << 10;
    const BLOCKS: usize = 120;
    let acked = std::sync::Arc::new(AtomicUsize::new(0));
    let reconnects = std::sync::Arc::new(AtomicUsize::new(0));
    let writer = {
        let (addr, export, acked, reconnects) =
            (format!("{}:10809", fabric.ip(target)), export.clone(), acked.clone(), reconnects.clone());
        fabric.spawn_in(target, move || {
            thinbd_tests::runtime().block_on(async {
                let connect = || attach_retrying(&addr, &export);
                let mut c = connect().await;
                let mut i = 0;
                while i < BLOCKS {
                    let data = thinbd_tests::pattern(100 + i as u64, BLOCK);
                    match c.write((i * BLOCK) as u64, &data, 0).await {
                        Ok(()) => {
                            acked.store(i + 1, Ordering::SeqCst);
                            i += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        // Not acknowledged: reconnect and write it again.
                        Err(_) => {
                            reconnects.fetch_add(1, Ordering::SeqCst);
                            c = connect().await;
                        }
                    }
                }
                c.flush().await.unwrap();
            })
        })
    };
    let wait_acked = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "the writer is stuck at {}", acked.load(Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_acked(30);
    let (_, before) = target_of(&fabric, &nodes[0], "rw");
    let t = nodes.iter().position(|n| n.index == target).unwrap();
    nodes[t].kill9();
    nodes[t].spawn(&fabric);
    writer.join().expect("the writer finished");
    assert!(reconnects.load(Ordering::SeqCst) >= 1, "the client never saw the target go");
    let (node, after) = target_of(&fabric, &nodes[0], "rw");
    assert_eq!(node, format!("node-{target}"));
    assert!(after > before, "the restarted target kept epoch {before}");

    // Everything acknowledged is on the volume, read through another node's target.
    let g: serde_json::Value = serde_json::from_str(
        &nodes[0].cli(&fabric, &["volume", "publish", "rw", "--node", "reader", "--read-only", "-o", "json"]),
    )
    .unwrap();
    let (addr, e) = (format!("{}:10809", fabric.ip(reader)), g["export_name"].as_str().unwrap().to_string());
    let whole = fabric.run_in(reader, move || {
        thinbd_tests::runtime().block_on(async {
            let c = Client::connect(addr.as_str(), ClientOptions::new(&e)).await.expect("read-only attach");
            let whole = c.read(0, (BLOCKS * BLOCK) as u32).await.unwrap();
            c.disconnect().await.unwrap();
            whole
        })
    });
    for i in 0..BLOCKS {
        assert!(
            whole[i * BLOCK..(i + 1) * BLOCK] == thinbd_tests::pattern(100 + i as u64, BLOCK)[..],
            "acknowledged block {i} is not on the volume"
        );
    }
    // On every copy too: the killed target's own copy lost its unflushed writes (new clusters
    // are mapped at a flush), and the new target reconciled it from another copy.
    for n in 1..=3 {
        let copy = read_copy(&fabric, n, &export, after, 0, (BLOCKS * BLOCK) as u32);
        assert!(copy == whole, "node-{n}'s copy differs from what was acknowledged");
    }
    let log = nodes[t].log_text();
    assert!(log.contains("copies that may lack unflushed writes"), "the killed target did not mark its copy suspect");
}

/// Mutual TLS between nodes: NBD and the management API require client certificates on every
/// node (the deploy script's certificates: one server certificate named thinbd-storage, one
/// client certificate), so forwarded API calls and a target's link to the holder only work
/// because nodes present theirs (--peer-tls-*). A client attaches over TLS through a node
/// without the data.
#[test]
fn nodes_call_each_other_over_mutual_tls() {
    use thinbd_protocol::client::{Client, ClientOptions};
    let certs = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls/make-certs.sh");
    thinbd_tests::run(std::process::Command::new("bash").arg(script).arg(certs.path()));
    let p = |f: &str| certs.path().join(f).display().to_string();
    let tls_args = |_| -> Vec<String> {
        [
            ("--tls-cert", "server.crt"),
            ("--tls-key", "server.key"),
            ("--tls-client-ca", "ca.crt"),
            ("--api-tls-cert", "server.crt"),
            ("--api-tls-key", "server.key"),
            ("--api-tls-client-ca", "ca.crt"),
            ("--peer-tls-ca", "ca.crt"),
            ("--peer-tls-cert", "client.crt"),
            ("--peer-tls-key", "client.key"),
        ]
        .into_iter()
        .flat_map(|(flag, file)| [flag.to_string(), p(file)])
        .chain(["--peer-tls-server-name".to_string(), "thinbd-storage".to_string()])
        .collect()
    };
    let env: Vec<(String, String)> = [
        ("THINBD_API_CA", p("ca.crt")),
        ("THINBD_API_CERT", p("client.crt")),
        ("THINBD_API_KEY", p("client.key")),
        ("THINBD_API_SERVER_NAME", "thinbd-storage".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let Some((fabric, _etcd, nodes)) = three_nodes_with(tls_args, &env) else { return };
    // Created through node-1 on node-2 (a forwarded API call), attached through node-3.
    let v: serde_json::Value = serde_json::from_str(&nodes[0].cli(
        &fabric,
        &["volume", "create", "sec", "--size", "16MiB", "--replicas", "1", "--node", "node-2", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(v["node"], "node-2");
    let export = publish_for_one_writer(&fabric, &nodes[0], "sec");
    let data = thinbd_tests::pattern(31, 128 << 10);
    let tls = |ca: &str, cert: &str, key: &str| {
        let c = thinbd_protocol::tls::client_connector(ca.as_ref(), Some((cert.as_ref(), key.as_ref()))).unwrap();
        (c, thinbd_protocol::tls::ServerName::try_from("thinbd-storage").unwrap())
    };
    let (ca, cert, key) = (p("ca.crt"), p("client.crt"), p("client.key"));
    let (addr, e, d) = (format!("{}:10809", fabric.ip(3)), export.clone(), data.clone());
    let back = fabric.run_in(3, move || {
        thinbd_tests::runtime().block_on(async {
            let opts = ClientOptions { tls: Some(tls(&ca, &cert, &key)), ..ClientOptions::new(&e) };
            let c = Client::connect(addr.as_str(), opts).await.expect("attach over TLS through node-3");
            c.write(0, &d, 0).await.unwrap();
            c.flush().await.unwrap();
            let back = c.read(0, d.len() as u32).await.unwrap();
            c.disconnect().await.unwrap();
            // Without a client certificate the node refuses.
            let plain = ClientOptions { tls: None, ..ClientOptions::new(&e) };
            assert!(Client::connect(addr.as_str(), plain).await.is_err(), "a plain client was served");
            back
        })
    });
    assert!(back == data, "read back other bytes through the TLS link");
    let s: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "show", "sec", "-o", "json"])).unwrap();
    assert_eq!((s["node"].as_str(), s["target_node"].as_str()), (Some("node-2"), Some("node-3")));
}

/// Reads `len` bytes at `offset` of the copy held by node `i`, through a link of the current
/// target epoch (as the target's own links do: it joins that epoch, it does not take one).
fn read_copy(fabric: &Fabric, i: usize, export: &str, epoch: u64, offset: u64, len: u32) -> Vec<u8> {
    use thinbd_protocol::client::{Client, ClientOptions};
    let (addr, name) = (format!("{}:10809", fabric.ip(i)), format!("{export};epoch={epoch}"));
    fabric.run_in(i, move || {
        thinbd_tests::runtime().block_on(async {
            let c = Client::connect(addr.as_str(), ClientOptions::new(&name)).await.expect("link to a copy");
            let got = c.read(offset, len).await.unwrap();
            c.disconnect().await.unwrap();
            got
        })
    })
}

/// Waits until `via` shows `count` copies of `volume` in sync.
fn wait_in_sync(fabric: &Fabric, via: &NetNode, volume: &str, count: usize, within: Duration, what: &str) {
    let show = || -> serde_json::Value {
        serde_json::from_str(&via.cli(fabric, &["volume", "show", volume, "-o", "json"])).unwrap()
    };
    let deadline = Instant::now() + within;
    while show()["in_sync"].as_array().map(Vec::len) != Some(count) {
        assert!(Instant::now() < deadline, "{what}: {}", show());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node `i`'s metrics page.
fn metrics_of(fabric: &Fabric, i: usize) -> String {
    let addr = format!("{}:10811", fabric.ip(i));
    fabric.run_in(i, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr.as_str()).expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    })
}

/// Copy `node`'s entry in a `volume show` JSON's replica states.
fn replica_state(v: &serde_json::Value, node: &str) -> serde_json::Value {
    let states = v["replica_states"].as_array().unwrap_or_else(|| panic!("no replica states: {v}"));
    states.iter().find(|r| r["node"] == node).unwrap_or_else(|| panic!("no state for {node}: {v}")).clone()
}

/// The last rebuild `target` logged resumed from at least `checkpoint`.
fn assert_resumed(target: &NetNode, checkpoint: u64) {
    let log = target.log_text();
    let rebuilt = log.lines().rfind(|l| l.contains("copy rebuilt and back in sync")).expect("the rebuild's log line");
    let resumed: u64 = rebuilt
        .split("resumed_from=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{rebuilt}"));
    let rebuilds: Vec<&str> = log.lines().filter(|l| l.contains("rebuil")).collect();
    assert!(
        resumed >= checkpoint,
        "the rebuild did not resume from its checkpoint ({checkpoint}): {rebuilt}\n{}",
        rebuilds.join("\n")
    );
}

/// Attaches `export` on `addr`, trying again for up to a minute (a target may be restarting).
async fn attach_retrying(addr: &str, export: &str) -> thinbd_protocol::client::Client {
    use thinbd_protocol::client::{Client, ClientOptions};
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect(addr, ClientOptions::new(export)).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "cannot attach {addr}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client writing through node `via`'s NBD listener until stopped: each write a fresh seed's
/// 64 KiB pattern into slot `seed × 37 mod slots`, logged in an [`thinbd_tests::AckLog`] as
/// acknowledged or not; after a failed write it attaches again (for up to a minute: a target
/// may be restarting). The checker for the tests that try to lose an acknowledged write.
struct AckWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    handle: std::thread::JoinHandle<thinbd_tests::AckLog>,
}

const ACK_SLOT: usize = 64 << 10;

impl AckWriter {
    fn start(fabric: &Fabric, via: usize, export: &str, slots: usize, pause: Duration) -> AckWriter {
        AckWriter::start_with(fabric, via, export, slots, pause, 0)
    }

    /// [`AckWriter::start`] whose writes carry NBD `flags` (FUA: acknowledged only once
    /// durable, for tests that kill every in-sync copy: unflushed writes may die with them).
    fn start_with(fabric: &Fabric, via: usize, export: &str, slots: usize, pause: Duration, flags: u16) -> AckWriter {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let handle = {
            let (addr, export, stop, acked) =
                (format!("{}:10809", fabric.ip(via)), export.to_string(), stop.clone(), acked.clone());
            fabric.spawn_in(via, move || {
                thinbd_tests::runtime().block_on(async {
                    let connect = || attach_retrying(&addr, &export);
                    let mut log = thinbd_tests::AckLog::new(slots, ACK_SLOT);
                    let mut c = connect().await;
                    let mut seed = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        seed += 1;
                        let slot = (seed as usize * 37) % slots;
                        match c.write((slot * ACK_SLOT) as u64, &thinbd_tests::pattern(seed, ACK_SLOT), flags).await {
                            Ok(()) => {
                                log.acknowledged(slot, seed);
                                acked.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(_) => {
                                log.unacknowledged(slot, seed);
                                c = connect().await;
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                    c.flush().await.expect("flush");
                    log
                })
            })
        };
        AckWriter { stop, acked, handle }
    }

    /// Writes acknowledged during the next `d`.
    fn writes_during(&self, d: Duration) -> usize {
        use std::sync::atomic::Ordering;
        let before = self.acked.load(Ordering::SeqCst);
        std::thread::sleep(d);
        self.acked.load(Ordering::SeqCst) - before
    }

    /// Stops (after a flush) and gives the log.
    fn finish(self) -> thinbd_tests::AckLog {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// Every copy of the volume (nodes 1 to 3) holds each slot's last acknowledged write (or a
/// later unacknowledged one), read through links of the current target `epoch`.
fn check_copies(fabric: &Fabric, export: &str, epoch: u64, log: &thinbd_tests::AckLog, slots: usize) -> Vec<Vec<u8>> {
    check_copies_on(fabric, &[1, 2, 3], export, epoch, log, slots)
}

/// [`check_copies`] for the copies on `nodes`.
fn check_copies_on(
    fabric: &Fabric,
    nodes: &[usize],
    export: &str,
    epoch: u64,
    log: &thinbd_tests::AckLog,
    slots: usize,
) -> Vec<Vec<u8>> {
    nodes
        .iter()
        .map(|&i| {
            let copy = read_copy(fabric, i, export, epoch, 0, (slots * ACK_SLOT) as u32);
            if let Err(e) = log.check(&copy) {
                panic!("node-{i}'s copy lost an acknowledged write: {e}");
            }
            copy
        })
        .collect()
}

/// Synchronous replication (protocol C): a volume with a copy on each of three nodes, attached
/// through one of them (its target, which holds a copy: reads are local). An acknowledged write
/// is on every copy. A copy's node killed (kill -9): the next write is still acknowledged, after
/// the lost copy left the in-sync set in etcd; the two left have it; the volume stays writable
/// while at least `min_insync` (2) copies are in sync. A second loss suspends the next write
/// (unacknowledged) until the node is back and its copy rebuilt; then it is acknowledged and
/// on both copies.
#[test]
fn replicated_writes_reach_every_copy_and_a_lost_copy_leaves_the_in_sync_set_first() {
    use thinbd_protocol::client::{Client, ClientOptions};
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    let v: serde_json::Value = serde_json::from_str(
        &nodes[0].cli(&fabric, &["volume", "create", "r3", "--size", "64MiB", "--replicas", "3", "-o", "json"]),
    )
    .unwrap();
    assert_eq!(v["replicas"].as_array().map(Vec::len), Some(3), "{v}");
    let export = publish_for_one_writer(&fabric, &nodes[1], "r3");
    let first = thinbd_tests::pattern(41, 256 << 10);
    let second = thinbd_tests::pattern(42, 256 << 10);
    let third = thinbd_tests::pattern(43, 64 << 10);
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let client = {
        let (addr, export, first, second, third) =
            (format!("{}:10809", fabric.ip(1)), export.clone(), first.clone(), second.clone(), third.clone());
        fabric.spawn_in(1, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach on node-1");
                c.write(0, &first, 0).await.unwrap();
                c.flush().await.unwrap();
                tx.send("first").unwrap();
                rx_go.recv().unwrap();
                c.write(1 << 20, &second, 0).await.expect("a write with one copy lost");
                c.flush().await.expect("a flush with one copy lost");
                assert!(c.read(1 << 20, second.len() as u32).await.unwrap() == second);
                tx.send("second").unwrap();
                rx_go.recv().unwrap();
                // Suspended while one copy is in sync; acknowledged once a second is back.
                let below = c.write(2 << 20, &third, 0).await;
                tx.send(if below.is_ok() { "acknowledged" } else { "failed" }).unwrap();
                // After a force-promote, attached again: writable with the one copy.
                rx_go.recv().unwrap();
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach again");
                c.write(2 << 20, &third, 0).await.expect("a write after force-promote");
                c.flush().await.unwrap();
                tx.send("promoted").unwrap();
            })
        })
    };
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok("first"));
    let show = |via: &NetNode| -> serde_json::Value {
        serde_json::from_str(&via.cli(&fabric, &["volume", "show", "r3", "-o", "json"])).unwrap()
    };
    let s = show(&nodes[1]);
    let epoch = s["target_epoch"].as_u64().unwrap();
    assert_eq!(s["target_node"], "node-1");
    for i in 1..=3 {
        assert!(
            read_copy(&fabric, i, &export, epoch, 0, first.len() as u32) == first,
            "node-{i}'s copy lacks the write"
        );
    }
    // node-3 dies; the next write is acknowledged once node-3 left the in-sync set.
    nodes[2].kill9();
    tx_go.send(()).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok("second"));
    let s = show(&nodes[1]);
    assert_eq!(s["in_sync"], serde_json::json!(["node-1", "node-2"]), "{s}");
    assert!(read_copy(&fabric, 2, &export, epoch, 1 << 20, second.len() as u32) == second);
    // node-2 dies too: one copy left, fewer than min_insync (2): the write waits, unacknowledged,
    // until node-2 is back and its copy rebuilt.
    nodes[1].kill9();
    tx_go.send(()).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(8)),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout),
        "a write was answered while one copy was in sync"
    );
    nodes[1].spawn(&fabric);
    assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok("acknowledged"), "the suspended write did not go on");
    let s = show(&nodes[0]);
    assert_eq!(s["in_sync"], serde_json::json!(["node-1", "node-2"]), "{s}");
    let states: Vec<(String, String)> = s["replica_states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["node"].as_str().unwrap().to_string(), r["state"].as_str().unwrap().to_string()))
        .collect();
    assert!(states.contains(&("node-3".into(), "Outdated".into())), "{s}");
    assert!(states.contains(&("node-2".into(), "UpToDate".into())), "{s}");
    let epoch = s["target_epoch"].as_u64().unwrap();
    assert!(read_copy(&fabric, 2, &export, epoch, 2 << 20, third.len() as u32) == third, "node-2 lacks the write");
    // The explicit escape: refused without --accept-data-loss, then node-1's copy alone.
    let promote = ["volume", "force-promote", "r3", "--node", "node-1"];
    assert!(!nodes[0].cli_output(&fabric, &promote).status.success(), "force-promote without --accept-data-loss");
    nodes[0].cli(&fabric, &[&promote[..], &["--accept-data-loss"]].concat());
    let log = nodes[0].log_text();
    assert!(log.contains("FORCE-PROMOTE"), "force-promote was not logged");
    // The live target's sessions follow the forced set; the marks of the copies that had left
    // go (those copies are rebuilt from the promoted one in full).
    assert!(log.contains("sessions follow the in-sync set changed in etcd"), "the target was not told");
    assert!(
        log.lines().any(|l| l.contains("snapshot deleted") && l.contains("r3@.departed-node-3")),
        "node-3's mark outlived the force-promote"
    );
    tx_go.send(()).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok("promoted"));
    client.join().unwrap();
}

/// A snapshot of a replicated volume is one point of the write stream on every copy: taken
/// (through another node) while a client writes through the target without pause, the
/// snapshot's allocated ranges are the same on all three copies; it is listed once from every
/// node and deleted on every copy by its UUID.
#[test]
fn a_snapshot_of_a_replicated_volume_is_the_same_point_on_every_copy() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use thinbd_protocol::client::{Client, ClientOptions};
    let Some((fabric, _etcd, nodes)) = three_nodes(|_| Vec::new()) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "rs", "--size", "64MiB", "--replicas", "3"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "rs");
    let (acked, stop) = (std::sync::Arc::new(AtomicUsize::new(0)), std::sync::Arc::new(AtomicBool::new(false)));
    let writer = {
        let (addr, export, acked, stop) =
            (format!("{}:10809", fabric.ip(1)), export.clone(), acked.clone(), stop.clone());
        fabric.spawn_in(1, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach on node-1");
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) && i < 900 {
                    c.write(i * (64 << 10), &[i as u8 | 1; 64 << 10], 0).await.unwrap();
                    i += 1;
                    acked.store(i as usize, Ordering::SeqCst);
                }
                c.flush().await.unwrap();
            })
        })
    };
    while acked.load(Ordering::SeqCst) < 40 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let snap: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["snapshot", "create", "rs", "s1", "-o", "json"])).unwrap();
    let during = acked.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let after = acked.load(Ordering::SeqCst);
    assert!(after > during, "the writes did not go on after the snapshot ({during} then {after})");
    let uuid = snap[0]["uuid"].as_str().or(snap["uuid"].as_str()).unwrap().to_string();
    let allocated: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| serde_json::from_str(&n.cli(&fabric, &["snapshot", "allocated", "rs@s1", "-o", "json"])).unwrap())
        .collect();
    assert!(!allocated[0].as_array().unwrap().is_empty(), "the snapshot holds nothing");
    assert!(allocated.iter().all(|a| *a == allocated[0]), "copies differ: {allocated:?}");
    for n in &nodes {
        let list: serde_json::Value =
            serde_json::from_str(&n.cli(&fabric, &["snapshot", "list", "-o", "json"])).unwrap();
        let uuids: Vec<&str> = list.as_array().unwrap().iter().filter_map(|s| s["uuid"].as_str()).collect();
        assert_eq!(uuids, [uuid.as_str()], "{} lists {list}", n.name);
    }
    // A clone of the snapshot is replicated like its volume: each copy clones its own copy of
    // the snapshot (the same layers), so the clone's copies start in sync and identical.
    // Cloned through `via`: in sync on the three nodes, every copy the same; its first 30 MiB.
    let replicated_clone = |via: &NetNode, source: &str, name: &str| -> Vec<u8> {
        let clone: serde_json::Value =
            serde_json::from_str(&via.cli(&fabric, &["volume", "clone", source, name, "-o", "json"])).unwrap();
        let mut in_sync: Vec<String> = serde_json::from_value(clone["in_sync"].clone()).unwrap();
        in_sync.sort();
        assert_eq!(in_sync, ["node-1", "node-2", "node-3"], "{clone}");
        let cloned = publish_for_one_writer(&fabric, &nodes[0], name);
        let copies: Vec<Vec<u8>> = (1..=3).map(|i| read_copy(&fabric, i, &cloned, 0, 0, 480 * (64 << 10))).collect();
        assert!(copies.iter().all(|c| *c == copies[0]), "{name}'s copies differ");
        copies.into_iter().next().unwrap()
    };
    let cloned = replicated_clone(&nodes[2], "rs@s1", "rs-c");
    for i in 0..40 {
        assert!(cloned[i * (64 << 10)..(i + 1) * (64 << 10)].iter().all(|b| *b == i as u8 | 1), "block {i}");
    }
    nodes[2].cli(&fabric, &["snapshot", "delete", &uuid]);
    for n in &nodes {
        let list: serde_json::Value =
            serde_json::from_str(&n.cli(&fabric, &["snapshot", "list", "-o", "json"])).unwrap();
        assert_eq!(list.as_array().unwrap().len(), 0, "{} still lists {list}", n.name);
        let out = n.cli_output(&fabric, &["snapshot", "allocated", "rs@s1"]);
        assert!(!out.status.success(), "{}'s copy of the snapshot is still there", n.name);
    }
    // A clone of the head is one point of the write stream on every copy too: taken through a
    // snapshot under the barrier, which goes afterwards.
    let head = replicated_clone(&nodes[1], "rs", "rs-h");
    assert!(head[..64 << 10].iter().all(|b| *b == 1), "the head clone lacks the first write");
    for n in &nodes {
        let list: serde_json::Value =
            serde_json::from_str(&n.cli(&fabric, &["snapshot", "list", "-o", "json"])).unwrap();
        assert_eq!(list.as_array().unwrap().len(), 0, "the clone's source point is left on {}: {list}", n.name);
    }
}

/// A copy that left the in-sync set (its node killed) and comes back is rebuilt by the target
/// as soon as the node registers again: from the mark the target took where it left, it
/// receives only what it missed (a write and a TRIM), rejoins the set in etcd, and the session
/// that was open all along writes to it from then on. Of the clusters changed since the mark,
/// only the 4 KiB blocks that differ on the copy are sent.
#[test]
fn a_copy_that_comes_back_is_rebuilt_and_gets_the_later_writes() {
    use thinbd_protocol::client::{Client, ClientOptions};
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "rb", "--size", "16MiB", "--replicas", "3"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "rb");
    let blocks: Vec<Vec<u8>> = (0..3).map(|i| thinbd_tests::pattern(50 + i, 128 << 10)).collect();
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let client = {
        let (addr, export, blocks) = (format!("{}:10809", fabric.ip(1)), export.clone(), blocks.clone());
        fabric.spawn_in(1, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach on node-1");
                // Block i at i MiB, one per step; a TRIM of block 0 while node-3 is away. Before,
                // 2 MiB at 8 MiB that node-3 has and its rebuild need not copy.
                c.write(8 << 20, &thinbd_tests::pattern(59, 2 << 20), 0).await.unwrap();
                for (i, b) in blocks.iter().enumerate() {
                    if i > 0 {
                        rx_go.recv().unwrap();
                    }
                    c.write((i as u64) << 20, b, 0).await.unwrap();
                    if i == 1 {
                        c.trim(0, 128 << 10).await.unwrap();
                        for k in 0..8u64 {
                            c.write((8 << 20) + (k << 16) + 4096, &thinbd_tests::pattern(60 + k, 4096), 0)
                                .await
                                .unwrap();
                        }
                    }
                    c.flush().await.unwrap();
                    tx.send(i).unwrap();
                }
            })
        })
    };
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(0));
    nodes[2].kill9();
    tx_go.send(()).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(1));
    let show = |n: &NetNode| -> serde_json::Value {
        serde_json::from_str(&n.cli(&fabric, &["volume", "show", "rb", "-o", "json"])).unwrap()
    };
    assert_eq!(show(&nodes[0])["in_sync"], serde_json::json!(["node-1", "node-2"]));
    // node-3 is back: node-1's target rebuilds its copy on its own, then it is in the set again.
    nodes[2].spawn(&fabric);
    wait_in_sync(&fabric, &nodes[0], "rb", 3, Duration::from_secs(30), "node-3's copy was not rebuilt");
    // `volume rebuild` (through another node) finds nothing left to do.
    let v: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "rebuild", "rb", "-o", "json"])).unwrap();
    assert_eq!(v["in_sync"].as_array().map(Vec::len), Some(3), "{v}");
    // The session open all along writes to node-3 too.
    tx_go.send(()).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(2));
    client.join().unwrap();
    let epoch = show(&nodes[0])["target_epoch"].as_u64().unwrap();
    let copy = read_copy(&fabric, 3, &export, epoch, 0, 3 << 20);
    assert!(copy[..128 << 10].iter().all(|b| *b == 0), "the TRIM node-3 missed is not on its copy");
    for (i, b) in blocks.iter().enumerate().skip(1) {
        assert!(copy[i << 20..(i << 20) + b.len()] == b[..], "block {i} is not on node-3's copy");
    }
    let before = read_copy(&fabric, 3, &export, epoch, 8 << 20, 2 << 20);
    let mut want = thinbd_tests::pattern(59, 2 << 20);
    for k in 0..8u64 {
        let at = ((k << 16) + 4096) as usize;
        want[at..at + 4096].copy_from_slice(&thinbd_tests::pattern(60 + k, 4096));
    }
    assert!(before == want, "node-3's copy lacks the 4 KiB writes it missed or lost what it had before it left");
    // Delta: a mark where node-3 left; only what was written while it was away is copied
    // (block 1, and the eight 4 KiB writes: not the 64 KiB clusters around them, nor the
    // 2 MiB it had).
    let log = nodes[0].log_text();
    assert!(log.contains("marked where a copy left"), "no mark was taken");
    let rebuilt = log.lines().find(|l| l.contains("copy rebuilt and back in sync")).expect("the rebuild's log line");
    assert!(rebuilt.contains("delta=true") && rebuilt.contains("copied=163840"), "{rebuilt}");
}

/// A copy that was away while snapshots were taken and deleted comes back with the layers the
/// others have: node-3 is killed after snapshot s1; s2 and s3 are taken on the two copies left
/// and s1 is deleted (node-3 keeps it until its rebuild). Back, node-3's copy is rebuilt from
/// the mark where it left: it gets s2 and s3 (with their UUIDs and contents) and loses s1. A
/// snapshot s4 taken during that rebuild (and a clone) stops it; it starts again and adds s4.
/// A scrub compares the heads and the snapshots on the three copies and finds them the same.
#[test]
fn a_copy_that_comes_back_gets_the_snapshot_layers_it_missed() {
    let slow = |i: usize| if i == 1 { vec!["--rebuild-rate".into(), "1MiB".into()] } else { Vec::new() };
    let Some((fabric, _etcd, mut nodes)) = three_nodes(slow) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "ly", "--size", "16MiB", "--replicas", "3"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "ly");
    let writer = OneAtATime::attach(&fabric, 1, &export);
    let run = |op: Op| writer.run(op);
    let snapshot = |via: &NetNode, args: &[&str]| via.cli(&fabric, &[&["snapshot"][..], args].concat());
    run(Op::Write(0, thinbd_tests::pattern(70, 1 << 20)));
    run(Op::Write(1 << 20, thinbd_tests::pattern(71, 512 << 10)));
    snapshot(&nodes[1], &["create", "ly", "s1"]);
    nodes[2].kill9();
    run(Op::Write(2 << 20, thinbd_tests::pattern(72, 512 << 10)));
    run(Op::Write(0, thinbd_tests::pattern(73, 128 << 10)));
    snapshot(&nodes[1], &["create", "ly", "s2"]);
    run(Op::Write(3 << 20, thinbd_tests::pattern(74, 256 << 10)));
    run(Op::Trim(1 << 20, 128 << 10));
    // With node-3 away (out of the in-sync set): deleted on the copies in sync.
    snapshot(&nodes[1], &["delete", "ly@s1"]);
    snapshot(&nodes[1], &["create", "ly", "s3"]);
    run(Op::Write(4 << 20, thinbd_tests::pattern(75, 4 << 20)));
    nodes[2].spawn(&fabric);
    // During the rebuild (1 MiB/s: seconds), a snapshot and a clone: the snapshot stops the
    // rebuild, which starts again and adds that layer too.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "show", "ly", "-o", "json"])).unwrap();
        let r3 = replica_state(&v, "node-3");
        if r3["state"] == "Rebuilding" {
            break;
        }
        assert!(r3["state"] != "UpToDate" && Instant::now() < deadline, "no rebuild was seen: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    snapshot(&nodes[1], &["create", "ly", "s4"]);
    nodes[1].cli(&fabric, &["volume", "clone", "ly@s3", "ly-clone"]);
    wait_in_sync(&fabric, &nodes[0], "ly", 3, Duration::from_secs(60), "node-3's copy was not rebuilt");
    let log = nodes[0].log_text();
    assert!(log.contains("a snapshot stops the rebuild of a copy"), "the snapshot did not stop the rebuild");
    let layers = log.lines().filter(|l| l.contains("a copy being rebuilt took a snapshot layer")).count();
    assert_eq!(layers, 3, "s2, s3, then s4 should have been given to node-3");
    let rebuilt = log.lines().find(|l| l.contains("copy rebuilt and back in sync")).expect("the rebuild's log line");
    assert!(rebuilt.contains("delta=true") && rebuilt.contains("layers=1"), "{rebuilt}");
    assert!(
        !nodes[2].cli_output(&fabric, &["snapshot", "allocated", "ly@s1"]).status.success(),
        "s1 is still on node-3"
    );
    for snap in ["ly@s2", "ly@s3", "ly@s4"] {
        let allocated: Vec<String> =
            nodes.iter().map(|n| n.cli(&fabric, &["snapshot", "allocated", snap, "-o", "json"])).collect();
        assert!(allocated.iter().all(|a| *a == allocated[0]), "{snap} differs between the copies: {allocated:?}");
    }
    let scrub: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "scrub", "ly", "-o", "json"])).unwrap();
    assert_eq!(scrub["copies"].as_array().map(Vec::len), Some(3), "{scrub}");
    let mut compared: Vec<&str> = scrub["snapshots"].as_array().unwrap().iter().filter_map(|s| s.as_str()).collect();
    compared.sort();
    assert_eq!(compared, ["s2", "s3", "s4"], "{scrub}");
    assert_eq!(scrub["differing"], serde_json::json!([]), "{scrub}");
    assert_eq!(scrub["snapshot_differing"], serde_json::json!([]), "{scrub}");
    writer.detach();
}

/// A write or a TRIM, for [`OneAtATime`].
enum Op {
    Write(u64, Vec<u8>),
    Trim(u64, u32),
}

/// A client attached on node `i` running one request at a time, each flushed before it is
/// acknowledged to the test.
struct OneAtATime {
    ops: std::sync::mpsc::Sender<Op>,
    acks: std::sync::mpsc::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

impl OneAtATime {
    fn attach(fabric: &Fabric, i: usize, export: &str) -> OneAtATime {
        use thinbd_protocol::client::{Client, ClientOptions};
        let (ops, rx) = std::sync::mpsc::channel::<Op>();
        let (tx_ack, acks) = std::sync::mpsc::channel::<()>();
        let (addr, export) = (format!("{}:10809", fabric.ip(i)), export.to_string());
        let thread = fabric.spawn_in(i, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach");
                while let Ok(op) = rx.recv() {
                    match op {
                        Op::Write(at, data) => c.write(at, &data, 0).await.unwrap(),
                        Op::Trim(at, len) => c.trim(at, len).await.unwrap(),
                    }
                    c.flush().await.unwrap();
                    tx_ack.send(()).unwrap();
                }
                c.disconnect().await.unwrap();
            })
        });
        OneAtATime { ops, acks, thread }
    }

    fn run(&self, op: Op) {
        self.ops.send(op).unwrap();
        self.acks.recv_timeout(Duration::from_secs(30)).expect("a write was not acknowledged");
    }

    fn detach(self) {
        drop(self.ops);
        self.thread.join().unwrap();
    }
}

/// The bytes a rebuild's log line says it copied.
fn copied_of(line: &str) -> u64 {
    let copied = line.split("copied=").nth(1).and_then(|r| r.split_whitespace().next());
    copied.and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no copied= in {line}"))
}

/// A target that holds no copy of the volume (2 copies on node-1 and node-2, attached through
/// node-3) rebuilds a returning copy from another node's layers: node-2, killed after snapshot
/// s1, misses s2 and the writes around it. Both in-sync copies left (node-1 and, while away,
/// not node-2) took the mark; back, node-2 gets s2 from node-1's copy (read over a link to
/// node-1's layer) and only what changed since its mark — not the 4 MiB it had. The snapshots
/// and heads of the two copies are then the same (scrub, allocated maps, the data).
#[test]
fn a_target_without_a_copy_rebuilds_from_another_nodes_layers() {
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    let create =
        ["volume", "create", "rt", "--size", "16MiB", "--replicas", "2", "--node", "node-1", "--node", "node-2"];
    nodes[0].cli(&fabric, &create);
    let export = publish_for_one_writer(&fabric, &nodes[2], "rt");
    let writer = OneAtATime::attach(&fabric, 3, &export);
    let snapshot = |via: &NetNode, name: &str| via.cli(&fabric, &["snapshot", "create", "rt", name]);
    writer.run(Op::Write(0, thinbd_tests::pattern(100, 4 << 20)));
    snapshot(&nodes[2], "s1");
    nodes[1].kill9();
    writer.run(Op::Write(4 << 20, thinbd_tests::pattern(101, 512 << 10)));
    writer.run(Op::Write(0, thinbd_tests::pattern(102, 128 << 10)));
    snapshot(&nodes[2], "s2");
    writer.run(Op::Write(6 << 20, thinbd_tests::pattern(103, 256 << 10)));
    writer.run(Op::Trim(1 << 20, 128 << 10));
    let (target, epoch) = target_of(&fabric, &nodes[0], "rt");
    assert_eq!(target, "node-3");
    nodes[1].spawn(&fabric);
    wait_in_sync(&fabric, &nodes[2], "rt", 2, Duration::from_secs(60), "node-2's copy was not rebuilt");
    let log = nodes[2].log_text();
    let marked = log.lines().find(|l| l.contains("marked where a copy left"));
    let marked = marked.unwrap_or_else(|| panic!("no mark was taken; the target's log:\n{log}"));
    assert!(marked.contains("marked=node-1"), "{marked}");
    let rebuilt = log.lines().find(|l| l.contains("copy rebuilt and back in sync")).expect("the rebuild's log line");
    assert!(rebuilt.contains("delta=true") && rebuilt.contains("layers=1"), "{rebuilt}");
    // s2's changes (640 KiB) and the head's since (256 KiB), not the 4 MiB node-2 had.
    assert!(copied_of(rebuilt) <= 1 << 20, "more than the delta was copied: {rebuilt}");
    let start = log.lines().find(|l| l.contains("rebuilding a copy beside live writes")).expect("rebuild start");
    assert!(start.contains("from=node-1"), "{start}");
    let head = read_copy(&fabric, 2, &export, epoch, 0, 7 << 20);
    let mut want = thinbd_tests::pattern(100, 4 << 20);
    want[..128 << 10].copy_from_slice(&thinbd_tests::pattern(102, 128 << 10));
    want[1 << 20..(1 << 20) + (128 << 10)].fill(0);
    want.extend(thinbd_tests::pattern(101, 512 << 10));
    want.resize(6 << 20, 0);
    want.extend(thinbd_tests::pattern(103, 256 << 10));
    want.resize(7 << 20, 0);
    assert!(head == want, "node-2's head differs from what was written");
    for snap in ["rt@s1", "rt@s2"] {
        let allocated: Vec<String> =
            nodes[..2].iter().map(|n| n.cli(&fabric, &["snapshot", "allocated", snap, "-o", "json"])).collect();
        assert!(allocated[0] == allocated[1], "{snap} differs between the copies: {allocated:?}");
    }
    let scrub: serde_json::Value =
        serde_json::from_str(&nodes[2].cli(&fabric, &["volume", "scrub", "rt", "-o", "json"])).unwrap();
    let mut compared: Vec<&str> = scrub["snapshots"].as_array().unwrap().iter().filter_map(|s| s.as_str()).collect();
    compared.sort();
    assert_eq!(compared, ["s1", "s2"], "{scrub}");
    assert_eq!(scrub["differing"], serde_json::json!([]), "{scrub}");
    assert_eq!(scrub["snapshot_differing"], serde_json::json!([]), "{scrub}");
    writer.detach();
}

/// A rebuild streams beside live writes (of a volume created with the default three copies):
/// with the target's rebuild rate held low (4 MiB/s
/// for 24 MiB allocated), a client keeps writing through the whole rebuild and its writes are
/// acknowledged while the copy is `Rebuilding` (shown with its progress in `volume show` and
/// the target's metrics). Its node killed part way, the copy's rebuild resumes from its last
/// checkpoint when it is back. Once the copy is back in sync, every 64 KiB slot on it holds
/// the last acknowledged write to that slot, and a scrub finds the three copies identical.
#[test]
fn a_copy_is_rebuilt_beside_live_writes() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use thinbd_protocol::client::{Client, ClientOptions};
    const SLOT: usize = 64 << 10;
    const SLOTS: usize = 384; // 24 MiB
    let rate = |i: usize| if i == 1 { vec!["--rebuild-rate".into(), "4MiB".into()] } else { Vec::new() };
    let Some((fabric, _etcd, mut nodes)) = three_nodes(rate) else { return };
    // Three copies by default (one per node: three nodes).
    let v: serde_json::Value =
        serde_json::from_str(&nodes[0].cli(&fabric, &["volume", "create", "rl", "--size", "64MiB", "-o", "json"]))
            .unwrap();
    assert_eq!(v["replicas"].as_array().map(Vec::len), Some(3), "{v}");
    let export = publish_for_one_writer(&fabric, &nodes[0], "rl");
    let (acked, stop) = (std::sync::Arc::new(AtomicUsize::new(0)), std::sync::Arc::new(AtomicBool::new(false)));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let (addr, export, acked, stop) =
            (format!("{}:10809", fabric.ip(1)), export.clone(), acked.clone(), stop.clone());
        fabric.spawn_in(1, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach on node-1");
                let mut seeds: Vec<u64> = (0..SLOTS as u64).map(|s| 1000 + s).collect();
                for (slot, seed) in seeds.iter().enumerate() {
                    c.write((slot * SLOT) as u64, &thinbd_tests::pattern(*seed, SLOT), 0).await.unwrap();
                }
                c.flush().await.unwrap();
                tx.send(()).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let slot = (n as usize * 37) % SLOTS;
                    c.write((slot * SLOT) as u64, &thinbd_tests::pattern(n, SLOT), 0).await.expect("a live write");
                    seeds[slot] = n;
                    acked.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                c.flush().await.unwrap();
                seeds
            })
        })
    };
    rx.recv_timeout(Duration::from_secs(60)).expect("the volume was not filled");
    nodes[2].kill9();
    let show = |n: &NetNode| -> serde_json::Value {
        serde_json::from_str(&n.cli(&fabric, &["volume", "show", "rl", "-o", "json"])).unwrap()
    };
    wait_in_sync(&fabric, &nodes[0], "rl", 2, Duration::from_secs(30), "node-3 did not leave the in-sync set");
    // Away long enough that much of the volume changes (the rebuild copies only that).
    std::thread::sleep(Duration::from_secs(4));
    nodes[2].spawn(&fabric);
    // Rebuilding, part way, with the writes going on.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (seen, acked_then) = loop {
        let v = show(&nodes[1]);
        let r3 = replica_state(&v, "node-3");
        if r3["state"] == "Rebuilding" && r3["rebuilt_bytes"].as_u64() > Some(0) {
            break (r3, acked.load(Ordering::SeqCst));
        }
        assert!(r3["state"] != "UpToDate", "the rebuild was over before it was seen: {v}");
        assert!(Instant::now() < deadline, "node-3's copy was not being rebuilt: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(seen["rebuilt_bytes"].as_u64() < seen["rebuild_total_bytes"].as_u64(), "{seen}");
    let metrics = metrics_of(&fabric, 1);
    assert!(metrics.contains("thinbd_rebuild_done_bytes{") && metrics.contains("node=\"node-3\""), "{metrics}");
    std::thread::sleep(Duration::from_secs(1));
    let v = show(&nodes[0]);
    assert!(
        acked.load(Ordering::SeqCst) > acked_then + 10,
        "writes did not go on during the rebuild ({acked_then} then {}): {v}",
        acked.load(Ordering::SeqCst)
    );
    // Interrupted: node-3 is killed part way (past a recorded checkpoint) and comes back; the
    // rebuild resumes from that checkpoint, below it copying only what was written since.
    let checkpoint = loop {
        let v = show(&nodes[1]);
        let r3 = replica_state(&v, "node-3");
        assert_eq!(r3["state"], "Rebuilding", "the rebuild was over before it was interrupted: {v}");
        if let Some(done) = r3["rebuilt_bytes"].as_u64().filter(|d| *d > 0) {
            break done;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    nodes[2].kill9();
    std::thread::sleep(Duration::from_secs(1));
    nodes[2].spawn(&fabric);
    wait_in_sync(&fabric, &nodes[0], "rl", 3, Duration::from_secs(60), "node-3's copy did not rejoin");
    assert_resumed(&nodes[0], checkpoint);
    // A scrub (through another node, under the target's barrier while the writes go on).
    let scrub: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "scrub", "rl", "-o", "json"])).unwrap();
    assert_eq!(scrub["differing"].as_array().map(Vec::len), Some(0), "{scrub}");
    assert_eq!(scrub["copies"].as_array().map(Vec::len), Some(3), "{scrub}");
    stop.store(true, Ordering::SeqCst);
    let seeds = writer.join().unwrap();
    let epoch = show(&nodes[0])["target_epoch"].as_u64().unwrap();
    let copy = read_copy(&fabric, 3, &export, epoch, 0, (SLOTS * SLOT) as u32);
    for (slot, seed) in seeds.iter().enumerate() {
        assert!(
            copy[slot * SLOT..(slot + 1) * SLOT] == thinbd_tests::pattern(*seed, SLOT)[..],
            "slot {slot} on node-3's copy is not the last write to it (seed {seed})"
        );
    }
}

/// Scrub: a copy changed behind the target's back (a write straight to it) is found by
/// `volume scrub` (the differing 64 KiB piece only) and `--repair` rewrites it from the first
/// copy; a second scrub finds nothing.
#[test]
fn scrub_finds_a_copy_that_differs_and_repairs_it() {
    use thinbd_protocol::client::{Client, ClientOptions};
    let Some((fabric, _etcd, nodes)) = three_nodes(|_| Vec::new()) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "sc", "--size", "8MiB", "--replicas", "3"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "sc");
    let data = thinbd_tests::pattern(61, 1 << 20);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx_done, rx_done) = std::sync::mpsc::channel::<()>();
    let client = {
        let (addr, export, data) = (format!("{}:10809", fabric.ip(1)), export.clone(), data.clone());
        fabric.spawn_in(1, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach on node-1");
                c.write(1 << 20, &data, 0).await.unwrap();
                c.flush().await.unwrap();
                tx.send(()).unwrap();
                // Attached while the copies are scrubbed.
                rx_done.recv().unwrap();
                c.disconnect().await.unwrap();
            })
        })
    };
    rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let epoch = {
        let s: serde_json::Value =
            serde_json::from_str(&nodes[0].cli(&fabric, &["volume", "show", "sc", "-o", "json"])).unwrap();
        s["target_epoch"].as_u64().unwrap()
    };
    // Behind the target's back: 4 KiB changed on node-2's copy, at 1 MiB + 200 KiB.
    let (addr, name) = (format!("{}:10809", fabric.ip(2)), format!("{export};epoch={epoch}"));
    fabric.run_in(2, move || {
        thinbd_tests::runtime().block_on(async {
            let c = Client::connect(addr.as_str(), ClientOptions::new(&name)).await.unwrap();
            c.write((1 << 20) + (200 << 10), &[0xab; 4096], 0).await.unwrap();
            c.flush().await.unwrap();
            c.disconnect().await.unwrap();
        })
    });
    let scrub = |args: &[&str]| -> serde_json::Value {
        let all = [&["volume", "scrub", "sc", "-o", "json"][..], args].concat();
        serde_json::from_str(&nodes[2].cli(&fabric, &all)).unwrap()
    };
    let found = scrub(&[]);
    assert_eq!(
        found["differing"],
        serde_json::json!([{"offset": (1 << 20) + (192 << 10), "length": 65536}]),
        "{found}"
    );
    assert_eq!(found["repaired"], false);
    assert_eq!(scrub(&["--repair"])["repaired"], true);
    let again = scrub(&[]);
    assert_eq!(again["differing"], serde_json::json!([]), "{again}");
    assert_eq!(again["bytes_compared"].as_u64(), Some(3 * (8 << 20)));
    assert!(read_copy(&fabric, 2, &export, epoch, 1 << 20, 1 << 20) == data, "node-2's copy was not repaired");
    tx_done.send(()).unwrap();
    client.join().unwrap();
}

/// Changing the number of copies: a volume of one copy written, given three (made on the
/// other nodes; rebuilt in the background when it is next attached, then in sync), then
/// brought down to two (the removed copy — the one out of sync — leaves the set and is
/// deleted, and so is the mark its target took where it left).
#[test]
fn copies_are_added_and_removed() {
    use thinbd_protocol::client::{Client, ClientOptions};
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    let show = |n: &NetNode| -> serde_json::Value {
        serde_json::from_str(&n.cli(&fabric, &["volume", "show", "sr", "-o", "json"])).unwrap()
    };
    nodes[0].cli(&fabric, &["volume", "create", "sr", "--size", "8MiB", "--replicas", "1"]);
    let holder: usize = show(&nodes[0])["node"].as_str().unwrap().trim_start_matches("node-").parse().unwrap();
    let data = thinbd_tests::pattern(71, 512 << 10);
    let publish = || publish_for_one_writer(&fabric, &nodes[0], "sr");
    let write = |export: String, offset: u64, data: Vec<u8>| {
        let addr = format!("{}:10809", fabric.ip(holder));
        fabric.run_in(holder, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach");
                c.write(offset, &data, 0).await.unwrap();
                c.flush().await.unwrap();
                c.disconnect().await.unwrap();
            })
        })
    };
    write(publish(), 0, data.clone());
    // Attached volumes of one copy keep it until unpublished.
    assert!(!nodes[1].cli_output(&fabric, &["volume", "set-replicas", "sr", "3"]).status.success());
    nodes[0].cli(&fabric, &["volume", "unpublish", "sr", "--node", "app"]);
    let v: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "set-replicas", "sr", "3", "-o", "json"])).unwrap();
    assert_eq!(v["replicas"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["in_sync"], serde_json::json!([format!("node-{holder}")]), "{v}");
    // Attached again: the new copies are rebuilt, then every copy has the data.
    let export = publish();
    write(export.clone(), 1 << 20, data.clone());
    wait_in_sync(&fabric, &nodes[0], "sr", 3, Duration::from_secs(20), "the new copies never came in sync");
    write(export.clone(), 2 << 20, data.clone());
    let epoch = show(&nodes[0])["target_epoch"].as_u64().unwrap();
    for i in 1..=3 {
        let copy = read_copy(&fabric, i, &export, epoch, 0, 3 << 20);
        for b in 0..3 {
            assert!(copy[b << 20..(b << 20) + data.len()] == data[..], "node-{i}'s copy lacks block {b}");
        }
    }
    // A copy leaves the set (its node down when the volume is next attached: a mark where it
    // left) and is back but not rebuilt (nothing attached). Down to two: that one goes, with
    // its mark.
    let away = (1..=3).find(|i| *i != holder).unwrap();
    nodes[away - 1].kill9();
    write(export.clone(), 3 << 20, data.clone());
    nodes[away - 1].spawn(&fabric);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes[holder - 1].log_text().contains("marked where a copy left") {
        assert!(Instant::now() < deadline, "no mark where node-{away} left:\n{}", nodes[holder - 1].log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let v: serde_json::Value =
        serde_json::from_str(&nodes[2].cli(&fabric, &["volume", "set-replicas", "sr", "2", "-o", "json"])).unwrap();
    let (replicas, in_sync) = (v["replicas"].as_array().unwrap().clone(), v["in_sync"].as_array().unwrap().clone());
    assert_eq!((replicas.len(), in_sync.len()), (2, 2), "{v}");
    let removed = (1..=3).map(|i| format!("node-{i}")).find(|n| !replicas.contains(&serde_json::json!(n))).unwrap();
    let i: usize = removed.trim_start_matches("node-").parse().unwrap();
    let list: serde_json::Value =
        serde_json::from_str(&nodes[i - 1].cli(&fabric, &["volume", "list", "-o", "json"])).unwrap();
    let here: Vec<&serde_json::Value> =
        list.as_array().unwrap().iter().filter(|v| v["node"] == removed.as_str()).collect();
    assert!(here.is_empty(), "{removed} still holds a copy: {list}");
    assert_eq!(removed, format!("node-{away}"), "the copy out of sync goes first");
    let mark = format!("sr@.departed-node-{away}");
    assert!(
        nodes[holder - 1].log_text().lines().any(|l| l.contains("snapshot deleted") && l.contains(&mark)),
        "the removed copy's mark {mark} is still on node-{holder}"
    );
    // An in-sync copy removed under a live session: the target's sessions stop writing to it
    // before it goes (no write fails on it), and the writes go on.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let live = {
        let (addr, export, data) = (format!("{}:10809", fabric.ip(holder)), export.clone(), data.clone());
        fabric.spawn_in(holder, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach");
                c.write(4 << 20, &data, 0).await.expect("a write with two copies");
                tx.send(()).unwrap();
                rx_go.recv().unwrap();
                c.write(5 << 20, &data, 0).await.expect("a write after a copy was removed");
                c.flush().await.unwrap();
                c.disconnect().await.unwrap();
            })
        })
    };
    rx.recv_timeout(Duration::from_secs(30)).expect("no write through the live session");
    let v: serde_json::Value =
        serde_json::from_str(&nodes[2].cli(&fabric, &["volume", "set-replicas", "sr", "1", "-o", "json"])).unwrap();
    assert_eq!(
        (v["node"].as_str(), v["replicas"].as_array().map(Vec::len)),
        (Some(&*format!("node-{holder}")), Some(0)),
        "{v}"
    );
    tx_go.send(()).unwrap();
    live.join().unwrap();
    let log = nodes[holder - 1].log_text();
    assert!(log.contains("sessions follow the in-sync set changed in etcd"), "the target was not told");
    assert!(!log.contains("a replica failed a write"), "a write failed on the removed copy:\n{log}");
}

/// Waits until `server` sees `n` nodes up.
fn wait_nodes_up(server: &thinbd_tests::Server, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list: serde_json::Value = serde_json::from_str(&server.cli(&["node", "list", "-o", "json"])).unwrap();
        if list["nodes"].as_array().unwrap().iter().filter(|n| n["up"] == true).count() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{n} nodes not up: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pool made on its own joins a cluster: its volumes and snapshots are recorded in etcd and
/// reachable through any node (a name another volume already holds leaves its volume
/// reachable by UUID). Snapshots are recorded where they are taken, listed from every node and
/// deleted by UUID through any node.
#[test]
fn a_pool_joining_a_cluster_brings_its_volumes_and_snapshots() {
    if !require("etcd") {
        return;
    }
    let etcd = Etcd::start_local();
    let joined =
        |name: &str| ["--etcd", &etcd.endpoint, "--node-lease-ttl", TTL, "--node-name", name].map(String::from);
    let args_b = joined("node-b");
    let b = thinbd_tests::Server::start_with(&args_b.iter().map(String::as_str).collect::<Vec<_>>());
    wait_nodes_up(&b, 1);
    b.create_volume("dup", "16MiB");
    // node-a's pool, made alone.
    let mut a = thinbd_tests::Server::start_with(&["--node-name", "node-a"]);
    a.create_volume("old", "16MiB");
    a.create_volume("dup", "16MiB");
    a.cli(&["snapshot", "create", "old", "s1"]);
    let dup_uuid = a.volume_json("dup")["uuid"].as_str().unwrap().to_string();
    a.stop();
    let args_a = joined("node-a");
    a.set_extra(&args_a.iter().map(String::as_str).collect::<Vec<_>>());
    a.spawn();
    wait_nodes_up(&b, 2);

    let old = b.volume_json("old");
    assert_eq!((old["node"].as_str(), old["size_bytes"].as_u64()), (Some("node-a"), Some(16 << 20)));
    assert_eq!(b.volume_json("dup")["node"], "node-b", "the cluster's own volume keeps its name");
    assert_eq!(b.volume_json(&dup_uuid)["node"], "node-a", "the joining pool's namesake is reachable by UUID");
    assert!(a.log_text().contains("reachable by UUID"), "no warning about the taken name");

    // Snapshots: the joined one and one taken through node-b, listed from node-b.
    b.cli(&["snapshot", "create", "old", "s2"]);
    let list: serde_json::Value = serde_json::from_str(&b.cli(&["snapshot", "list", "old", "-o", "json"])).unwrap();
    let list = list.as_array().unwrap();
    let names: Vec<(&str, &str)> =
        list.iter().map(|s| (s["name"].as_str().unwrap(), s["node"].as_str().unwrap())).collect();
    assert_eq!(names, [("s1", "node-a"), ("s2", "node-a")]);
    // Deleted by UUID through node-b: gone on node-a, and from the cluster's list.
    let s1 = list[0]["uuid"].as_str().unwrap().to_string();
    b.cli(&["snapshot", "delete", &s1]);
    let left: serde_json::Value = serde_json::from_str(&a.cli(&["snapshot", "list", "-o", "json"])).unwrap();
    assert_eq!(left.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect::<Vec<_>>(), ["s2"]);
    let left: serde_json::Value = serde_json::from_str(&b.cli(&["snapshot", "list", "-o", "json"])).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 1);
    // Resizing through another node updates the size the cluster places by.
    b.cli(&["volume", "resize", "old", "--size", "32MiB"]);
    a.stop();
    assert_eq!(b.volume_json("old")["size_bytes"].as_u64(), Some(32 << 20), "{}", b.volume_json("old"));
}

/// The CSI controller on a cluster (two nodes on loopback, zones a and b): volumes are
/// placed by the cluster and reachable from every node (topology: their zone only); capacity
/// is per zone; publishing to a node that is not a member is NOT_FOUND, to one that is gives
/// the holder's address.
#[test]
fn the_csi_controller_on_a_cluster() {
    use std::collections::HashMap;
    use thinbd_api::csi::controller_client::ControllerClient;
    use thinbd_api::csi::*;
    if !require("etcd") {
        return;
    }
    let etcd = Etcd::start_local();
    let node = |name: &str, zone: &str| {
        thinbd_tests::Server::start_with(&[
            "--etcd",
            &etcd.endpoint,
            "--node-lease-ttl",
            TTL,
            "--node-name",
            name,
            "--zone",
            zone,
            "--capacity",
            if zone == "a" { "10GiB" } else { "20GiB" },
        ])
    };
    let (a, mut b) = (node("node-a", "a"), node("node-b", "b"));
    let plugin = thinbd_tests::CsiPlugin::start("all", &format!("127.0.0.1:{}", a.api_port), "node-a");
    thinbd_tests::runtime().block_on(async {
        let mut ctl = ControllerClient::new(plugin.channel().await);
        wait_nodes_up(&a, 2);
        let zone = |z: &str| Topology { segments: HashMap::from([("topology.thinbd.csi.io/zone".into(), z.into())]) };
        // The node plugin reports its node and its zone.
        let mut np = thinbd_api::csi::node_client::NodeClient::new(plugin.channel().await);
        let info = np.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
        let segments = info.accessible_topology.unwrap().segments;
        assert_eq!(
            (segments["topology.thinbd.csi.io/node"].as_str(), segments["topology.thinbd.csi.io/zone"].as_str()),
            ("node-a", "a")
        );
        let create = |name: &str, req: Option<TopologyRequirement>| CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
            volume_capabilities: vec![thinbd_tests::csi_cap(
                volume_capability::access_mode::Mode::SingleNodeWriter,
                None,
            )],
            accessibility_requirements: req,
            ..Default::default()
        };
        // Asked for zone a (through node-a's controller): placed on node-a although node-b
        // has more room; accessible from zone a.
        let req = TopologyRequirement { requisite: vec![zone("a")], preferred: vec![] };
        let v = ctl.create_volume(create("pvc-za", Some(req))).await.unwrap().into_inner().volume.unwrap();
        assert_eq!(v.accessible_topology, vec![zone("a")]);
        assert_eq!(a.volume_json("pvc-za")["node"], "node-a");
        // No requirement, one copy: the node with the most room (node-b).
        let mut one = create("pvc-any", None);
        one.parameters = HashMap::from([("replicas".into(), "1".into())]);
        let v2 = ctl.create_volume(one).await.unwrap().into_inner().volume.unwrap();
        assert_eq!(b.volume_json("pvc-any")["node"], "node-b");
        assert_eq!(v2.accessible_topology, vec![zone("b")]);
        // The StorageClass asks for two copies: one on each node.
        let mut rep = create("pvc-rep", None);
        rep.parameters = HashMap::from([("replicas".into(), "2".into())]);
        ctl.create_volume(rep).await.unwrap();
        let copies = a.volume_json("pvc-rep")["replicas"].clone();
        assert_eq!(copies, serde_json::json!(["node-b", "node-a"]), "{copies}");
        // Capacity per zone, and of the cluster.
        let cap = |t: Option<Topology>| GetCapacityRequest { accessible_topology: t, ..Default::default() };
        let in_a = ctl.get_capacity(cap(Some(zone("a")))).await.unwrap().into_inner().available_capacity;
        let in_b = ctl.get_capacity(cap(Some(zone("b")))).await.unwrap().into_inner().available_capacity;
        let all = ctl.get_capacity(cap(None)).await.unwrap().into_inner().available_capacity;
        assert_eq!((in_a, in_b, all), (10 << 30, 20 << 30, 30 << 30));
        // Publish: members only; the context names the holder.
        let publish = |node: &str| ControllerPublishVolumeRequest {
            volume_id: v2.volume_id.clone(),
            node_id: node.into(),
            volume_capability: Some(thinbd_tests::csi_cap(
                volume_capability::access_mode::Mode::SingleNodeWriter,
                None,
            )),
            ..Default::default()
        };
        assert_eq!(ctl.controller_publish_volume(publish("stranger")).await.unwrap_err().code(), tonic::Code::NotFound);
        let ctx = ctl.controller_publish_volume(publish("node-a")).await.unwrap().into_inner().publish_context;
        assert_eq!(ctx["thinbd.csi.io/nbd"], format!("127.0.0.1:{}", b.nbd_port));
        // A node down makes its volumes abnormal, for the controller and the node plugin.
        let path = tempfile::tempdir().unwrap();
        let stats = |np: &mut thinbd_api::csi::node_client::NodeClient<_>| {
            let req = NodeGetVolumeStatsRequest {
                volume_id: v2.volume_id.clone(),
                volume_path: path.path().display().to_string(),
                ..Default::default()
            };
            let mut np = np.clone();
            async move { np.node_get_volume_stats(req).await.unwrap().into_inner().volume_condition.unwrap() }
        };
        let before = stats(&mut np).await;
        assert!(!before.message.contains("down"), "{}", before.message);
        b.kill9();
        let condition = |abnormal: bool| {
            let mut ctl = ctl.clone();
            let id = v2.volume_id.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let g = ctl
                        .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() })
                        .await
                        .unwrap()
                        .into_inner();
                    let c = g.status.unwrap().volume_condition.unwrap();
                    if c.abnormal == abnormal {
                        return c;
                    }
                    assert!(Instant::now() < deadline, "condition stays {c:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        assert!(condition(true).await.message.contains("node-b"));
        let after = stats(&mut np).await;
        assert!(
            after.abnormal && after.message.contains("node-b") && after.message.contains("down"),
            "{}",
            after.message
        );
        // Back when the node is.
        b.spawn();
        condition(false).await;
        let healed = stats(&mut np).await;
        assert!(!healed.message.contains("down"), "{}", healed.message);
    });
}

/// No acknowledged write is lost while copies are killed (kill -9), paused (SIGSTOP) and cut
/// off from the target (nftables) under a running writer. The volume has the default three
/// copies; the writer attaches on node-1 (its target) and writes 64 KiB slots, each a fresh
/// pattern, logging what was acknowledged. Meanwhile: node-3 is killed and restarted (its copy
/// is rebuilt), node-2 is paused for 3 s, and node-3 is cut off from the target until its
/// link times out (it leaves the set; the target rebuilds it once the partition heals). At the
/// end every copy is in sync and holds, in every slot, the last acknowledged write or one sent
/// after it, and the copies are identical.
#[test]
fn no_acknowledged_write_is_lost_under_kills_pauses_and_partitions() {
    const SLOTS: usize = 256; // 16 MiB
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "tt", "--size", "32MiB"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "tt");
    let writer = AckWriter::start(&fabric, 1, &export, SLOTS, Duration::from_millis(2));
    let show = |n: &NetNode| -> serde_json::Value {
        serde_json::from_str(&n.cli(&fabric, &["volume", "show", "tt", "-o", "json"])).unwrap()
    };
    std::thread::sleep(Duration::from_secs(1));
    // kill -9 a copy, restart it: rebuilt beside the writes.
    nodes[2].kill9();
    std::thread::sleep(Duration::from_secs(2));
    nodes[2].spawn(&fabric);
    wait_in_sync(&fabric, &nodes[0], "tt", 3, Duration::from_secs(30), "the copies did not all come back in sync");
    // A copy paused for a while (under the link timeout): the writes wait for it, then go on.
    send_signal(nodes[1].pid(), "STOP");
    std::thread::sleep(Duration::from_secs(3));
    send_signal(nodes[1].pid(), "CONT");
    std::thread::sleep(Duration::from_secs(1));
    // The target cut off from a copy: its link times out, it leaves the set, the writes go on.
    fabric.cut(1, 3);
    wait_in_sync(&fabric, &nodes[0], "tt", 2, Duration::from_secs(40), "node-3 did not leave the in-sync set");
    std::thread::sleep(Duration::from_secs(1));
    // Healed: the target, trying since the copy left, rebuilds it.
    fabric.heal();
    wait_in_sync(&fabric, &nodes[0], "tt", 3, Duration::from_secs(40), "the copies did not all come back in sync");
    std::thread::sleep(Duration::from_secs(1));
    let log = writer.finish();
    assert!(log.acknowledged_count() > SLOTS / 2, "too few writes were acknowledged to tell");
    let epoch = show(&nodes[0])["target_epoch"].as_u64().unwrap();
    let copies = check_copies(&fabric, &export, epoch, &log, SLOTS);
    assert!(copies[1] == copies[0] && copies[2] == copies[0], "the in-sync copies differ");
    // Both returns (after the kill, after the partition) were rebuilt from a mark.
    let log = nodes[0].log_text();
    let deltas =
        log.lines().filter(|l| l.contains("copy rebuilt and back in sync") && l.contains("delta=true")).count();
    assert!(
        deltas >= 2,
        "{deltas} delta rebuilds:\n{}",
        log.lines().filter(|l| l.contains("rebuil")).collect::<Vec<_>>().join("\n")
    );
}

/// Network faults on one copy's link, made by our fault proxy (this kernel has no netem):
/// node-3 advertises the proxy as its NBD address, so the target's link to its copy passes
/// through it, while a writer keeps writing through the target and logs what was acknowledged.
/// - Delay with jitter (20–30 ms): every write waits for the slow copy (protocol C), which
///   stays in sync.
/// - Black hole (nothing answers, nothing is reset): the link's request timeout evicts node-3;
///   the writes go on with two copies; healed, node-3 is rebuilt and rejoins.
/// - Reset (RST both ways): the link fails at once; node-3 is rebuilt and rejoins.
/// - Lost replies (one way): like the black hole, the copy applies writes nobody hears of.
///
/// At the end every copy holds each slot's last acknowledged write (or a later unacknowledged
/// one), the copies are identical, and a scrub agrees.
#[test]
fn faults_on_a_copys_link_delay_black_hole_reset_and_lost_replies() {
    use thinbd_tests::fault_proxy::{Fault, FaultProxy};
    const SLOTS: usize = 128; // 8 MiB
    let proxied = |i: usize| if i == 3 { vec!["--advertise-nbd".into(), "10.77.0.3:20809".into()] } else { Vec::new() };
    let Some((fabric, _etcd, nodes)) = three_nodes(proxied) else { return };
    let proxy = fabric.run_in(3, || FaultProxy::start("10.77.0.3:20809", "10.77.0.3:10809"));
    nodes[0].cli(&fabric, &["volume", "create", "fp", "--size", "16MiB"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "fp");
    let writer = AckWriter::start(&fabric, 1, &export, SLOTS, Duration::from_millis(2));
    let writes_during = |d: Duration| writer.writes_during(d);
    assert!(writes_during(Duration::from_secs(1)) > 0, "no write was acknowledged");
    wait_in_sync(&fabric, &nodes[0], "fp", 3, Duration::from_secs(10), "three copies in sync");
    let quick = writes_during(Duration::from_secs(2));
    // Delay: each write waits for the slow copy; it stays in sync.
    proxy.set(Fault::Delay { base: Duration::from_millis(20), jitter: Duration::from_millis(10) });
    let slow = writes_during(Duration::from_secs(2));
    assert!(slow > 5 && slow <= 2000 / 20, "{slow} writes in 2 s with a 20 ms link (before: {quick})");
    wait_in_sync(&fabric, &nodes[0], "fp", 3, Duration::from_secs(1), "the slow copy left the set");
    proxy.set(Fault::Pass);
    // Each of these cuts node-3 off until the target's link gives up on it; writes go on.
    for (fault, what) in [(Fault::BlackHole, "black hole"), (Fault::DropReplies, "lost replies")] {
        proxy.set(fault);
        wait_in_sync(&fabric, &nodes[0], "fp", 2, Duration::from_secs(40), &format!("{what}: node-3 stayed in sync"));
        assert!(writes_during(Duration::from_secs(1)) > 0, "{what}: the writes did not go on with two copies");
        proxy.set(Fault::Pass);
        wait_in_sync(&fabric, &nodes[0], "fp", 3, Duration::from_secs(60), &format!("{what}: node-3 did not rejoin"));
    }
    let rejoined = |n: &NetNode| n.log_text().matches("copy rebuilt and back in sync").count();
    let before = rejoined(&nodes[0]);
    proxy.reset_all();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rejoined(&nodes[0]) == before {
        assert!(Instant::now() < deadline, "reset: node-3 was not rebuilt");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_in_sync(&fabric, &nodes[0], "fp", 3, Duration::from_secs(30), "reset: node-3 did not rejoin");
    assert!(writes_during(Duration::from_secs(1)) > 0, "no write after the faults");
    let scrub: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "scrub", "fp", "-o", "json"])).unwrap();
    assert_eq!(scrub["differing"], serde_json::json!([]), "{scrub}");
    let log = writer.finish();
    let copies = check_copies(&fabric, &export, target_of(&fabric, &nodes[0], "fp").1, &log, SLOTS);
    assert!(copies[1] == copies[0] && copies[2] == copies[0], "the in-sync copies differ");
    drop(proxy);
}

/// A copy that missed acknowledged writes is never a source for a new target: node-3 is killed,
/// a write is acknowledged by node-1 and node-2 (node-3 leaves the in-sync set), then the
/// target node-1 is killed before node-3's copy was rebuilt. Attached again through node-3,
/// whose own copy lacks that write, reads come from node-2 (the last in-sync set); a write
/// waits (node-1's copy left too: one copy in sync, under min_insync) until node-3's copy is
/// rebuilt from node-2, and is then acknowledged. node-1 comes back and is rebuilt; every copy
/// holds both writes. Both rebuilds are deltas from marks on node-2's copy: every in-sync copy
/// marks where a copy left, so the new target needs none of the old one's marks.
#[test]
fn a_copy_that_missed_writes_is_never_a_source_for_a_new_target() {
    use thinbd_protocol::client::{Client, ClientOptions};
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "ns", "--size", "16MiB"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "ns");
    let (a, b, c) = (
        thinbd_tests::pattern(80, 256 << 10),
        thinbd_tests::pattern(81, 256 << 10),
        thinbd_tests::pattern(82, 256 << 10),
    );
    let write_via = |i: usize, at: u64, data: &[u8]| {
        let (addr, export, data) = (format!("{}:10809", fabric.ip(i)), export.clone(), data.to_vec());
        fabric.run_in(i, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach");
                c.write(at, &data, 0).await.expect("write");
                c.flush().await.expect("flush");
                c.disconnect().await.unwrap();
            })
        })
    };
    write_via(1, 8 << 20, &thinbd_tests::pattern(84, 2 << 20));
    write_via(1, 0, &a);
    nodes[2].kill9();
    write_via(1, 0, &b);
    let show = |n: &NetNode| -> serde_json::Value {
        serde_json::from_str(&n.cli(&fabric, &["volume", "show", "ns", "-o", "json"])).unwrap()
    };
    assert_eq!(show(&nodes[1])["in_sync"], serde_json::json!(["node-1", "node-2"]));
    nodes[0].kill9();
    nodes[2].spawn(&fabric);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let client = {
        let (addr, export, c) = (format!("{}:10809", fabric.ip(3)), export.clone(), c.clone());
        fabric.spawn_in(3, move || {
            thinbd_tests::runtime().block_on(async {
                let deadline = Instant::now() + Duration::from_secs(30);
                let client = loop {
                    match Client::connect(addr.as_str(), ClientOptions::new(&export)).await {
                        Ok(client) => break client,
                        Err(e) => assert!(Instant::now() < deadline, "attach through node-3: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                };
                tx.send(client.read(0, 256 << 10).await.expect("read through node-3")).unwrap();
                client.write(1 << 20, &c, 0).await.expect("a write through node-3");
                client.flush().await.unwrap();
                tx.send(Vec::new()).unwrap();
                // Attached (the target rebuilds only for a volume in use) until node-1 is back.
                rx_go.recv().unwrap();
                client.disconnect().await.unwrap();
            })
        })
    };
    let read = rx.recv_timeout(Duration::from_secs(60)).expect("no read through node-3");
    assert!(read == b, "node-3's stale copy was read (it missed the last acknowledged write)");
    rx.recv_timeout(Duration::from_secs(60)).expect("the write through node-3 was not acknowledged");
    let s = show(&nodes[1]);
    assert_eq!(s["target_node"], "node-3", "{s}");
    let mut in_sync: Vec<String> = serde_json::from_value(s["in_sync"].clone()).unwrap();
    in_sync.sort();
    assert_eq!(in_sync, ["node-2", "node-3"], "{s}");
    nodes[0].spawn(&fabric);
    wait_in_sync(&fabric, &nodes[1], "ns", 3, Duration::from_secs(60), "node-1's copy was not rebuilt");
    let epoch = show(&nodes[1])["target_epoch"].as_u64().unwrap();
    for i in 1..=3 {
        assert!(read_copy(&fabric, i, &export, epoch, 0, 256 << 10) == b, "node-{i}'s copy lacks the second write");
        assert!(read_copy(&fabric, i, &export, epoch, 1 << 20, 256 << 10) == c, "node-{i}'s copy lacks the third");
    }
    // Both were rebuilt by node-3 from node-2's copy, each from its mark there (node-1, which
    // marked where node-3 left, was gone): node-3 got what it missed, not the 2 MiB it had.
    let log = nodes[2].log_text();
    let rebuilt: Vec<&str> = log.lines().filter(|l| l.contains("copy rebuilt and back in sync")).collect();
    assert_eq!(rebuilt.len(), 2, "{rebuilt:?}");
    assert!(rebuilt.iter().all(|l| l.contains("delta=true")), "a copy was rebuilt in full: {rebuilt:?}");
    let of_node_3 = rebuilt.iter().find(|l| l.contains("node=\"node-3\"")).expect("node-3's rebuild");
    assert!(copied_of(of_node_3) <= 512 << 10, "{of_node_3}");
    tx_go.send(()).unwrap();
    client.join().unwrap();
}

/// A target killed with a write in flight leaves copies that differ where it was: the write
/// reached node-1 (the target's own copy) and node-2, not node-3 (its link black-holed), and
/// was never acknowledged. The next target (node-3) makes the in-sync copies equal in the
/// regions the activity record lists before it serves anything: node-2 gets node-3's data
/// back, so no later failover can read the write and then lose it again. node-1, back, is
/// rebuilt from its mark plus those regions (it held the write too), and a scrub finds the three
/// copies identical.
#[test]
fn a_new_target_reconciles_the_writes_the_last_one_left_in_flight() {
    use thinbd_protocol::client::{Client, ClientOptions};
    use thinbd_tests::fault_proxy::{Fault, FaultProxy};
    let proxied = |i: usize| if i == 3 { vec!["--advertise-nbd".into(), "10.77.0.3:20809".into()] } else { Vec::new() };
    let Some((fabric, _etcd, mut nodes)) = three_nodes(proxied) else { return };
    let proxy = fabric.run_in(3, || FaultProxy::start("10.77.0.3:20809", "10.77.0.3:10809"));
    nodes[0].cli(&fabric, &["volume", "create", "rc", "--size", "16MiB"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "rc");
    let (a, b) = (thinbd_tests::pattern(90, 256 << 10), thinbd_tests::pattern(91, 256 << 10));
    const AT: u64 = 5 << 20;
    // One session throughout: a new one would find node-3 out of reach at open and evict it.
    let (tx_first, rx_first) = std::sync::mpsc::channel::<()>();
    let (tx_second, rx_second) = std::sync::mpsc::channel::<()>();
    let stuck = {
        let (addr, export, a, b) = (format!("{}:10809", fabric.ip(1)), export.clone(), a.clone(), b.clone());
        fabric.spawn_in(1, move || {
            thinbd_tests::runtime().block_on(async {
                let c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach");
                c.write(AT, &a, 0).await.expect("write");
                c.flush().await.expect("flush");
                tx_first.send(()).unwrap();
                rx_second.recv().unwrap();
                c.write(AT, &b, 0).await.is_ok()
            })
        })
    };
    rx_first.recv_timeout(Duration::from_secs(30)).expect("the first write was not acknowledged");
    let epoch = target_of(&fabric, &nodes[0], "rc").1;
    proxy.set(Fault::BlackHole);
    tx_second.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_copy(&fabric, 2, &export, epoch, AT, 256 << 10) != b {
        assert!(Instant::now() < deadline, "the write did not reach node-2");
        std::thread::sleep(Duration::from_millis(50));
    }
    nodes[0].kill9();
    assert!(!stuck.join().unwrap(), "the write missing on node-3 was acknowledged");
    proxy.set(Fault::Pass);
    assert!(read_copy(&fabric, 3, &export, epoch, AT, 256 << 10) == a, "node-3 got the write after all");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let client = {
        let (addr, export) = (format!("{}:10809", fabric.ip(3)), export.clone());
        fabric.spawn_in(3, move || {
            thinbd_tests::runtime().block_on(async {
                let client = attach_retrying(&addr, &export).await;
                tx.send(client.read(AT, 256 << 10).await.expect("read through node-3")).unwrap();
                // Attached (the target rebuilds only for a volume in use) until node-1 is back.
                rx_go.recv().unwrap();
                client.disconnect().await.unwrap();
            })
        })
    };
    let read = rx.recv_timeout(Duration::from_secs(60)).expect("no read through node-3");
    assert!(read == a, "the new target read the write that never reached its copy");
    let (_, epoch) = target_of(&fabric, &nodes[1], "rc");
    assert!(read_copy(&fabric, 2, &export, epoch, AT, 256 << 10) == a, "node-2 keeps the write node-3 lacks");
    let log = nodes[2].log_text();
    let line = log.lines().find(|l| l.contains("reconciled where the last target")).expect("no reconcile logged");
    assert!(line.contains("repaired=[\"node-2\"]"), "node-2 was not repaired: {line}");
    nodes[0].spawn(&fabric);
    wait_in_sync(&fabric, &nodes[1], "rc", 3, Duration::from_secs(60), "node-1's copy was not rebuilt");
    let rebuilt = nodes[2].log_text();
    let rebuilt = rebuilt.lines().rfind(|l| l.contains("copy rebuilt and back in sync")).expect("no rebuild logged");
    assert!(rebuilt.contains("delta=true"), "node-1 was not rebuilt from its mark: {rebuilt}");
    for i in 1..=3 {
        assert!(read_copy(&fabric, i, &export, epoch, AT, 256 << 10) == a, "node-{i}'s copy differs");
    }
    let scrub: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "scrub", "rc", "-o", "json"])).unwrap();
    assert_eq!(scrub["differing"], serde_json::json!([]), "{scrub}");
    tx_go.send(()).unwrap();
    client.join().unwrap();
    drop(proxy);
}

/// Full pools: node-3's pool (6 MiB) fills first under a writer filling fresh 64 KiB slots in
/// order: the write it fails is acknowledged by the other two once node-3 left the in-sync set,
/// and the writes go on. When node-1's and node-2's pools (12 MiB) fill too, the next write
/// fails on both: it is not acknowledged and nobody is evicted (the set keeps its last two
/// copies). Every acknowledged write is on both in-sync copies, and the client heard ENOSPC.
#[test]
fn full_pools_one_copy_leaves_the_set_all_copies_fail_the_write() {
    use thinbd_protocol::client::{Client, ClientOptions};
    const SLOT: usize = 64 << 10;
    const SLOTS: usize = 320; // 20 MiB
    let capacity = |i: usize| vec!["--capacity".into(), if i == 3 { "6MiB".into() } else { "12MiB".into() }];
    let Some((fabric, _etcd, nodes)) = three_nodes(capacity) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "fu", "--size", "32MiB"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "fu");
    let (log, errors) = {
        let (addr, export) = (format!("{}:10809", fabric.ip(1)), export.clone());
        fabric.run_in(1, move || {
            thinbd_tests::runtime().block_on(async {
                let mut log = thinbd_tests::AckLog::new(SLOTS, SLOT);
                let mut errors = Vec::new();
                let mut c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("attach");
                for slot in 0..SLOTS {
                    let seed = 300 + slot as u64;
                    match c.write((slot * SLOT) as u64, &thinbd_tests::pattern(seed, SLOT), 0).await {
                        Ok(()) => log.acknowledged(slot, seed),
                        Err(e) => {
                            log.unacknowledged(slot, seed);
                            errors.push(e.to_string());
                            c = Client::connect(addr.as_str(), ClientOptions::new(&export)).await.expect("reattach");
                        }
                    }
                }
                c.flush().await.expect("flush");
                (log, errors)
            })
        })
    };
    let acked = log.acknowledged_count();
    assert!(acked * SLOT > 6 << 20, "node-3's full pool stopped the writes: {acked} acknowledged");
    assert!(acked * SLOT <= 12 << 20, "{acked} writes acknowledged on 12 MiB pools");
    assert!(!errors.is_empty(), "no write failed on full pools");
    assert!(errors.iter().all(|e| e.contains("error 28")), "not ENOSPC (28): {errors:?}");
    let s: serde_json::Value =
        serde_json::from_str(&nodes[0].cli(&fabric, &["volume", "show", "fu", "-o", "json"])).unwrap();
    assert_eq!(s["in_sync"], serde_json::json!(["node-1", "node-2"]), "{s}");
    let epoch = s["target_epoch"].as_u64().unwrap();
    for i in 1..=2 {
        let copy = read_copy(&fabric, i, &export, epoch, 0, (SLOTS * SLOT) as u32);
        if let Err(e) = log.check(&copy) {
            panic!("node-{i}'s copy lost an acknowledged write: {e}");
        }
    }
}

/// etcd out of reach (paused: no answer, no reset): the data path goes on without it — writes
/// through the target are acknowledged while it is paused, and while the target alone is
/// partitioned from etcd past its lease. A copy lost meanwhile needs a
/// change of the in-sync set, which waits for etcd: the write that found the copy gone is not
/// acknowledged until etcd answers again and the copy left the set; then the writes go on, the
/// copy comes back and is rebuilt, and no acknowledged write is lost.
#[test]
fn without_etcd_writes_go_on_and_membership_changes_wait() {
    const SLOTS: usize = 128;
    let Some((fabric, etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "eq", "--size", "16MiB"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "eq");
    let writer = AckWriter::start(&fabric, 1, &export, SLOTS, Duration::from_millis(5));
    let writes_during = |d: Duration| writer.writes_during(d);
    assert!(writes_during(Duration::from_secs(1)) > 0, "no write was acknowledged");
    thinbd_tests::send_signal(etcd.pid(), "STOP");
    let paused = writes_during(Duration::from_secs(2));
    assert!(paused > 20, "{paused} writes acknowledged in 2 s without etcd");
    nodes[2].kill9();
    std::thread::sleep(Duration::from_millis(500));
    let stalled = writes_during(Duration::from_secs(3));
    assert_eq!(stalled, 0, "writes were acknowledged with a lost copy still in the set in etcd");
    thinbd_tests::send_signal(etcd.pid(), "CONT");
    wait_in_sync(&fabric, &nodes[0], "eq", 2, Duration::from_secs(30), "node-3 did not leave the set");
    assert!(writes_during(Duration::from_secs(1)) > 0, "the writes did not go on after etcd came back");
    nodes[2].spawn(&fabric);
    wait_in_sync(&fabric, &nodes[0], "eq", 3, Duration::from_secs(60), "node-3's copy was not rebuilt");
    // The target alone cut off from etcd (past its lease): its writes go on.
    fabric.cut(1, 4);
    let cut_off = writes_during(Duration::from_secs(4));
    fabric.heal();
    assert!(cut_off > 20, "{cut_off} writes acknowledged in 4 s with the target cut off from etcd");
    wait_for(&fabric, &nodes[1], &ALL_UP, Duration::from_secs(20));
    let log = writer.finish();
    check_copies(&fabric, &export, target_of(&fabric, &nodes[0], "eq").1, &log, SLOTS);
}

/// A flapping partition between the target and one copy for a minute — mostly short cuts
/// (which only stall the writes: the link waits them out), and two long ones (one both ways,
/// one from the target to the copy only) that evict the copy — then a rolling restart of every
/// node, the target last. No rebuild storm: each eviction is followed by one rebuild, every
/// rebuild copies only what changed since the copy's mark, and no acknowledged write is lost.
#[test]
fn a_flapping_partition_and_a_rolling_restart_rebuild_only_deltas() {
    const SLOTS: usize = 128;
    let Some((fabric, _etcd, mut nodes)) = three_nodes(|_| Vec::new()) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "fl", "--size", "16MiB"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "fl");
    let writer = AckWriter::start(&fabric, 1, &export, SLOTS, Duration::from_millis(5));
    std::thread::sleep(Duration::from_secs(1));
    // (cut seconds, both ways): short cuts stay under the link's 15 s request timeout.
    let flaps = [(2, true), (2, true), (17, true), (1, true), (2, true), (17, false), (2, true), (1, true)];
    for (secs, both) in flaps {
        if both {
            fabric.cut(1, 3);
        } else {
            fabric.cut_one_way(1, 3);
        }
        std::thread::sleep(Duration::from_secs(secs));
        fabric.heal();
        std::thread::sleep(Duration::from_secs(1));
    }
    wait_in_sync(&fabric, &nodes[0], "fl", 3, Duration::from_secs(60), "node-3 did not come back after the flapping");
    // Rolling restart, the target (node-1) last: its client reattaches.
    for i in [1, 2, 0] {
        nodes[i].kill9();
        std::thread::sleep(Duration::from_millis(500));
        nodes[i].spawn(&fabric);
        wait_in_sync(&fabric, &nodes[1], "fl", 3, Duration::from_secs(60), &format!("after restarting node-{}", i + 1));
    }
    std::thread::sleep(Duration::from_secs(1));
    let log = writer.finish();
    let all: String = nodes.iter().map(NetNode::log_text).collect();
    let evictions = all.matches("a replica failed a write: leaving the in-sync set").count();
    let rebuilds: Vec<&str> = all.lines().filter(|l| l.contains("copy rebuilt and back in sync")).collect();
    assert!(evictions >= 2, "the long cuts did not evict node-3 ({evictions} evictions)");
    assert!(rebuilds.iter().all(|l| l.contains("delta=true")), "a full rebuild: {rebuilds:#?}");
    let started = all.matches("rebuilding a copy beside live writes").count();
    eprintln!(
        "flapping and rolling restart: {evictions} evictions, {started} rebuilds started, {} done",
        rebuilds.len()
    );
    assert!(started <= evictions + 2, "a rebuild storm: {started} rebuilds for {evictions} evictions");
    check_copies(&fabric, &export, target_of(&fabric, &nodes[0], "fl").1, &log, SLOTS);
}

/// A slow disk under one copy: node-3's thinbd in a blkio cgroup that throttles its writes to
/// the pool's device to 512 KiB/s. Protocol C waits for it — the acknowledged writes slow to
/// its pace — but no write waits past the link's timeout, so it stays in sync and nothing is
/// lost; out of the cgroup, the writes speed up again.
#[test]
fn a_slow_disk_under_one_copy_slows_the_writes_and_loses_nothing() {
    use std::os::unix::fs::MetadataExt;
    const SLOTS: usize = 128;
    let blkio = std::path::Path::new("/sys/fs/cgroup/blkio");
    if !blkio.join("blkio.throttle.write_bps_device").exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI's machine has cgroup v1 blkio throttling");
        eprintln!("skipped: no cgroup v1 blkio throttling here");
        return;
    }
    let Some((fabric, _etcd, nodes)) = three_nodes(|_| Vec::new()) else { return };
    nodes[0].cli(&fabric, &["volume", "create", "sl", "--size", "16MiB"]);
    let export = publish_for_one_writer(&fabric, &nodes[0], "sl");
    let writer = AckWriter::start(&fabric, 1, &export, SLOTS, Duration::ZERO);
    let writes_during = |d: Duration| writer.writes_during(d);
    std::thread::sleep(Duration::from_secs(1));
    let quick = writes_during(Duration::from_secs(2));
    // node-3's writes to its pool's device, throttled.
    let dev = std::fs::metadata(&nodes[2].data_dir).unwrap().dev();
    let device = format!("{}:{}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let group = blkio.join(format!("thinbd-slow-{}", std::process::id()));
    std::fs::create_dir_all(&group).unwrap();
    std::fs::write(group.join("blkio.throttle.write_bps_device"), format!("{device} {}", 512 << 10)).unwrap();
    std::fs::write(group.join("cgroup.procs"), nodes[2].pid().to_string()).unwrap();
    let slow = writes_during(Duration::from_secs(3));
    // Back in the root group, then the group removed.
    std::fs::write(blkio.join("cgroup.procs"), nodes[2].pid().to_string()).unwrap();
    std::fs::remove_dir(&group).unwrap();
    let again = writes_during(Duration::from_secs(2));
    let log = writer.finish();
    eprintln!("64 KiB writes: {quick} in 2 s, {slow} in 3 s on a 512 KiB/s disk, {again} in 2 s after");
    // 512 KiB/s is 8 writes of 64 KiB a second (plus what the device's queue took at once).
    assert!(slow > 0 && slow <= 3 * 8 + 16, "{slow} writes in 3 s with one copy's disk at 512 KiB/s");
    assert!(quick > 2 * slow && again > 2 * slow, "the writes were not slowed: {quick}, {slow}, {again}");
    wait_in_sync(&fabric, &nodes[0], "sl", 3, Duration::from_secs(1), "the slow copy left the set");
    check_copies(&fabric, &export, target_of(&fabric, &nodes[0], "sl").1, &log, SLOTS);
}

/// The source of a rebuild killed in the middle of it: a volume of two copies (node-2, node-3)
/// written through node-1 (its target, which holds no copy). node-3 is away while more is
/// written, then rebuilt from node-2 at 2 MiB/s; past a checkpoint, node-2 — the source and the
/// only copy in sync — is killed: writes fail (never acknowledged by a copy that is not in
/// sync), and the copy being rebuilt stays out of the set. node-2 back, the rebuild resumes from
/// its checkpoint, and both copies hold every acknowledged write.
#[test]
fn a_rebuild_whose_source_is_killed_resumes_from_its_checkpoint() {
    interrupted_rebuild_resumes(Interrupt::Source);
}

/// The target killed in the middle of a rebuild (kill -9, node-1, which holds no copy): the
/// writer attaches again, node-1 comes back as the target of the next epoch, and the rebuild
/// resumes from the checkpoint the old target recorded — below it copying what the new target
/// wrote and what the old one may have left in flight (its activity record) — and both copies
/// hold every acknowledged write.
#[test]
fn a_rebuild_whose_target_is_killed_resumes_under_the_next_target() {
    interrupted_rebuild_resumes(Interrupt::Target);
}

enum Interrupt {
    Source,
    Target,
}

fn interrupted_rebuild_resumes(interrupt: Interrupt) {
    const SLOTS: usize = 256; // 16 MiB
    let slow = |i: usize| if i == 1 { vec!["--rebuild-rate".into(), "2MiB".into()] } else { Vec::new() };
    let Some((fabric, _etcd, mut nodes)) = three_nodes(slow) else { return };
    let create =
        ["volume", "create", "rs2", "--size", "32MiB", "--replicas", "2", "--node", "node-2", "--node", "node-3"];
    nodes[0].cli(&fabric, &create);
    let export = publish_for_one_writer(&fabric, &nodes[0], "rs2");
    // Killing the source kills the only in-sync copy: only durable writes must survive it.
    let flags = match interrupt {
        Interrupt::Source => thinbd_protocol::consts::CMD_FLAG_FUA,
        Interrupt::Target => 0,
    };
    let writer = AckWriter::start_with(&fabric, 1, &export, SLOTS, Duration::from_millis(5), flags);
    std::thread::sleep(Duration::from_secs(1));
    nodes[2].kill9();
    wait_in_sync(&fabric, &nodes[0], "rs2", 1, Duration::from_secs(30), "node-3 did not leave the set");
    std::thread::sleep(Duration::from_secs(2));
    nodes[2].spawn(&fabric);
    let show = |n: &NetNode| -> serde_json::Value {
        serde_json::from_str(&n.cli(&fabric, &["volume", "show", "rs2", "-o", "json"])).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let checkpoint = loop {
        let v = show(&nodes[0]);
        let r3 = replica_state(&v, "node-3");
        assert_ne!(r3["state"], "UpToDate", "the rebuild was over before it was interrupted: {v}");
        if let Some(done) = r3["rebuilt_bytes"].as_u64().filter(|d| *d > 0) {
            break done;
        }
        assert!(Instant::now() < deadline, "node-3 was not being rebuilt: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (_, epoch_before) = target_of(&fabric, &nodes[1], "rs2");
    match interrupt {
        Interrupt::Source => {
            nodes[1].kill9();
            std::thread::sleep(Duration::from_secs(2));
            let v = show(&nodes[0]);
            assert_eq!(
                v["in_sync"],
                serde_json::json!(["node-2"]),
                "the copy being rebuilt joined without its source: {v}"
            );
            nodes[1].spawn(&fabric);
        }
        Interrupt::Target => {
            nodes[0].kill9();
            std::thread::sleep(Duration::from_secs(1));
            nodes[0].spawn(&fabric);
        }
    }
    wait_in_sync(&fabric, &nodes[0], "rs2", 2, Duration::from_secs(90), "node-3's rebuild did not finish");
    assert_resumed(&nodes[0], checkpoint);
    let (_, epoch) = target_of(&fabric, &nodes[0], "rs2");
    if let Interrupt::Target = interrupt {
        assert_eq!(epoch, epoch_before + 1, "the rebuild did not resume under the next target");
    }
    let log = writer.finish();
    check_copies_on(&fabric, &[2, 3], &export, epoch, &log, SLOTS);
}

/// Several writers of a replicated volume share one target, which orders their writes: two
/// consumers with multi-writer grants, attached through node-1 and node-3, start together and
/// each write every 64 KiB slot of the volume once, 16 requests in flight (so the two writes
/// of a slot are often in flight at once). The second attachment's node forwards its session
/// to the first's (one target in etcd), so every copy applies each pair of overlapping writes
/// in the same order: a scrub and a byte comparison find the three copies identical. (With a
/// target per writer, the copies end up holding different last writes.)
#[test]
fn several_writers_of_a_replicated_volume_share_one_target() {
    let Some((fabric, _etcd, nodes)) = three_nodes(|_| Vec::new()) else { return };
    const SLOTS: u64 = 256;
    nodes[0].cli(&fabric, &["volume", "create", "mw", "--size", "16MiB", "--replicas", "3"]);
    let publish = |app: &str| -> String {
        let g: serde_json::Value =
            serde_json::from_str(&nodes[0].cli(&fabric, &["volume", "publish", "mw", "--node", app, "-o", "json"]))
                .unwrap();
        g["export_name"].as_str().unwrap().to_string()
    };
    let exports = [publish("app-1"), publish("app-2")];
    let start = std::sync::Arc::new(std::sync::Barrier::new(2));
    let (tx_done, rx_done) = std::sync::mpsc::channel::<()>();
    let mut go = Vec::new();
    let writers: Vec<_> = [(1usize, 1u64), (3, 2)]
        .into_iter()
        .map(|(i, who)| {
            let (addr, export) = (format!("{}:10809", fabric.ip(i)), exports[who as usize - 1].clone());
            let (done, start) = (tx_done.clone(), start.clone());
            let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
            go.push(tx_go);
            fabric.spawn_in(i, move || {
                thinbd_tests::runtime().block_on(async {
                    // Both attach at once: both may take the target, and the older one's
                    // session is refused (its epoch is stale); a client attaches again.
                    let c = attach_retrying(&addr, &export).await;
                    start.wait();
                    for slots in (0..SLOTS).collect::<Vec<_>>().chunks(16) {
                        let writes = slots.iter().map(|k| {
                            let data = thinbd_tests::pattern(who * 1_000_000 + k, 64 << 10);
                            let c = &c;
                            async move { c.write(k * (64 << 10), &data, 0).await }
                        });
                        for r in futures_util::future::join_all(writes).await {
                            r.expect("a write");
                        }
                    }
                    c.flush().await.unwrap();
                    done.send(()).unwrap();
                    rx_go.recv().unwrap();
                    c.disconnect().await.unwrap();
                })
            })
        })
        .collect();
    for _ in 0..2 {
        rx_done.recv_timeout(Duration::from_secs(120)).expect("a writer did not finish");
    }
    let (target, epoch) = target_of(&fabric, &nodes[1], "mw");
    let other = if target == "node-1" { 3 } else { 1 };
    assert!(target == "node-1" || target == "node-3", "{target}");
    let log = nodes[other - 1].log_text();
    assert!(log.contains("a writer's session goes to the volume's target"), "node-{other} served its writer itself");
    let scrub: serde_json::Value =
        serde_json::from_str(&nodes[1].cli(&fabric, &["volume", "scrub", "mw", "-o", "json"])).unwrap();
    assert_eq!(scrub["copies"].as_array().map(Vec::len), Some(3), "{scrub}");
    assert_eq!(scrub["differing"], serde_json::json!([]), "{scrub}");
    let copies: Vec<Vec<u8>> = (1..=3).map(|i| read_copy(&fabric, i, &exports[0], epoch, 0, 16 << 20)).collect();
    let differ = |a: &[u8], b: &[u8]| a.chunks(64 << 10).zip(b.chunks(64 << 10)).filter(|(x, y)| x != y).count();
    let (d2, d3) = (differ(&copies[0], &copies[1]), differ(&copies[0], &copies[2]));
    assert!(d2 == 0 && d3 == 0, "slots differing from node-1's copy: {d2} on node-2, {d3} on node-3");
    for tx in go {
        tx.send(()).unwrap();
    }
    for w in writers {
        w.join().unwrap();
    }
}
