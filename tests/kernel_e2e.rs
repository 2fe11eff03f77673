//! Real-kernel end-to-end: thinbd and the CSI controller run on the host, the CSI node plugin
//! runs inside a qemu guest whose kernel has nbd.ko (tests/vm/guest.sh), and this same test
//! binary, started again inside the guest, drives the node plugin over its unix socket:
//! raw block with fio verification, ext4 format-once across unstage/stage, single-workload
//! refusal, unpublish of a busy volume, volume stats, and the device going away at unstage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use thinbd_protocol::csi::controller_client::ControllerClient;
use thinbd_protocol::csi::node_client::NodeClient;
use thinbd_protocol::csi::volume_capability::access_mode::Mode;
use thinbd_protocol::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use thinbd_protocol::csi::*;
use thinbd_tests::{CsiPlugin, Server, guest_available, in_guest, runtime};

const MIB: i64 = 1 << 20;

fn cap(mode: Mode, fs: Option<&str>) -> VolumeCapability {
    let access = match fs {
        None => AccessType::Block(BlockVolume {}),
        Some(f) => AccessType::Mount(MountVolume { fs_type: f.into(), ..Default::default() }),
    };
    VolumeCapability { access_type: Some(access), access_mode: Some(AccessMode { mode: mode as i32 }) }
}

/// What the host prepared for the guest: per volume, its id and publish context.
fn write_plan(dir: &Path, plan: &[(&str, String, HashMap<String, String>)]) {
    let mut text = String::new();
    for (role, id, ctx) in plan {
        text.push_str(&format!("{role}\t{id}\t{}\t{}\n", ctx["thinbd.csi.io/export"], ctx["thinbd.csi.io/nbd"]));
    }
    std::fs::write(dir.join("plan.tsv"), text).unwrap();
}

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

#[test]
fn node_plugin_attaches_formats_and_mounts_through_the_kernel() {
    if !guest_available() {
        return;
    }
    let server =
        Server::start_with(&["--require-grants", "--node-name", "host", "--advertise-nbd", "10.0.2.2:{nbd_port}"]);
    let plugin = CsiPlugin::start("controller", &format!("127.0.0.1:{}", server.api_port), "host");
    let shared = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut ctl = ControllerClient::new(plugin.channel().await);
        let mut plan = Vec::new();
        for (role, fs, mode) in [
            ("block", None, Mode::SingleNodeSingleWriter),
            ("ext4", Some("ext4"), Mode::SingleNodeWriter),
            ("xfs", Some("xfs"), Mode::SingleNodeWriter),
        ] {
            let v = ctl
                .create_volume(CreateVolumeRequest {
                    name: format!("pvc-{role}"),
                    capacity_range: Some(CapacityRange { required_bytes: 512 * MIB, limit_bytes: 0 }),
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
            assert_eq!(ctx["thinbd.csi.io/nbd"], format!("10.0.2.2:{}", server.nbd_port));
            plan.push((role, v.volume_id, ctx));
        }
        write_plan(shared.path(), &plan);
    });
    let exe = std::env::current_exe().unwrap();
    let cmd = format!(
        "THINBD_GUEST_DIR={dir} {exe} guest_side --ignored --exact --nocapture --test-threads=1",
        dir = shared.path().display(),
        exe = exe.display()
    );
    let (rc, out) = in_guest(&cmd, &[shared.path()]);
    assert_eq!(rc, 0, "guest side failed:\n{out}\nserver log:\n{}", server.log_text());
    assert!(out.contains("guest side: all steps passed"), "{out}");
    // The kernel wrote through thinbd: the block volume holds fio's data.
    let v = server.volume_json("pvc-block");
    assert!(v["allocated_bytes"].as_u64().unwrap() >= 32 << 20, "{v}");
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

/// Runs inside the guest (started by the test above).
#[test]
#[ignore]
fn guest_side() {
    let Ok(dir) = std::env::var("THINBD_GUEST_DIR") else { return };
    let dir = PathBuf::from(dir);
    let plan = read_plan(&dir);
    let node = CsiPlugin::start("node", "unused:1", "guest");
    let work = PathBuf::from("/run/thinbd-e2e");
    std::fs::create_dir_all(&work).unwrap();
    runtime().block_on(async {
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
        let err = n.node_publish_volume(publish("block", None, m, "block-other")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "second workload on a single-writer volume");
        let target = work.join("block-target");
        sh(&format!(
            "fio --name=v --filename={} --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 --size=32M \
             --verify=crc32c --verify_fatal=1 --verify_state_save=0 --output=/dev/null",
            target.display()
        ));
        let stats = n
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: plan["block"].0.clone(),
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.usage[0].total, 512 * MIB);
        assert!(!stats.volume_condition.unwrap().abnormal);
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
            let st = n
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: plan[fs].0.clone(),
                    volume_path: work.join(format!("{fs}-pod")).display().to_string(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(st.usage.len(), 2, "bytes and inodes");
            assert!(st.usage[0].total > 400 * MIB && st.usage[1].total > 0);
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
