//! Real-kernel end-to-end: thinbd and the CSI controller run on the host, the CSI node plugin
//! runs inside a qemu guest whose kernel has nbd.ko (tests/vm/guest.sh), where
//! `thinbd-e2e-guest` (tests/guest_driver.rs) drives the node plugin over its unix socket:
//! raw block with fio verification, a plugin restart that finds its device again, ext4 and xfs
//! formatted once and intact across unstage/stage, a snapshot of each restored and the live
//! volume cloned into new volumes that hold the files, online expansion of a mounted filesystem, single-workload refusal, unpublish
//! of a busy volume, volume stats, the device going away at unstage, and thinbd restarted in
//! the middle of a fio run: the node reconnects the device and verification passes.

use std::collections::HashMap;
use std::path::Path;

use thinbd_api::csi::controller_client::ControllerClient;
use thinbd_api::csi::volume_capability::access_mode::Mode;
use thinbd_api::csi::*;
use thinbd_tests::{
    CsiPlugin, Server, csi_cap as cap, guest_available, guest_driver_bin, in_guest, make_certs, runtime,
};

const MIB: i64 = 1 << 20;

/// What the host prepared for the guest: per volume, its id and publish context.
fn write_plan(dir: &Path, plan: &[(&str, String, HashMap<String, String>)]) {
    let mut text = String::new();
    for (role, id, ctx) in plan {
        text.push_str(&format!("{role}\t{id}\t{}\t{}\n", ctx["thinbd.csi.io/export"], ctx["thinbd.csi.io/nbd"]));
    }
    std::fs::write(dir.join("plan.tsv"), text).unwrap();
}

#[test]
fn node_plugin_attaches_formats_and_mounts_through_the_kernel() {
    if !guest_available() {
        return;
    }
    let server =
        Server::start_with(&["--require-grants", "--node-name", "host", "--advertise-nbd", "10.0.2.2:{nbd_port}"]);
    let plugin = CsiPlugin::start("controller", &format!("127.0.0.1:{}", server.api_port), "host");
    // What the guest's node plugin does on NodeGetInfo (which this test does not call).
    server.cli(&["node", "register", "guest"]);
    let shared = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut ctl = ControllerClient::new(plugin.channel().await);
        let mut plan = Vec::new();
        for (role, fs, mode) in [
            ("block", None, Mode::SingleNodeSingleWriter),
            ("ext4", Some("ext4"), Mode::SingleNodeWriter),
            ("xfs", Some("xfs"), Mode::SingleNodeWriter),
        ] {
            let (volume_id, ctx) = provision(&mut ctl, &format!("pvc-{role}"), 512 * MIB, mode, fs).await;
            assert_eq!(ctx["thinbd.csi.io/nbd"], format!("10.0.2.2:{}", server.nbd_port));
            plan.push((role, volume_id, ctx));
        }
        write_plan(shared.path(), &plan);
        std::fs::write(shared.path().join("api"), format!("http://10.0.2.2:{}", server.api_port)).unwrap();
    });
    let cmd = format!("{} {}", guest_driver_bin().display(), shared.path().display());
    // The guest asks for a server restart in the middle of a fio run (restart-now); the host
    // restarts thinbd on the same ports and data dir and says so (restarted).
    let dir = shared.path().to_path_buf();
    let guest = std::thread::spawn(move || in_guest(&cmd, &[&dir]));
    let mut server = server;
    let mut restarted = false;
    while !guest.is_finished() {
        if !restarted && shared.path().join("restart-now").exists() {
            assert!(server.stop().success(), "thinbd did not stop cleanly");
            server.spawn();
            std::fs::write(shared.path().join("restarted"), b"").unwrap();
            restarted = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (rc, out) = guest.join().unwrap();
    assert!(restarted, "the guest never asked for the restart:\n{out}");
    assert_eq!(rc, 0, "guest side failed:\n{out}\nserver log:\n{}", server.log_text());
    assert!(out.contains("guest side: all steps passed"), "{out}");
    // The device came back through new sessions opened after the restart.
    let log = server.log_text();
    let after = log.rsplit_once("thinbd serving").map(|(_, rest)| rest).unwrap_or_default();
    assert!(
        after.contains("NBD session started") && after.contains("export=\"pvc-block\""),
        "no reconnect after restart:\n{log}"
    );
    // The kernel wrote through thinbd: the block volume holds fio's data.
    let v = server.volume_json("pvc-block");
    assert!(v["allocated_bytes"].as_u64().unwrap() >= 32 << 20, "{v}");
}

/// The node attaches over TLS: STARTTLS and the NBD negotiation in user space with a client
/// certificate, then the session keys go to kernel TLS on each socket; a plain client is
/// refused by the server, and fio verifies through the encrypted device.
#[test]
fn node_attaches_over_kernel_tls() {
    if !guest_available() {
        return;
    }
    let shared = tempfile::tempdir().unwrap();
    let certs = shared.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let p = |f: &str| certs.join(f).display().to_string();
    let server = Server::start_with(&[
        "--require-grants",
        "--node-name",
        "host",
        "--advertise-nbd",
        "10.0.2.2:{nbd_port}",
        "--tls-cert",
        &p("server-cert.pem"),
        "--tls-key",
        &p("server-key.pem"),
        "--tls-client-ca",
        &p("ca-cert.pem"),
    ]);
    let plugin = CsiPlugin::start("controller", &format!("127.0.0.1:{}", server.api_port), "host");
    // What the guest's node plugin does on NodeGetInfo (which this test does not call).
    server.cli(&["node", "register", "guest"]);
    runtime().block_on(async {
        let mut ctl = ControllerClient::new(plugin.channel().await);
        let (volume_id, ctx) = provision(&mut ctl, "pvc-tls", 64 * MIB, Mode::SingleNodeWriter, None).await;
        write_plan(shared.path(), &[("block", volume_id, ctx)]);
    });
    let args = format!(
        "--nbd-tls-ca {} --nbd-tls-cert {} --nbd-tls-key {} --nbd-tls-server-name localhost",
        p("ca-cert.pem"),
        p("client-cert.pem"),
        p("client-key.pem")
    );
    std::fs::write(shared.path().join("node-args"), args).unwrap();
    let cmd = format!("{} {}", guest_driver_bin().display(), shared.path().display());
    let (rc, out) = in_guest(&cmd, &[shared.path()]);
    assert_eq!(rc, 0, "guest side failed:\n{out}\nserver log:\n{}", server.log_text());
    assert!(out.contains("guest side: all steps passed"), "{out}");
    let log = server.log_text();
    assert!(log.contains("tls=true"), "sessions were not TLS:\n{log}");
    assert!(server.volume_json("pvc-tls")["allocated_bytes"].as_u64().unwrap() > 0);
}

/// CreateVolume and ControllerPublishVolume to node "guest": the volume id and publish context.
async fn provision(
    ctl: &mut ControllerClient<tonic::transport::Channel>,
    name: &str,
    size: i64,
    mode: Mode,
    fs: Option<&str>,
) -> (String, HashMap<String, String>) {
    let v = ctl
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange { required_bytes: size, limit_bytes: 0 }),
            volume_capabilities: vec![cap(mode, fs)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let ctx = ctl
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: "guest".into(),
            volume_capability: Some(cap(mode, fs)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    (v.volume_id, ctx)
}

/// On a cluster of `nodes` thinbd (reached through `api_port`): waits until all are up,
/// creates the volume `create` describes, publishes it to the node "guest" for one writer, and
/// writes the guest's plan (role "block") with the publish context into `dir`. The context's
/// NBD address.
fn plan_cluster_block(api_port: u16, nodes: usize, create: thinbd_api::pb::CreateVolumeRequest, dir: &Path) -> String {
    runtime().block_on(async {
        let mut api =
            thinbd_api::pb::management_client::ManagementClient::connect(format!("http://127.0.0.1:{api_port}"))
                .await
                .unwrap();
        for _ in 0..100 {
            let up = api.list_nodes(thinbd_api::pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
            if up.iter().filter(|n| n.up).count() == nodes {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let name = create.name.clone();
        let v = api.create_volume(create).await.unwrap().into_inner();
        let g = api
            .publish_volume(thinbd_api::pb::PublishVolumeRequest {
                volume: name,
                node: "guest".into(),
                read_only: false,
                single_writer: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let nbd = g.nbd_address.clone();
        let ctx = HashMap::from([
            ("thinbd.csi.io/export".to_string(), g.export_name),
            ("thinbd.csi.io/nbd".to_string(), g.nbd_address),
        ]);
        write_plan(dir, &[("block", v.uuid, ctx)]);
        nbd
    })
}

/// The cluster's data path through a real kernel: the volume's data is on one thinbd
/// ("holder"), the guest's kernel attaches through another ("target", the thinbd the node would
/// run), which takes the target role and forwards to the holder; fio writes and verifies.
#[test]
fn kernel_attaches_through_a_target_with_the_data_on_another_thinbd() {
    if !guest_available() || !thinbd_tests::require("etcd") {
        return;
    }
    let etcd = thinbd_tests::netns::Etcd::start_local();
    let cluster = ["--etcd", etcd.endpoint.as_str(), "--node-lease-ttl", "3", "--require-grants"];
    let holder = Server::start_with(&[&cluster[..], &["--node-name", "holder"]].concat());
    let target = Server::start_with(
        &[&cluster[..], &["--node-name", "target", "--advertise-nbd", "10.0.2.2:{nbd_port}"]].concat(),
    );
    let shared = tempfile::tempdir().unwrap();
    let create = thinbd_api::pb::CreateVolumeRequest {
        name: "remote-block".into(),
        size_bytes: 64 * MIB as u64,
        nodes: vec!["holder".into()],
        ..Default::default()
    };
    // Placed on the holder, created through the target's API; the publish context names the
    // holder (as ControllerPublishVolume does); the node plugin attaches through its own
    // node's thinbd instead: the target.
    let nbd = plan_cluster_block(target.api_port, 2, create, shared.path());
    assert_eq!(nbd, format!("127.0.0.1:{}", holder.nbd_port));
    let node_args = format!("--attach-via-local-target --thinbd-api 10.0.2.2:{}", target.api_port);
    std::fs::write(shared.path().join("node-args"), node_args).unwrap();
    let cmd = format!("{} {}", guest_driver_bin().display(), shared.path().display());
    let (rc, out) = in_guest(&cmd, &[shared.path()]);
    assert_eq!(
        rc,
        0,
        "guest side failed:\n{out}\ntarget log:\n{}\nholder log:\n{}",
        target.log_text(),
        holder.log_text()
    );
    assert!(out.contains("guest side: all steps passed"), "{out}");
    assert!(target.log_text().contains("target: serving a volume held by another node"), "{}", target.log_text());
    let on_holder = holder.volume_json("remote-block");
    assert!(on_holder["allocated_bytes"].as_u64().unwrap() >= 16 * MIB as u64, "{on_holder}");
    assert_eq!(on_holder["target_node"], "target");
}

/// Replication through a real kernel: a volume with two copies (thinbd "a" and "b" on one
/// etcd), attached in the guest through "a" (its target, holding a copy); while fio writes
/// with verification, "b" is killed (kill -9) and started again. The I/O goes on (one copy in
/// sync is enough for two copies), fio's verification passes, and "b"'s copy is rebuilt from
/// the mark "a" took when it left and rejoins the in-sync set.
#[test]
fn kernel_fio_verifies_on_a_replicated_volume_while_a_copy_restarts() {
    if !guest_available() || !thinbd_tests::require("etcd") {
        return;
    }
    let etcd = thinbd_tests::netns::Etcd::start_local();
    let cluster = ["--etcd", etcd.endpoint.as_str(), "--node-lease-ttl", "3", "--require-grants"];
    let a =
        Server::start_with(&[&cluster[..], &["--node-name", "a", "--advertise-nbd", "10.0.2.2:{nbd_port}"]].concat());
    let mut b = Server::start_with(&[&cluster[..], &["--node-name", "b"]].concat());
    let shared = tempfile::tempdir().unwrap();
    let create = thinbd_api::pb::CreateVolumeRequest {
        name: "replicated".into(),
        size_bytes: 64 * MIB as u64,
        replicas: 2,
        ..Default::default()
    };
    plan_cluster_block(a.api_port, 2, create, shared.path());
    // Through "a" whichever node the publish context names.
    let node_args = format!("--attach-via-local-target --thinbd-api 10.0.2.2:{}", a.api_port);
    std::fs::write(shared.path().join("node-args"), node_args).unwrap();
    let cmd = format!("{} {}", guest_driver_bin().display(), shared.path().display());
    let dir = shared.path().to_path_buf();
    let guest = std::thread::spawn(move || in_guest(&cmd, &[&dir]));
    // Once fio is writing: "b" killed, then back.
    let mut restarted = false;
    while !guest.is_finished() {
        if !restarted && a.volume_json("replicated")["allocated_bytes"].as_u64() >= Some(2 * MIB as u64) {
            b.kill9();
            std::thread::sleep(std::time::Duration::from_secs(1));
            b.spawn();
            restarted = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (rc, out) = guest.join().unwrap();
    assert!(restarted, "fio never wrote (the copy was not restarted during it):\n{out}");
    assert_eq!(rc, 0, "guest side failed:\n{out}\na's log:\n{}\nb's log:\n{}", a.log_text(), b.log_text());
    assert!(out.contains("guest side: all steps passed"), "{out}");
    let log = a.log_text();
    assert!(log.contains("replica left the in-sync set"), "b never left the in-sync set:\n{log}");
    assert!(log.contains("copy rebuilt and back in sync"), "b's copy was not rebuilt while attached:\n{log}");
    let v = a.volume_json("replicated");
    let mut in_sync: Vec<String> = serde_json::from_value(v["in_sync"].clone()).unwrap();
    in_sync.sort();
    assert_eq!(in_sync, ["a", "b"], "{v}");
    assert_eq!(v["target_node"], "a", "{v}");
}
