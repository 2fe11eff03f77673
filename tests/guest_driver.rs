//! `thinbd-e2e-guest DIR`: the guest half of tests/kernel_e2e.rs. Runs inside the qemu guest,
//! starts the CSI node plugin there and drives it over its unix socket through the plan the
//! host wrote to DIR/plan.tsv; prints "guest side: all steps passed" and exits 0 on success,
//! panics (exit 101) on the first failed step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use thinbd_api::csi::node_client::NodeClient;
use thinbd_api::csi::volume_capability::access_mode::Mode;
use thinbd_api::csi::*;
use thinbd_tests::{CsiPlugin, csi_cap as cap, runtime};

const MIB: i64 = 1 << 20;

fn read_plan(dir: &Path) -> HashMap<String, (String, HashMap<String, String>)> {
    std::fs::read_to_string(dir.join("plan.tsv"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let ctx = HashMap::from([
                ("thinbd.csi.io/export".to_string(), f[2].to_string()),
                ("thinbd.csi.io/nbd".to_string(), f[3].to_string()),
            ]);
            (f[0].to_string(), (f[1].to_string(), ctx))
        })
        .collect()
}

async fn node_client(sock: &CsiPlugin) -> NodeClient<tonic::transport::Channel> {
    NodeClient::new(sock.channel().await)
}

fn sh(cmd: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: thinbd-e2e-guest DIR (run by tests/kernel_e2e.rs inside the qemu guest)");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    if let Ok(args) = std::fs::read_to_string(dir.join("node-args")) {
        one_block(&dir, args.split_whitespace().collect());
        return;
    }
    let plan = read_plan(&dir);
    let api = std::fs::read_to_string(dir.join("api")).unwrap();
    let api_addr = api.trim_start_matches("http://").to_string();
    let mut node = CsiPlugin::start("node", &api_addr, "guest");
    let work = PathBuf::from("/run/thinbd-e2e");
    std::fs::create_dir_all(&work).unwrap();
    runtime().block_on(async {
        // The kernel here has the nbd driver: the node service reports ready.
        let mut ident = thinbd_api::csi::identity_client::IdentityClient::new(node.channel().await);
        assert_eq!(ident.probe(ProbeRequest {}).await.expect("probe").into_inner().ready, Some(true));
        let mut n = node_client(&node).await;
        let stage = |role: &str, fs: Option<&str>, mode: Mode| {
            let (id, ctx) = plan[role].clone();
            NodeStageVolumeRequest {
                volume_id: id,
                publish_context: ctx,
                staging_target_path: work.join(format!("staging-{role}")).display().to_string(),
                volume_capability: Some(cap(mode, fs)),
                ..Default::default()
            }
        };
        let publish = |role: &str, fs: Option<&str>, mode: Mode, target: &str| NodePublishVolumeRequest {
            volume_id: plan[role].0.clone(),
            staging_target_path: work.join(format!("staging-{role}")).display().to_string(),
            target_path: work.join(target).display().to_string(),
            volume_capability: Some(cap(mode, fs)),
            ..Default::default()
        };
        let unpublish = |role: &str, target: &str| NodeUnpublishVolumeRequest {
            volume_id: plan[role].0.clone(),
            target_path: work.join(target).display().to_string(),
        };
        let unstage = |role: &str| NodeUnstageVolumeRequest {
            volume_id: plan[role].0.clone(),
            staging_target_path: work.join(format!("staging-{role}")).display().to_string(),
        };

        // Raw block: stage twice (idempotent), publish, fio with verification.
        let m = Mode::SingleNodeSingleWriter;
        n.node_stage_volume(stage("block", None, m)).await.expect("stage block");
        n.node_stage_volume(stage("block", None, m)).await.expect("stage block again");
        n.node_publish_volume(publish("block", None, m, "block-target")).await.expect("publish block");
        // The plugin restarts: the attached device is found again by its backend identifier,
        // and the existing publish is seen in the mount table.
        drop(node);
        node = CsiPlugin::start("node", &api_addr, "guest");
        let mut n = node_client(&node).await;
        n.node_stage_volume(stage("block", None, m)).await.expect("stage after a plugin restart");
        assert_eq!(
            std::fs::read_dir("/sys/block").unwrap().filter(|e| {
                let p = e.as_ref().unwrap().path().join("backend");
                std::fs::read_to_string(p).is_ok_and(|b| b.trim() == format!("thinbd:{}", plan["block"].0))
            }).count(),
            1,
            "one device per volume, also after a restart"
        );
        n.node_publish_volume(publish("block", None, m, "block-target")).await.expect("publish again after a restart");
        let err = n.node_publish_volume(publish("block", None, m, "block-other")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "second workload on a single-writer volume");
        let target = work.join("block-target");
        sh(&format!(
            "fio --name=v --filename={} --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 --size=32M \
             --verify=crc32c --verify_fatal=1 --verify_state_save=0 --output=/dev/null",
            target.display()
        ));
        let st = stats(&mut n, &plan["block"].0, &target).await;
        assert_eq!(st.usage[0].total, 512 * MIB);
        assert!(!st.volume_condition.unwrap().abnormal);
        // thinbd restarts in the middle of a write: the kernel holds the I/O, the node plugin
        // reconnects the device, fio finishes and reads back every block it wrote.
        let mut fio = Command::new("fio")
            .args(["--name=restart", "--direct=1", "--ioengine=libaio", "--rw=write", "--bs=64k", "--iodepth=4"])
            .args(["--size=96M", "--rate=6m", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0"])
            .arg(format!("--filename={}", target.display()))
            .arg("--output=/dev/null")
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));
        std::fs::write(dir.join("restart-now"), b"").unwrap();
        let t0 = std::time::Instant::now();
        while !dir.join("restarted").exists() {
            assert!(t0.elapsed().as_secs() < 60, "the host did not restart thinbd");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let status = fio.wait().unwrap();
        assert!(status.success(), "fio across the restart failed: {status}");
        println!("fio across a thinbd restart: ok ({} s)", t0.elapsed().as_secs());
        n.node_unpublish_volume(unpublish("block", "block-target")).await.expect("unpublish block");
        n.node_unpublish_volume(unpublish("block", "block-target")).await.expect("unpublish again");
        n.node_unstage_volume(unstage("block")).await.expect("unstage block");
        assert!(thinbd_csi_device(&plan["block"].0).is_none(), "device still attached after unstage");

        // Filesystems: format once, files survive unstage + stage, stats, busy unpublish.
        for fs in ["ext4", "xfs"] {
            let m = Mode::SingleNodeWriter;
            n.node_stage_volume(stage(fs, Some(fs), m)).await.unwrap_or_else(|e| panic!("stage {fs}: {e}"));
            n.node_publish_volume(publish(fs, Some(fs), m, &format!("{fs}-pod"))).await.expect("publish fs");
            let file = work.join(format!("{fs}-pod/hello"));
            std::fs::write(&file, b"still here").unwrap();
            sh("sync");
            // Restore a snapshot of the live filesystem, and clone the live volume: each new
            // volume is attached, mounted and holds the file.
            let api = std::fs::read_to_string(dir.join("api")).unwrap();
            let mut mgmt = thinbd_api::pb::management_client::ManagementClient::connect(api.clone()).await.unwrap();
            // The volume id is its UUID; the management API answers with its name.
            let name = mgmt
                .get_volume(thinbd_api::pb::GetVolumeRequest { name: plan[fs].0.clone() })
                .await
                .unwrap()
                .into_inner()
                .name;
            mgmt.create_snapshot(thinbd_api::pb::CreateSnapshotRequest { volume: name.clone(), name: "s1".into(), ..Default::default() })
                .await
                .unwrap();
            for (source, copy) in [(format!("{name}@s1"), format!("{name}-restored")), (name.clone(), format!("{name}-clone"))] {
                mgmt.clone_volume(thinbd_api::pb::CloneVolumeRequest { source, name: copy.clone(), ..Default::default() })
                    .await
                    .unwrap();
                attach_and_read(&mut n, &mut mgmt, &plan[fs], &copy, fs, &work).await;
            }
            let st = stats(&mut n, &plan[fs].0, &work.join(format!("{fs}-pod"))).await;
            assert_eq!(st.usage.len(), 2, "bytes and inodes");
            assert!(st.usage[0].total > 400 * MIB && st.usage[0].total < 512 * MIB && st.usage[1].total > 0);
            // Online expansion: the server grows the volume, the node grows device and filesystem.
            mgmt.resize_volume(thinbd_api::pb::ResizeVolumeRequest { name, size_bytes: (1024 * MIB) as u64 }).await.unwrap();
            let grown = n
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: plan[fs].0.clone(),
                    volume_path: work.join(format!("{fs}-pod")).display().to_string(),
                    capacity_range: Some(CapacityRange { required_bytes: 1024 * MIB, limit_bytes: 0 }),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| {
                    let dbg = Command::new("bash").arg("-c").arg("grep . /sys/block/nbd[0-9]*/size | grep -v ':0$'; for d in /dev/nbd[0-3]; do blockdev --getsize64 $d; done; dmesg | tail -5").output().unwrap();
                    panic!("expand {fs}: {e}\n{}", String::from_utf8_lossy(&dbg.stdout))
                })
                .into_inner();
            assert_eq!(grown.capacity_bytes, 1024 * MIB);
            let st = stats(&mut n, &plan[fs].0, &work.join(format!("{fs}-pod"))).await;
            assert!(st.usage[0].total > 900 * MIB, "{fs} did not grow: {}", st.usage[0].total);
            // Busy: a process holds a file open on the mount: retryable error, data kept.
            let mut holder =
                Command::new("sleep").arg("30").current_dir(work.join(format!("{fs}-pod"))).spawn().unwrap();
            let busy = n.node_unpublish_volume(unpublish(fs, &format!("{fs}-pod"))).await.unwrap_err();
            assert_eq!(busy.code(), tonic::Code::Unavailable, "{busy:?}");
            holder.kill().unwrap();
            holder.wait().unwrap();
            n.node_unpublish_volume(unpublish(fs, &format!("{fs}-pod"))).await.expect("unpublish fs");
            n.node_unstage_volume(unstage(fs)).await.expect("unstage fs");
            n.node_stage_volume(stage(fs, Some(fs), m)).await.expect("stage fs again");
            n.node_publish_volume(publish(fs, Some(fs), m, &format!("{fs}-pod2"))).await.expect("publish again");
            assert_eq!(
                std::fs::read(work.join(format!("{fs}-pod2/hello"))).unwrap(),
                b"still here",
                "{fs} was reformatted"
            );
            n.node_unpublish_volume(unpublish(fs, &format!("{fs}-pod2"))).await.unwrap();
            n.node_unstage_volume(unstage(fs)).await.unwrap();
        }
        // A CSI inline ephemeral volume: NodePublish alone creates, attaches, formats and
        // mounts it; NodeUnpublish deletes it.
        let mut mgmt = thinbd_api::pb::management_client::ManagementClient::connect(api.clone()).await.unwrap();
        let eph = NodePublishVolumeRequest {
            volume_id: "csi-eph-1".into(),
            target_path: work.join("eph-pod").display().to_string(),
            volume_capability: Some(cap(Mode::SingleNodeWriter, Some("ext4"))),
            volume_context: HashMap::from([
                ("csi.storage.k8s.io/ephemeral".to_string(), "true".to_string()),
                ("size".to_string(), "256Mi".to_string()),
            ]),
            ..Default::default()
        };
        n.node_publish_volume(eph.clone()).await.expect("publish inline ephemeral");
        n.node_publish_volume(eph.clone()).await.expect("publish inline ephemeral again");
        std::fs::write(work.join("eph-pod/scratch"), b"tmp").unwrap();
        let v = mgmt.get_volume(thinbd_api::pb::GetVolumeRequest { name: "eph-csi-eph-1".into() }).await.unwrap().into_inner();
        assert_eq!(v.size_bytes, 256 << 20);
        n.node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: "csi-eph-1".into(), target_path: eph.target_path.clone() })
            .await
            .expect("unpublish inline ephemeral");
        let gone = mgmt.get_volume(thinbd_api::pb::GetVolumeRequest { name: "eph-csi-eph-1".into() }).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound, "the ephemeral volume outlived its pod");

        // A volume formatted as ext4 is never reformatted as xfs.
        let wrong = n.node_stage_volume(stage("ext4", Some("xfs"), Mode::SingleNodeWriter)).await.unwrap_err();
        assert!(wrong.message().contains("not reformatted"), "{wrong:?}");
        n.node_unstage_volume(unstage("ext4")).await.unwrap();
    });
    println!("guest side: all steps passed");
}

/// The attached device for a volume id, looked up the way the plugin does.
fn thinbd_csi_device(volume_id: &str) -> Option<u32> {
    thinbd_csi::attach::find(volume_id)
}

/// Grants the guest `volume` (a restore or clone of `like`'s volume), stages it with `fs` and
/// checks the file the source held.
async fn attach_and_read(
    n: &mut NodeClient<tonic::transport::Channel>,
    mgmt: &mut thinbd_api::pb::management_client::ManagementClient<tonic::transport::Channel>,
    like: &(String, HashMap<String, String>),
    volume: &str,
    fs: &str,
    work: &Path,
) {
    let grant = mgmt
        .publish_volume(thinbd_api::pb::PublishVolumeRequest {
            volume: volume.into(),
            node: "guest".into(),
            read_only: false,
            single_writer: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A CSI volume id is the volume's UUID.
    let id = mgmt.get_volume(thinbd_api::pb::GetVolumeRequest { name: volume.into() }).await.unwrap().into_inner().uuid;
    let mut ctx = like.1.clone();
    ctx.insert("thinbd.csi.io/export".into(), grant.export_name);
    let staging = work.join(format!("staging-{volume}")).display().to_string();
    n.node_stage_volume(NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: ctx,
        staging_target_path: staging.clone(),
        volume_capability: Some(cap(Mode::SingleNodeWriter, Some(fs))),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stage {volume}: {e}"));
    assert_eq!(std::fs::read(Path::new(&staging).join("hello")).unwrap(), b"still here", "{volume} lacks the file");
    n.node_unstage_volume(NodeUnstageVolumeRequest { volume_id: id, staging_target_path: staging }).await.unwrap();
}

/// One raw block volume (the plan's "block"), attached by the node plugin started with
/// `node_args` (the TLS run: STARTTLS handed to kernel TLS; the target run: through a thinbd
/// that forwards to the one holding the data); fio writes and verifies through it.
fn one_block(dir: &Path, node_args: Vec<&str>) {
    let plan = read_plan(dir);
    // `--thinbd-api ADDR` among the arguments is the plugin's API (else none is needed).
    let api = node_args.iter().position(|a| *a == "--thinbd-api").and_then(|i| node_args.get(i + 1)).copied();
    let extra: Vec<&str> = match node_args.iter().position(|a| *a == "--thinbd-api") {
        Some(i) => node_args.iter().enumerate().filter(|(j, _)| *j != i && *j != i + 1).map(|(_, a)| *a).collect(),
        None => node_args.clone(),
    };
    let node = CsiPlugin::start_with("node", api.unwrap_or("unused:1"), "guest", &extra);
    let work = PathBuf::from("/run/thinbd-e2e-tls");
    std::fs::create_dir_all(&work).unwrap();
    runtime().block_on(async {
        let mut n = node_client(&node).await;
        let (id, ctx) = plan["block"].clone();
        let m = Mode::SingleNodeWriter;
        let staging = work.join("staging").display().to_string();
        n.node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.clone(),
            publish_context: ctx,
            staging_target_path: staging.clone(),
            volume_capability: Some(cap(m, None)),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("stage: {e}\n{}", node.log_text()));
        let target = work.join("dev");
        n.node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap(m, None)),
            ..Default::default()
        })
        .await
        .expect("publish");
        sh(&format!(
            "fio --name=block --filename={} --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=8 --size=16M \
             --verify=crc32c --verify_fatal=1 --verify_state_save=0 --output=/dev/null",
            target.display()
        ));
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
        n.node_unstage_volume(NodeUnstageVolumeRequest { volume_id: id, staging_target_path: staging }).await.unwrap();
    });
    println!("guest side: all steps passed");
}

async fn stats(
    n: &mut NodeClient<tonic::transport::Channel>,
    volume_id: &str,
    path: &Path,
) -> NodeGetVolumeStatsResponse {
    n.node_get_volume_stats(NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: path.display().to_string(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}
