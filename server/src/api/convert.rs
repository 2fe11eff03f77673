//! Engine values and errors as API messages and gRPC status codes (the one place errors get
//! their codes).

use thinbd_api::pb;
use tonic::Status;

use crate::engine::{Engine, Snapshot, Volume};
use crate::error::EngineError;
use crate::meta::qos::QosLimits;

/// The API's QoS message as limits (absent: unlimited).
pub fn qos_from_pb(q: Option<pb::Qos>) -> QosLimits {
    let q = q.unwrap_or_default();
    QosLimits {
        iops: q.iops,
        read_iops: q.read_iops,
        write_iops: q.write_iops,
        bandwidth: q.bandwidth,
        read_bandwidth: q.read_bandwidth,
        write_bandwidth: q.write_bandwidth,
        burst_ms: q.burst_ms,
    }
}

pub fn qos_to_pb(q: QosLimits) -> pb::Qos {
    pb::Qos {
        iops: q.iops,
        read_iops: q.read_iops,
        write_iops: q.write_iops,
        bandwidth: q.bandwidth,
        read_bandwidth: q.read_bandwidth,
        write_bandwidth: q.write_bandwidth,
        burst_ms: q.burst_ms,
    }
}

pub fn status(e: EngineError) -> Status {
    match e {
        EngineError::NotFound(_) => Status::not_found(e.to_string()),
        EngineError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        EngineError::Invalid(_) => Status::invalid_argument(e.to_string()),
        _ if e.is_precondition() => Status::failed_precondition(e.to_string()),
        EngineError::NoSpace => Status::resource_exhausted(e.to_string()),
        EngineError::Unavailable(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// A volume as the API shows it.
pub fn volume_to_pb(engine: &Engine, node: &str, v: &Volume) -> pb::Volume {
    let i = engine.info(v);
    pb::Volume {
        name: i.name,
        size_bytes: i.size,
        allocated_bytes: i.usage.allocated,
        exclusive_bytes: i.usage.exclusive,
        shared_bytes: i.usage.shared,
        created_unix_seconds: i.created_unix,
        id: i.id,
        sessions: i.sessions,
        labels: v.labels.clone().into_iter().collect(),
        published_nodes: engine.published_nodes(&v.name),
        qos: Some(qos_to_pb(v.qos.limits())),
        throttled_seconds: v.qos.throttled_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9,
        uuid: v.uuid.clone(),
        node: node.to_string(),
        ..Default::default()
    }
}

/// A snapshot as the API shows it.
pub fn snapshot_to_pb(engine: &Engine, node: &str, s: &Snapshot) -> pb::Snapshot {
    let i = engine.snapshot_info(s);
    pb::Snapshot {
        volume: i.volume,
        name: i.name,
        size_bytes: i.size,
        allocated_bytes: i.usage.allocated,
        exclusive_bytes: i.usage.exclusive,
        shared_bytes: i.usage.shared,
        created_unix_seconds: i.created_unix,
        sessions: i.sessions,
        group: s.group.clone().unwrap_or_default(),
        uuid: s.uuid.clone(),
        volume_uuid: s.volume_uuid.clone(),
        node: node.to_string(),
    }
}

pub fn grant_to_pb(g: &crate::grants::Grant, nbd_address: &str) -> pb::Grant {
    let rec = &g.record;
    pb::Grant {
        volume: rec.volume.clone(),
        node: rec.node.clone(),
        export_name: g.export_name(),
        read_only: rec.read_only,
        single_writer: rec.single_writer,
        created_unix_seconds: rec.created_unix,
        nbd_address: nbd_address.to_string(),
    }
}

/// What the cluster records of a snapshot.
pub fn snapshot_spec(s: &pb::Snapshot) -> crate::cluster::snapshots::SnapshotSpec {
    crate::cluster::snapshots::SnapshotSpec {
        uuid: s.uuid.clone(),
        name: s.name.clone(),
        volume: s.volume.clone(),
        volume_uuid: s.volume_uuid.clone(),
        size_bytes: s.size_bytes,
        node: s.node.clone(),
        created_unix: s.created_unix_seconds,
        group: s.group.clone(),
    }
}

/// A snapshot held by another node, as the cluster records it.
pub fn snapshot_spec_to_pb(spec: crate::cluster::snapshots::SnapshotSpec) -> pb::Snapshot {
    pb::Snapshot {
        volume: spec.volume,
        name: spec.name,
        size_bytes: spec.size_bytes,
        created_unix_seconds: spec.created_unix,
        group: spec.group,
        uuid: spec.uuid,
        volume_uuid: spec.volume_uuid,
        node: spec.node,
        ..Default::default()
    }
}

/// A cluster node as the API shows it.
pub fn node_to_pb(n: crate::cluster::nodes::NodeView) -> pb::Node {
    let r = n.record;
    pb::Node {
        name: r.name,
        nbd_address: r.nbd_address,
        api_address: r.api_address,
        capacity_bytes: r.capacity_bytes,
        available_bytes: r.available_bytes,
        zone: r.zone,
        labels: r.labels.into_iter().collect(),
        up: n.up,
        storage: true,
    }
}

/// A node only registered (single-node mode) as the API shows it.
pub fn registered_node_to_pb(name: &str) -> pb::Node {
    pb::Node { name: name.to_string(), up: true, storage: false, ..Default::default() }
}

/// Cluster failures: etcd or a node out of reach is worth retrying.
pub fn cluster_status(e: crate::cluster::ClusterError) -> Status {
    use crate::cluster::ClusterError as E;
    match e {
        E::Etcd(_) | E::NodeDown(_) | E::Timeout(_) | E::Peer { .. } => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// A volume whose node is down, from what the cluster store records.
pub fn spec_to_pb(spec: crate::cluster::volumes::VolumeSpec) -> pb::Volume {
    pb::Volume {
        name: spec.name,
        uuid: spec.uuid,
        size_bytes: spec.size_bytes,
        node: spec.node,
        created_unix_seconds: spec.created_unix,
        unavailable: true,
        ..Default::default()
    }
}
