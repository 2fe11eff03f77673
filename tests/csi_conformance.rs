//! CSI conformance, written from the CSI spec (v1.9): every Identity and Controller RPC and the
//! node's identity RPCs, driven over the plugin's unix socket against a real thinbd, including
//! idempotency, the spec's error codes and bad arguments. Attachment through the published
//! export is checked with a real NBD client under `--require-grants`.

use std::collections::HashMap;

use thinbd_api::csi::controller_client::ControllerClient;
use thinbd_api::csi::identity_client::IdentityClient;
use thinbd_api::csi::node_client::NodeClient;
use thinbd_api::csi::volume_capability::access_mode::Mode;
use thinbd_api::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use thinbd_api::csi::*;
use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_tests::{CsiPlugin, Server, runtime};
use tonic::Code;
use tonic::transport::Channel;

const NODE: &str = "csi-test-node";
const MIB: i64 = 1 << 20;

fn cap(mode: Mode, block: bool) -> VolumeCapability {
    let access = if block {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })
    };
    VolumeCapability { access_type: Some(access), access_mode: Some(AccessMode { mode: mode as i32 }) }
}

fn range(req: i64, lim: i64) -> Option<CapacityRange> {
    Some(CapacityRange { required_bytes: req, limit_bytes: lim })
}

fn create_req(name: &str, size: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter, false)],
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

struct Env {
    server: Server,
    _plugin: CsiPlugin,
    ctl: ControllerClient<Channel>,
    ident: IdentityClient<Channel>,
    node: NodeClient<Channel>,
}

async fn env() -> Env {
    let server = Server::start_with(&["--require-grants", "--node-name", NODE]);
    let plugin = CsiPlugin::start("all", &format!("127.0.0.1:{}", server.api_port), NODE);
    let ch = plugin.channel().await;
    Env {
        server,
        ctl: ControllerClient::new(ch.clone()),
        ident: IdentityClient::new(ch.clone()),
        node: NodeClient::new(ch),
        _plugin: plugin,
    }
}

async fn create(e: &mut Env, name: &str, size: i64) -> Volume {
    e.ctl.create_volume(create_req(name, size)).await.expect("create").into_inner().volume.expect("volume")
}

#[test]
fn identity_and_node_info() {
    runtime().block_on(async {
        let mut e = env().await;
        let info = e.ident.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.name, "thinbd.csi.io");
        assert!(!info.vendor_version.is_empty());
        let caps = e.ident.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
        let services: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        assert!(services.contains(&(plugin_capability::service::Type::ControllerService as i32)));
        assert!(services.contains(&(plugin_capability::service::Type::VolumeAccessibilityConstraints as i32)));
        assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
            Some(plugin_capability::Type::VolumeExpansion(v)) if v.r#type == plugin_capability::volume_expansion::Type::Online as i32)));
        // The node service is ready only where the kernel can attach NBD devices: not on this
        // host (no nbd module; the guest of kernel_e2e checks the ready side).
        let probe = e.ident.probe(ProbeRequest {}).await;
        if std::path::Path::new("/sys/module/nbd").exists() {
            assert_eq!(probe.unwrap().into_inner().ready, Some(true));
        } else {
            let s = probe.expect_err("ready without the nbd driver");
            assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
            assert!(s.message().contains("nbd netlink family") && s.message().contains("modprobe nbd"), "{s:?}");
        }

        let ni = e.node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(ni.node_id, NODE);
        assert!(ni.max_volumes_per_node > 0);
        assert_eq!(ni.accessible_topology.unwrap().segments["topology.thinbd.csi.io/node"], NODE);
        let nc = e.node.node_get_capabilities(NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
        let rpcs: Vec<i32> = nc
            .capabilities
            .iter()
            .filter_map(|c| c.r#type.as_ref().map(|node_service_capability::Type::Rpc(r)| r.r#type))
            .collect();
        for want in [node_service_capability::rpc::Type::StageUnstageVolume, node_service_capability::rpc::Type::SingleNodeMultiWriter]
        {
            assert!(rpcs.contains(&(want as i32)), "{want:?}");
        }
        let cc = e.ctl.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
        assert_eq!(cc.capabilities.len(), 14);

        // A node plugin on another node registers that node when kubelet asks for its info;
        // the registration is in the metadata and survives a restart of the storage server.
        let worker = CsiPlugin::start("node", &format!("127.0.0.1:{}", e.server.api_port), "worker-1");
        let mut wn = NodeClient::new(worker.channel().await);
        assert_eq!(wn.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner().node_id, "worker-1");
        e.server.stop();
        e.server.spawn();
        let listed: serde_json::Value = serde_json::from_str(&e.server.cli(&["node", "list", "-o", "json"])).unwrap();
        let w = listed["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "worker-1").expect("worker-1").clone();
        assert_eq!((w["storage"].as_bool(), w["up"].as_bool()), (Some(false), Some(true)));

        // The controller's Probe reports a dead storage server as an error, not as ready.
        let controller = CsiPlugin::start("controller", &format!("127.0.0.1:{}", e.server.api_port), NODE);
        let mut ci = IdentityClient::new(controller.channel().await);
        assert_eq!(ci.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
        drop(e.server);
        assert!(ci.probe(ProbeRequest {}).await.is_err());
    });
}

#[test]
fn create_delete_are_idempotent_with_spec_errors() {
    runtime().block_on(async {
        let mut e = env().await;
        // Bad arguments.
        assert_eq!(code(e.ctl.create_volume(create_req("", MIB)).await), Code::InvalidArgument);
        let mut r = create_req("v1", MIB);
        r.volume_capabilities.clear();
        assert_eq!(code(e.ctl.create_volume(r).await), Code::InvalidArgument);
        let mut r = create_req("v1", MIB);
        r.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter, false)];
        assert_eq!(code(e.ctl.create_volume(r).await), Code::InvalidArgument, "multi-writer filesystem");
        let mut r = create_req("v1", MIB);
        r.volume_capabilities[0].access_type =
            Some(AccessType::Mount(MountVolume { fs_type: "zfs".into(), ..Default::default() }));
        assert_eq!(code(e.ctl.create_volume(r).await), Code::InvalidArgument);
        let mut r = create_req("v1", MIB);
        r.parameters = HashMap::from([("colour".into(), "blue".into())]);
        let err = e.ctl.create_volume(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("unknown StorageClass parameter"), "{}", err.message());
        let mut r = create_req("v1", MIB);
        r.parameters = HashMap::from([("csi.storage.k8s.io/pvc/name".into(), "x".into())]);
        r.capacity_range = range(5000, 6000);
        assert_eq!(code(e.ctl.create_volume(r).await), Code::OutOfRange);

        // The claim csi-provisioner names (--extra-create-metadata) is shown with the volume.
        let mut r = create_req("pvc-claimed", MIB);
        r.parameters = HashMap::from([
            ("csi.storage.k8s.io/pvc/name".into(), "data-db-0".into()),
            ("csi.storage.k8s.io/pvc/namespace".into(), "prod".into()),
            ("csi.storage.k8s.io/pv/name".into(), "pvc-claimed".into()),
        ]);
        e.ctl.create_volume(r).await.unwrap();
        let claimed = e.server.volume_json("pvc-claimed");
        assert_eq!(claimed["labels"]["kubernetes.pvc-name"], "data-db-0", "{claimed}");
        assert_eq!(claimed["labels"]["kubernetes.pvc-namespace"], "prod", "{claimed}");
        assert!(e.server.cli(&["volume", "show", "pvc-claimed"]).contains("claim:     prod/data-db-0"));
        assert!(e.server.cli(&["volume", "list"]).contains("prod/data-db-0"));

        // Create, again (same answer), then incompatibly.
        let v = create(&mut e, "pvc-1", 10 * MIB).await;
        assert_eq!(v.capacity_bytes, 10 * MIB);
        // The id is the volume's UUID: it names no node.
        let uuid = e.server.volume_json("pvc-1")["uuid"].as_str().expect("uuid").to_string();
        assert_eq!(v.volume_id, uuid);
        assert_eq!(v.accessible_topology[0].segments["topology.thinbd.csi.io/node"], NODE);
        let again = create(&mut e, "pvc-1", 10 * MIB).await;
        assert_eq!(again.volume_id, v.volume_id);
        assert_eq!(code(e.ctl.create_volume(create_req("pvc-1", 20 * MIB)).await), Code::AlreadyExists);
        let json = e.server.volume_json("pvc-1");
        assert_eq!(json["size_bytes"], 10 * MIB, "exactly one volume, the first size");
        // A name thinbd cannot use as it is still works, and maps to the same volume each time.
        let odd = create(&mut e, "Weird Name/β", MIB).await;
        assert_eq!(create(&mut e, "Weird Name/β", MIB).await.volume_id, odd.volume_id);

        // Topology: a requisite set without this storage node cannot be served.
        let mut r = create_req("pvc-2", MIB);
        r.accessibility_requirements = Some(TopologyRequirement {
            requisite: vec![Topology {
                segments: HashMap::from([("topology.thinbd.csi.io/node".into(), "elsewhere".into())]),
            }],
            preferred: vec![],
        });
        assert_eq!(code(e.ctl.create_volume(r).await), Code::ResourceExhausted);

        // Delete: missing id is invalid; unknown ids and repeats are fine.
        assert_eq!(
            code(e.ctl.delete_volume(DeleteVolumeRequest { volume_id: "".into(), ..Default::default() }).await),
            Code::InvalidArgument
        );
        for id in [v.volume_id.clone(), v.volume_id.clone(), format!("{NODE}/nope"), "garbage".into()] {
            e.ctl
                .delete_volume(DeleteVolumeRequest { volume_id: id, ..Default::default() })
                .await
                .expect("delete is idempotent");
        }
        let out = e.server.cli_output(&["volume", "show", "pvc-1"]);
        assert!(!out.status.success(), "volume still exists");
    });
}

#[test]
fn publish_grants_an_export_and_enforces_writers() {
    runtime().block_on(async {
        let mut e = env().await;
        let v = create(&mut e, "pvc-pub", 4 * MIB).await;
        let pubreq = |node: &str, mode: Mode, ro: bool| ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node.into(),
            volume_capability: Some(cap(mode, true)),
            readonly: ro,
            ..Default::default()
        };
        // Bad arguments and unknown volume.
        let mut r = pubreq("n1", Mode::SingleNodeWriter, false);
        r.volume_capability = None;
        assert_eq!(code(e.ctl.controller_publish_volume(r).await), Code::InvalidArgument);
        assert_eq!(
            code(e.ctl.controller_publish_volume(pubreq("", Mode::SingleNodeWriter, false)).await),
            Code::InvalidArgument
        );
        let mut r = pubreq("n1", Mode::SingleNodeWriter, false);
        r.volume_id = format!("{NODE}/missing");
        assert_eq!(code(e.ctl.controller_publish_volume(r).await), Code::NotFound);
        // A node that never registered (its node plugin calls RegisterNode) does not exist.
        let err = e.ctl.controller_publish_volume(pubreq("n1", Mode::SingleNodeWriter, false)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        for n in ["n1", "n2", "n3"] {
            e.server.cli(&["node", "register", n]);
        }
        // The storage node itself always exists; NodeGetInfo registered the plugin's node.
        let listed: serde_json::Value = serde_json::from_str(&e.server.cli(&["node", "list", "-o", "json"])).unwrap();
        let names: Vec<&str> =
            listed["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
        assert_eq!(names, [NODE, "n1", "n2", "n3"]);
        assert_eq!(listed["clustered"], false);

        let ctx = e
            .ctl
            .controller_publish_volume(pubreq("n1", Mode::SingleNodeWriter, false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        let export = ctx["thinbd.csi.io/export"].clone();
        assert!(export.starts_with("pvc-pub#"), "{export}");
        assert_eq!(ctx["thinbd.csi.io/nbd"], e.server.addr());
        let again =
            e.ctl.controller_publish_volume(pubreq("n1", Mode::SingleNodeWriter, false)).await.unwrap().into_inner();
        assert_eq!(again.publish_context["thinbd.csi.io/export"], export, "idempotent");
        assert_eq!(
            code(e.ctl.controller_publish_volume(pubreq("n1", Mode::SingleNodeWriter, true)).await),
            Code::AlreadyExists
        );
        assert_eq!(
            code(e.ctl.controller_publish_volume(pubreq("n2", Mode::SingleNodeWriter, false)).await),
            Code::FailedPrecondition
        );
        let ro =
            e.ctl.controller_publish_volume(pubreq("n2", Mode::MultiNodeReaderOnly, false)).await.unwrap().into_inner();

        // The export works for a real NBD client; the name alone does not.
        let c = Client::connect(e.server.addr(), ClientOptions::new(&export)).await.expect("granted export opens");
        c.write(0, b"csi", 0).await.unwrap();
        c.flush().await.unwrap();
        assert!(Client::connect(e.server.addr(), ClientOptions::new("pvc-pub")).await.is_err());
        let r = Client::connect(e.server.addr(), ClientOptions::new(&ro.publish_context["thinbd.csi.io/export"]))
            .await
            .unwrap();
        assert_eq!(r.read(0, 3).await.unwrap(), b"csi");
        assert!(r.write(0, b"x", 0).await.is_err(), "reader wrote");
        r.disconnect().await.unwrap();

        // Status shows both nodes.
        let got = e
            .ctl
            .controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() })
            .await
            .unwrap()
            .into_inner();
        let mut nodes = got.status.as_ref().unwrap().published_node_ids.clone();
        nodes.sort();
        assert_eq!(nodes, ["n1", "n2"]);
        assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);

        // Deleting a published volume fails; unpublish is idempotent and ends the session.
        assert_eq!(
            code(
                e.ctl.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await
            ),
            Code::FailedPrecondition
        );
        let unpub = |node: &str| ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node.into(),
            ..Default::default()
        };
        e.ctl.controller_unpublish_volume(unpub("n1")).await.unwrap();
        e.ctl.controller_unpublish_volume(unpub("n1")).await.unwrap();
        let mut ended = false;
        for _ in 0..50 {
            if c.read(0, 1).await.is_err() {
                ended = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(ended, "session outlived ControllerUnpublishVolume");
        // Now another node may write.
        e.ctl
            .controller_publish_volume(pubreq("n3", Mode::SingleNodeSingleWriter, false))
            .await
            .expect("writer after unpublish");
        // Empty node id: unpublish everywhere.
        e.ctl.controller_unpublish_volume(unpub("")).await.unwrap();
        assert!(e.server.volume_json("pvc-pub")["published_nodes"].as_array().unwrap().is_empty());
        e.ctl.controller_unpublish_volume(unpub("n1")).await.expect("unpublishing again is fine");
        e.ctl
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: format!("{NODE}/gone"),
                node_id: "n1".into(),
                ..Default::default()
            })
            .await
            .expect("unknown volume is unpublished");
        assert_eq!(
            code(e.ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default()).await),
            Code::InvalidArgument
        );
        e.ctl
            .delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() })
            .await
            .unwrap();
    });
}

#[test]
fn validate_list_get_and_capacity() {
    runtime().block_on(async {
        let mut e = env().await;
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(create(&mut e, &format!("pvc-l{i}"), MIB).await.volume_id);
        }
        // ValidateVolumeCapabilities.
        let val = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
        let ok = e
            .ctl
            .validate_volume_capabilities(val(
                &ids[0],
                vec![cap(Mode::SingleNodeWriter, false), cap(Mode::MultiNodeMultiWriter, true)],
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(ok.confirmed.is_some(), "{}", ok.message);
        let no = e
            .ctl
            .validate_volume_capabilities(val(&ids[0], vec![cap(Mode::MultiNodeMultiWriter, false)]))
            .await
            .unwrap()
            .into_inner();
        assert!(no.confirmed.is_none() && !no.message.is_empty());
        assert_eq!(code(e.ctl.validate_volume_capabilities(val(&ids[0], vec![])).await), Code::InvalidArgument);
        assert_eq!(
            code(e.ctl.validate_volume_capabilities(val("", vec![cap(Mode::SingleNodeWriter, true)])).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                e.ctl
                    .validate_volume_capabilities(val(&format!("{NODE}/nope"), vec![cap(Mode::SingleNodeWriter, true)]))
                    .await
            ),
            Code::NotFound
        );

        // ListVolumes with pagination covers every volume exactly once.
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let r = e
                .ctl
                .list_volumes(ListVolumesRequest { max_entries: 2, starting_token: token.clone() })
                .await
                .unwrap()
                .into_inner();
            assert!(r.entries.len() <= 2);
            seen.extend(r.entries.iter().map(|en| en.volume.as_ref().unwrap().volume_id.clone()));
            if r.next_token.is_empty() {
                break;
            }
            token = r.next_token;
        }
        seen.sort();
        let mut ids = ids.clone();
        ids.sort();
        assert_eq!(seen, ids);
        assert_eq!(
            code(e.ctl.list_volumes(ListVolumesRequest { max_entries: 0, starting_token: "bogus".into() }).await),
            Code::Aborted
        );
        assert_eq!(
            code(e.ctl.list_volumes(ListVolumesRequest { max_entries: -1, starting_token: "".into() }).await),
            Code::InvalidArgument
        );

        // ControllerGetVolume.
        let g = e
            .ctl
            .controller_get_volume(ControllerGetVolumeRequest { volume_id: ids[1].clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(g.volume.unwrap().capacity_bytes, MIB);
        assert_eq!(
            code(e.ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: format!("{NODE}/nope") }).await),
            Code::NotFound
        );

        // GetCapacity: the pool's free space, for this node's topology; zero elsewhere.
        let topo =
            |n: &str| Some(Topology { segments: HashMap::from([("topology.thinbd.csi.io/node".into(), n.into())]) });
        let c = e
            .ctl
            .get_capacity(GetCapacityRequest { accessible_topology: topo(NODE), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let pool: serde_json::Value = serde_json::from_str(&e.server.cli(&["pool", "-o", "json"])).unwrap();
        let free = pool["capacity_bytes"].as_i64().unwrap() - pool["used_bytes"].as_i64().unwrap();
        assert_eq!(c.available_capacity, free);
        assert!(c.maximum_volume_size.is_some() && c.minimum_volume_size == Some(4096));
        let elsewhere = e
            .ctl
            .get_capacity(GetCapacityRequest { accessible_topology: topo("other"), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(elsewhere.available_capacity, 0);
        let bad = e
            .ctl
            .get_capacity(GetCapacityRequest {
                volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter, false)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(bad.available_capacity, 0, "no capacity for a capability we cannot serve");
    });
}

#[test]
fn snapshots_restores_clones_and_expansion() {
    runtime().block_on(async {
        let mut e = env().await;
        let v = create(&mut e, "pvc-src", 4 * MIB).await;
        let grant = e.server.cli(&["volume", "publish", "pvc-src", "--node", "writer"]);
        let c = Client::connect(e.server.addr(), ClientOptions::new(grant.trim())).await.unwrap();
        c.write(4096, b"snapshot me", 0).await.unwrap();
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
        e.server.cli(&["volume", "unpublish", "pvc-src", "--node", "writer"]);

        // CreateSnapshot: arguments, idempotency, name conflicts, unknown source.
        let snap_req = |name: &str, src: &str| CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: src.into(),
            ..Default::default()
        };
        assert_eq!(code(e.ctl.create_snapshot(snap_req("", &v.volume_id)).await), Code::InvalidArgument);
        assert_eq!(code(e.ctl.create_snapshot(snap_req("s", "")).await), Code::InvalidArgument);
        assert_eq!(code(e.ctl.create_snapshot(snap_req("s", &format!("{NODE}/nope"))).await), Code::NotFound);
        let s =
            e.ctl.create_snapshot(snap_req("snapshot-1", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
        assert!(s.ready_to_use && s.size_bytes == 4 * MIB && s.source_volume_id == v.volume_id);
        assert!(s.creation_time.is_some());
        let s2 =
            e.ctl.create_snapshot(snap_req("snapshot-1", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
        assert_eq!(s2.snapshot_id, s.snapshot_id);
        let other = create(&mut e, "pvc-other", MIB).await;
        assert_eq!(code(e.ctl.create_snapshot(snap_req("snapshot-1", &other.volume_id)).await), Code::AlreadyExists);

        // ListSnapshots by id, by source, all, with pagination; unknown ids give empty lists.
        let list = |id: &str, src: &str, max: i32, tok: &str| ListSnapshotsRequest {
            snapshot_id: id.into(),
            source_volume_id: src.into(),
            max_entries: max,
            starting_token: tok.into(),
            ..Default::default()
        };
        let by_id = e.ctl.list_snapshots(list(&s.snapshot_id, "", 0, "")).await.unwrap().into_inner();
        assert_eq!(by_id.entries.len(), 1);
        e.ctl.create_snapshot(snap_req("snapshot-2", &v.volume_id)).await.unwrap();
        assert_eq!(e.ctl.list_snapshots(list("", &v.volume_id, 0, "")).await.unwrap().into_inner().entries.len(), 2);
        let p1 = e.ctl.list_snapshots(list("", "", 1, "")).await.unwrap().into_inner();
        assert_eq!(p1.entries.len(), 1);
        let p2 = e.ctl.list_snapshots(list("", "", 1, &p1.next_token)).await.unwrap().into_inner();
        assert_ne!(
            p1.entries[0].snapshot.as_ref().unwrap().snapshot_id,
            p2.entries[0].snapshot.as_ref().unwrap().snapshot_id
        );
        assert!(
            e.ctl
                .list_snapshots(list(&format!("{NODE}/x@y"), "", 0, ""))
                .await
                .unwrap()
                .into_inner()
                .entries
                .is_empty()
        );
        assert!(
            e.ctl.list_snapshots(list("", &format!("{NODE}/x"), 0, "")).await.unwrap().into_inner().entries.is_empty()
        );

        // Restore: a volume from the snapshot, larger than it; too small is OUT_OF_RANGE.
        let from = |name: &str, size: i64, src: volume_content_source::Type| CreateVolumeRequest {
            volume_content_source: Some(VolumeContentSource { r#type: Some(src) }),
            ..create_req(name, size)
        };
        let snap_src = volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: s.snapshot_id.clone(),
        });
        let restored = e
            .ctl
            .create_volume(from("pvc-restored", 8 * MIB, snap_src.clone()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(restored.capacity_bytes, 8 * MIB);
        assert!(restored.content_source.is_some());
        e.ctl.create_volume(from("pvc-restored", 8 * MIB, snap_src.clone())).await.expect("idempotent restore");
        assert_eq!(
            code(e.ctl.create_volume(create_req("pvc-restored", 8 * MIB)).await),
            Code::AlreadyExists,
            "same name, no source"
        );
        assert_eq!(code(e.ctl.create_volume(from("pvc-small", MIB, snap_src)).await), Code::OutOfRange);
        let missing = volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: format!("{NODE}/pvc-src@nope"),
        });
        assert_eq!(code(e.ctl.create_volume(from("pvc-x", 8 * MIB, missing)).await), Code::NotFound);
        // Clone of a volume.
        let vol_src =
            volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: v.volume_id.clone() });
        e.ctl.create_volume(from("pvc-clone", 4 * MIB, vol_src)).await.unwrap();
        for name in ["pvc-restored", "pvc-clone"] {
            let g = e.server.cli(&["volume", "publish", name, "--node", "reader", "--read-only"]);
            let r = Client::connect(e.server.addr(), ClientOptions::new(g.trim())).await.unwrap();
            assert_eq!(r.read(4096, 11).await.unwrap(), b"snapshot me", "{name}");
            r.disconnect().await.unwrap();
            e.server.cli(&["volume", "unpublish", name, "--node", "reader"]);
        }

        // Expansion: grows, never shrinks, and says the node must follow.
        let exp = |size: i64| ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: range(size, 0),
            ..Default::default()
        };
        let r = e.ctl.controller_expand_volume(exp(16 * MIB)).await.unwrap().into_inner();
        assert_eq!(r.capacity_bytes, 16 * MIB);
        assert!(r.node_expansion_required);
        let r = e.ctl.controller_expand_volume(exp(MIB)).await.unwrap().into_inner();
        assert_eq!(r.capacity_bytes, 16 * MIB, "a smaller request leaves the volume as it is");
        assert_eq!(
            code(
                e.ctl
                    .controller_expand_volume(ControllerExpandVolumeRequest {
                        volume_id: v.volume_id.clone(),
                        ..Default::default()
                    })
                    .await
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                e.ctl
                    .controller_expand_volume(ControllerExpandVolumeRequest {
                        volume_id: format!("{NODE}/nope"),
                        capacity_range: range(MIB, 0),
                        ..Default::default()
                    })
                    .await
            ),
            Code::NotFound
        );

        // DeleteSnapshot: idempotent; the restored volume keeps its data.
        for id in [s.snapshot_id.clone(), s.snapshot_id.clone(), format!("{NODE}/a@b"), "junk".into()] {
            e.ctl
                .delete_snapshot(DeleteSnapshotRequest { snapshot_id: id, ..Default::default() })
                .await
                .expect("delete snapshot");
        }
        assert_eq!(code(e.ctl.delete_snapshot(DeleteSnapshotRequest::default()).await), Code::InvalidArgument);
        assert_eq!(e.ctl.list_snapshots(list("", &v.volume_id, 0, "")).await.unwrap().into_inner().entries.len(), 1);
        let fsck_ok = e.server.volume_json("pvc-restored");
        assert_eq!(fsck_ok["size_bytes"], 8 * MIB);
    });
}

/// Node RPCs that fail before touching the kernel: argument checks and spec error codes.
#[test]
fn node_rpcs_check_arguments() {
    runtime().block_on(async {
        let mut e = env().await;
        let tmp = tempfile::tempdir().unwrap();
        let staging = tmp.path().join("staging").display().to_string();
        let target = tmp.path().join("target").display().to_string();
        let block = Some(cap(Mode::SingleNodeWriter, true));
        let stage = |id: &str, path: &str, c: Option<VolumeCapability>| NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.into(),
            volume_capability: c,
            ..Default::default()
        };
        assert_eq!(code(e.node.node_stage_volume(stage("", &staging, block.clone())).await), Code::InvalidArgument);
        assert_eq!(code(e.node.node_stage_volume(stage("n/v", "", block.clone())).await), Code::InvalidArgument);
        assert_eq!(code(e.node.node_stage_volume(stage("n/v", &staging, None)).await), Code::InvalidArgument);
        assert_eq!(
            code(e.node.node_stage_volume(stage("n/v", &staging, Some(cap(Mode::MultiNodeMultiWriter, false)))).await),
            Code::InvalidArgument
        );
        // Without ControllerPublishVolume there is no export to attach.
        assert_eq!(
            code(e.node.node_stage_volume(stage("n/v", &staging, block.clone())).await),
            Code::FailedPrecondition
        );

        let publish = |id: &str, t: &str| NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.clone(),
            target_path: t.into(),
            volume_capability: block.clone(),
            ..Default::default()
        };
        assert_eq!(code(e.node.node_publish_volume(publish("", &target)).await), Code::InvalidArgument);
        assert_eq!(code(e.node.node_publish_volume(publish("n/v", "")).await), Code::InvalidArgument);
        assert_eq!(
            code(e.node.node_publish_volume(publish("n/v", &target)).await),
            Code::FailedPrecondition,
            "not staged"
        );

        // Unpublish and unstage of things never published are fine (idempotent).
        e.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: "n/v".into(), target_path: target.clone() })
            .await
            .expect("unpublish of nothing");
        e.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: "n/v".into(),
                staging_target_path: staging.clone(),
            })
            .await
            .expect("unstage of nothing");
        assert_eq!(
            code(
                e.node
                    .node_unpublish_volume(NodeUnpublishVolumeRequest {
                        volume_id: "".into(),
                        target_path: target.clone()
                    })
                    .await
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                e.node
                    .node_unstage_volume(NodeUnstageVolumeRequest {
                        volume_id: "n/v".into(),
                        staging_target_path: "".into()
                    })
                    .await
            ),
            Code::InvalidArgument
        );

        // Stats of a path that does not exist: NOT_FOUND; expansion of a volume not attached here.
        let stats = |p: &str| NodeGetVolumeStatsRequest {
            volume_id: "n/v".into(),
            volume_path: p.into(),
            ..Default::default()
        };
        assert_eq!(code(e.node.node_get_volume_stats(stats(&target)).await), Code::NotFound);
        assert_eq!(code(e.node.node_get_volume_stats(stats("")).await), Code::InvalidArgument);
        let st = e.node.node_get_volume_stats(stats(&tmp.path().display().to_string())).await.unwrap().into_inner();
        assert!(st.volume_condition.unwrap().abnormal, "a volume with no device is abnormal");
        assert_eq!(
            code(
                e.node
                    .node_expand_volume(NodeExpandVolumeRequest {
                        volume_id: "n/v".into(),
                        volume_path: target.clone(),
                        ..Default::default()
                    })
                    .await
            ),
            Code::NotFound
        );
    });
}

#[test]
fn qos_parameters_and_modify_volume() {
    runtime().block_on(async {
        let mut e = env().await;
        let caps = e.ctl.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
        let modify = controller_service_capability::rpc::Type::ModifyVolume as i32;
        assert!(
            caps.capabilities.iter().any(|c| matches!(&c.r#type,
                Some(controller_service_capability::Type::Rpc(r)) if r.r#type == modify)),
            "MODIFY_VOLUME not advertised"
        );
        // StorageClass parameters set limits; mutable parameters (VolumeAttributesClass) win.
        let mut r = create_req("pvc-qos", 16 * MIB);
        r.parameters = HashMap::from([("maxIops".into(), "2000".into()), ("maxWriteBandwidth".into(), "100Mi".into())]);
        r.mutable_parameters = HashMap::from([("maxIops".into(), "1500".into())]);
        let v = e.ctl.create_volume(r).await.unwrap().into_inner().volume.unwrap();
        let id = v.volume_id.clone();
        let shown = e.server.volume_json("pvc-qos");
        assert_eq!(
            (shown["qos"]["iops"].as_u64(), shown["qos"]["write_bandwidth"].as_u64()),
            (Some(1500), Some(100 << 20))
        );

        // ControllerModifyVolume changes the given keys and keeps the others.
        let modify = |params: &[(&str, &str)]| ControllerModifyVolumeRequest {
            volume_id: id.clone(),
            mutable_parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        e.ctl.controller_modify_volume(modify(&[("maxIops", "500")])).await.unwrap();
        let shown = e.server.volume_json("pvc-qos");
        assert_eq!(
            (shown["qos"]["iops"].as_u64(), shown["qos"]["write_bandwidth"].as_u64()),
            (Some(500), Some(100 << 20))
        );
        // Errors: unknown keys and bad values are InvalidArgument, nothing to change too, and a
        // volume that does not exist is NotFound.
        assert_eq!(code(e.ctl.controller_modify_volume(modify(&[("colour", "blue")])).await), Code::InvalidArgument);
        assert_eq!(code(e.ctl.controller_modify_volume(modify(&[("maxIops", "fast")])).await), Code::InvalidArgument);
        assert_eq!(code(e.ctl.controller_modify_volume(modify(&[])).await), Code::InvalidArgument);
        let mut missing = modify(&[("maxIops", "1")]);
        missing.volume_id = format!("{NODE}/missing");
        assert_eq!(code(e.ctl.controller_modify_volume(missing).await), Code::NotFound);
        let mut bad = create_req("pvc-qos-bad", 16 * MIB);
        bad.mutable_parameters = HashMap::from([("mkfsOptions".into(), "-q".into())]);
        assert_eq!(code(e.ctl.create_volume(bad).await), Code::InvalidArgument);
        assert_eq!(e.server.volume_json("pvc-qos")["qos"]["iops"].as_u64(), Some(500), "a refused change changed");
    });
}

#[test]
fn snapshot_metadata_service_reports_allocated_and_changed_ranges() {
    use thinbd_api::csi::snapshot_metadata_client::SnapshotMetadataClient;
    const CS: i64 = 64 * 1024;
    runtime().block_on(async {
        let mut e = env().await;
        let caps = e.ident.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
        let want = plugin_capability::service::Type::SnapshotMetadataService as i32;
        assert!(
            caps.capabilities.iter().any(|c| matches!(&c.r#type,
                Some(plugin_capability::Type::Service(s)) if s.r#type == want)),
            "SNAPSHOT_METADATA_SERVICE not advertised"
        );
        let v = create(&mut e, "pvc-cbt", 4 * MIB).await;
        let grant = e.server.cli(&["volume", "publish", "pvc-cbt", "--node", "writer"]);
        let c = Client::connect(e.server.addr(), ClientOptions::new(grant.trim())).await.unwrap();
        c.write(0, &[1u8; 2 * CS as usize], 0).await.unwrap();
        let snap = |name: &str| CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: v.volume_id.clone(),
            ..Default::default()
        };
        let s1 = e.ctl.create_snapshot(snap("cbt-1")).await.unwrap().into_inner().snapshot.unwrap().snapshot_id;
        c.write(5 * CS as u64, &[2u8; 100], 0).await.unwrap();
        c.write(9 * CS as u64, &[3u8; 4096], 0).await.unwrap();
        let s2 = e.ctl.create_snapshot(snap("cbt-2")).await.unwrap().into_inner().snapshot.unwrap().snapshot_id;
        c.disconnect().await.unwrap();

        let mut m = SnapshotMetadataClient::new(e._plugin.channel().await);
        let collect = |msgs: Vec<GetMetadataDeltaResponse>| -> Vec<(i64, i64)> {
            msgs.iter().flat_map(|r| r.block_metadata.iter().map(|b| (b.byte_offset, b.size_bytes))).collect()
        };
        let mut s = m
            .get_metadata_allocated(GetMetadataAllocatedRequest { snapshot_id: s1.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let first = s.message().await.unwrap().unwrap();
        assert_eq!(first.volume_capacity_bytes, 4 * MIB);
        assert_eq!(first.block_metadata_type, BlockMetadataType::VariableLength as i32);
        assert_eq!(
            first.block_metadata.iter().map(|b| (b.byte_offset, b.size_bytes)).collect::<Vec<_>>(),
            [(0, 2 * CS)]
        );

        let delta = |start: i64, max: i32| GetMetadataDeltaRequest {
            base_snapshot_id: s1.clone(),
            target_snapshot_id: s2.clone(),
            starting_offset: start,
            max_results: max,
            ..Default::default()
        };
        let mut all = Vec::new();
        let mut st = m.get_metadata_delta(delta(0, 1)).await.unwrap().into_inner();
        while let Some(r) = st.message().await.unwrap() {
            assert!(r.block_metadata.len() <= 1, "max_results 1 not respected");
            all.push(r);
        }
        assert_eq!(collect(all), [(5 * CS, CS), (9 * CS, CS)]);
        // Resuming after the first range skips it.
        let mut resumed = Vec::new();
        let mut st = m.get_metadata_delta(delta(6 * CS, 0)).await.unwrap().into_inner();
        while let Some(r) = st.message().await.unwrap() {
            resumed.push(r);
        }
        assert_eq!(collect(resumed), [(9 * CS, CS)]);
        // Errors.
        assert_eq!(code(m.get_metadata_delta(delta(-1, 0)).await), Code::InvalidArgument);
        assert_eq!(code(m.get_metadata_delta(delta(4 * MIB, 0)).await), Code::OutOfRange);
        let mut swapped = delta(0, 0);
        std::mem::swap(&mut swapped.base_snapshot_id, &mut swapped.target_snapshot_id);
        assert_eq!(code(m.get_metadata_delta(swapped).await), Code::InvalidArgument);
        let mut missing = delta(0, 0);
        missing.base_snapshot_id = format!("{NODE}/pvc-cbt@nope");
        assert_eq!(code(m.get_metadata_delta(missing).await), Code::NotFound);
        let other = create(&mut e, "pvc-cbt-other", MIB).await;
        let s3 = e
            .ctl
            .create_snapshot(CreateSnapshotRequest {
                name: "cbt-3".into(),
                source_volume_id: other.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id;
        let mut cross = delta(0, 0);
        cross.target_snapshot_id = s3;
        assert_eq!(code(m.get_metadata_delta(cross).await), Code::InvalidArgument);
    });
}

#[test]
fn group_snapshots_through_the_group_controller() {
    use thinbd_api::csi::group_controller_client::GroupControllerClient;
    runtime().block_on(async {
        let mut e = env().await;
        let caps = e.ident.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
        let want = plugin_capability::service::Type::GroupControllerService as i32;
        assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
            Some(plugin_capability::Type::Service(s)) if s.r#type == want)));
        let mut g = GroupControllerClient::new(e._plugin.channel().await);
        let gc =
            g.group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
        assert_eq!(gc.capabilities.len(), 1);

        let v1 = create(&mut e, "pvc-g1", MIB).await.volume_id;
        let v2 = create(&mut e, "pvc-g2", MIB).await.volume_id;
        let v3 = create(&mut e, "pvc-g3", MIB).await.volume_id;
        let req = |name: &str, ids: &[&String]| CreateVolumeGroupSnapshotRequest {
            name: name.into(),
            source_volume_ids: ids.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let made = g.create_volume_group_snapshot(req("group-1", &[&v1, &v2])).await.unwrap().into_inner();
        let gs = made.group_snapshot.unwrap();
        assert!(gs.ready_to_use && gs.creation_time.is_some());
        assert_eq!(gs.snapshots.len(), 2);
        assert!(gs.snapshots.iter().all(|s| s.group_snapshot_id == gs.group_snapshot_id && s.ready_to_use));
        let mut sources: Vec<&str> = gs.snapshots.iter().map(|s| s.source_volume_id.as_str()).collect();
        sources.sort();
        let mut want = [v1.as_str(), v2.as_str()];
        want.sort();
        assert_eq!(sources, want);
        // Idempotent; the same name over other volumes is ALREADY_EXISTS.
        let again = g.create_volume_group_snapshot(req("group-1", &[&v2, &v1])).await.unwrap().into_inner();
        assert_eq!(again.group_snapshot.unwrap().group_snapshot_id, gs.group_snapshot_id);
        assert_eq!(code(g.create_volume_group_snapshot(req("group-1", &[&v1, &v3])).await), Code::AlreadyExists);
        assert_eq!(code(g.create_volume_group_snapshot(req("", &[&v1])).await), Code::InvalidArgument);
        assert_eq!(code(g.create_volume_group_snapshot(req("group-2", &[])).await), Code::InvalidArgument);
        let missing = format!("{NODE}/pvc-missing");
        assert_eq!(code(g.create_volume_group_snapshot(req("group-3", &[&v1, &missing])).await), Code::NotFound);
        // Members restore like any snapshot.
        let mut restore = create_req("pvc-g1-restored", MIB);
        restore.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: gs.snapshots[0].snapshot_id.clone(),
            })),
        });
        e.ctl.create_volume(restore).await.unwrap();
        // Get, Delete (idempotent), then NOT_FOUND.
        let get = |id: &str| GetVolumeGroupSnapshotRequest { group_snapshot_id: id.into(), ..Default::default() };
        let got = g.get_volume_group_snapshot(get(&gs.group_snapshot_id)).await.unwrap().into_inner();
        assert_eq!(got.group_snapshot.unwrap().snapshots.len(), 2);
        let del = |id: &str| DeleteVolumeGroupSnapshotRequest { group_snapshot_id: id.into(), ..Default::default() };
        g.delete_volume_group_snapshot(del(&gs.group_snapshot_id)).await.unwrap();
        g.delete_volume_group_snapshot(del(&gs.group_snapshot_id)).await.unwrap();
        assert_eq!(code(g.get_volume_group_snapshot(get(&gs.group_snapshot_id)).await), Code::NotFound);
        assert_eq!(code(g.get_volume_group_snapshot(get("")).await), Code::InvalidArgument);
    });
}

/// Ids are UUIDs now; ids of the older `NODE/VOLUME` and `NODE/VOLUME@SNAPSHOT` form (volumes
/// provisioned before) keep working in every RPC, and the management API takes UUIDs wherever
/// it takes names.
#[test]
fn uuid_ids_and_the_older_node_naming_ids() {
    runtime().block_on(async {
        let mut e = env().await;
        let v = create(&mut e, "pvc-old", 2 * MIB).await;
        e.server.cli(&["node", "register", "node-x"]);
        let uuid = e.server.volume_json("pvc-old")["uuid"].as_str().expect("uuid").to_string();
        assert_eq!(v.volume_id, uuid);
        assert!(!v.volume_id.contains(NODE));
        let old = format!("{NODE}/pvc-old");

        // Get and publish through the old id; the answer carries the UUID id.
        let got = e.ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: old.clone() }).await.unwrap();
        assert_eq!(got.into_inner().volume.unwrap().volume_id, uuid);
        let publish = |id: &str| ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: "node-x".into(),
            volume_capability: Some(cap(Mode::SingleNodeWriter, true)),
            ..Default::default()
        };
        let by_old = e.ctl.controller_publish_volume(publish(&old)).await.unwrap().into_inner();
        let by_uuid = e.ctl.controller_publish_volume(publish(&uuid)).await.unwrap().into_inner();
        assert_eq!(by_old.publish_context, by_uuid.publish_context, "one grant, whichever id");
        let export = &by_uuid.publish_context["thinbd.csi.io/export"];
        assert!(export.starts_with("pvc-old#"), "{export}");
        let c = Client::connect(e.server.addr(), ClientOptions::new(export)).await.unwrap();
        c.write(0, b"by uuid", 0).await.unwrap();
        c.disconnect().await.unwrap();
        let unpublish = |id: &str| ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: "node-x".into(),
            ..Default::default()
        };
        e.ctl.controller_unpublish_volume(unpublish(&old)).await.unwrap();
        assert!(e.server.volume_json("pvc-old")["published_nodes"].as_array().is_none_or(|n| n.is_empty()));

        // Snapshots: made from the old id, found by old and new ids of snapshot and source.
        let snap = e
            .ctl
            .create_snapshot(CreateSnapshotRequest {
                name: "snap-old".into(),
                source_volume_id: old.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(snap.source_volume_id, uuid);
        assert!(!snap.snapshot_id.contains('@') && snap.snapshot_id.len() == 36, "{}", snap.snapshot_id);
        let old_snap = format!("{NODE}/pvc-old@snap-old");
        let list = |id: &str, src: &str| ListSnapshotsRequest {
            snapshot_id: id.into(),
            source_volume_id: src.into(),
            ..Default::default()
        };
        for (id, src) in
            [(snap.snapshot_id.as_str(), ""), (old_snap.as_str(), ""), ("", uuid.as_str()), ("", old.as_str())]
        {
            let found = e.ctl.list_snapshots(list(id, src)).await.unwrap().into_inner().entries;
            assert_eq!(found.len(), 1, "by {id:?} / {src:?}");
            assert_eq!(found[0].snapshot.as_ref().unwrap().snapshot_id, snap.snapshot_id);
        }
        // Restore from the old snapshot id.
        let mut restore = create_req("pvc-old-restored", 2 * MIB);
        restore.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: old_snap.clone(),
            })),
        });
        e.ctl.create_volume(restore).await.unwrap();

        // The source goes; its snapshot is still listed under the source's UUID.
        e.ctl.delete_volume(DeleteVolumeRequest { volume_id: old.clone(), ..Default::default() }).await.unwrap();
        assert!(!e.server.cli_output(&["volume", "show", "pvc-old"]).status.success(), "deleted by its old id");
        let orphan = e.ctl.list_snapshots(list("", &uuid)).await.unwrap().into_inner().entries;
        assert_eq!(orphan.len(), 1);
        assert_eq!(orphan[0].snapshot.as_ref().unwrap().source_volume_id, uuid);
        e.ctl
            .delete_snapshot(DeleteSnapshotRequest { snapshot_id: old_snap.clone(), ..Default::default() })
            .await
            .unwrap();
        assert!(e.ctl.list_snapshots(list(&snap.snapshot_id, "")).await.unwrap().into_inner().entries.is_empty());

        // The management API (here through the CLI) takes a UUID where it takes a name.
        let restored = e.server.volume_json("pvc-old-restored");
        let ruuid = restored["uuid"].as_str().unwrap();
        e.server.cli(&["volume", "resize", ruuid, "--size", "4MiB"]);
        assert_eq!(e.server.volume_json("pvc-old-restored")["size_bytes"], 4 * MIB);
        e.server.cli(&["volume", "delete", ruuid]);
        assert!(!e.server.cli_output(&["volume", "show", "pvc-old-restored"]).status.success());
    });
}
