//! The CSI SnapshotMetadata service (changed-block tracking for backup tools, through the
//! external-snapshot-metadata sidecar): the allocated ranges of a snapshot and the ranges
//! changed between two snapshots of one volume, as thinbd's layer chain records them, exact at
//! cluster granularity, streamed as variable-length extents.

use std::sync::Arc;

use thinbd_api::csi::snapshot_metadata_server::SnapshotMetadata;
use thinbd_api::csi::*;
use thinbd_api::pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::backend::{Backends, unavailable};
use crate::ids::{SnapshotId, required};

pub struct SnapshotMetadataService {
    pub backends: Arc<Backends>,
}

/// Extents per message when the client leaves `max_results` at 0.
const DEFAULT_RESULTS: usize = 1024;

fn snapshot(id: &str, field: &str) -> Result<SnapshotId, Status> {
    let id = required(id, field)?;
    SnapshotId::parse(id).ok_or_else(|| Status::not_found(format!("snapshot {id:?} does not exist")))
}

/// Ranges from the storage node, from `starting_offset` on, in messages of at most
/// `max_results`: `(capacity, messages)`.
async fn ranges(
    backends: &Backends,
    node: Option<&str>,
    base: String,
    target: String,
    starting_offset: i64,
    max_results: i32,
) -> Result<(i64, Vec<Vec<BlockMetadata>>), Status> {
    if starting_offset < 0 || max_results < 0 {
        return Err(Status::invalid_argument("starting_offset and max_results must not be negative"));
    }
    let (_, mut api) = backends.locate(node).await?;
    let mut stream = api
        .changed_ranges(pb::ChangedRangesRequest { base, target })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound | tonic::Code::InvalidArgument => s,
            _ => unavailable(s),
        })?
        .into_inner();
    let mut capacity = 0i64;
    let mut all = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(unavailable)? {
        capacity = chunk.size_bytes as i64;
        all.extend(
            chunk
                .ranges
                .into_iter()
                .map(|r| BlockMetadata { byte_offset: r.offset as i64, size_bytes: r.length as i64 })
                // Nothing that ends before the starting offset (the spec's resume rule).
                .filter(|b| b.byte_offset + b.size_bytes > starting_offset),
        );
    }
    if starting_offset >= capacity && capacity > 0 {
        return Err(Status::out_of_range(format!("starting_offset {starting_offset} is past the volume's end")));
    }
    let per = if max_results == 0 { DEFAULT_RESULTS } else { max_results as usize };
    let messages = if all.is_empty() { vec![Vec::new()] } else { all.chunks(per).map(<[_]>::to_vec).collect() };
    Ok((capacity, messages))
}

fn send_all<T: Send + 'static>(
    messages: Vec<Vec<BlockMetadata>>,
    make: impl Fn(Vec<BlockMetadata>) -> T + Send + 'static,
) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for m in messages {
            if tx.send(Ok(make(m))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    type GetMetadataAllocatedStream = ReceiverStream<Result<GetMetadataAllocatedResponse, Status>>;
    type GetMetadataDeltaStream = ReceiverStream<Result<GetMetadataDeltaResponse, Status>>;

    async fn get_metadata_allocated(
        &self,
        req: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = req.into_inner();
        let snap = snapshot(&r.snapshot_id, "snapshot_id")?;
        let (capacity, messages) =
            ranges(&self.backends, snap.node.as_deref(), String::new(), snap.key, r.starting_offset, r.max_results)
                .await?;
        Ok(Response::new(send_all(messages, move |block_metadata| GetMetadataAllocatedResponse {
            block_metadata_type: BlockMetadataType::VariableLength as i32,
            volume_capacity_bytes: capacity,
            block_metadata,
        })))
    }

    async fn get_metadata_delta(
        &self,
        req: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = req.into_inner();
        let base = snapshot(&r.base_snapshot_id, "base_snapshot_id")?;
        let target = snapshot(&r.target_snapshot_id, "target_snapshot_id")?;
        // Whether base is an earlier snapshot of the same volume is the storage node's to say
        // (InvalidArgument otherwise); snapshots on different nodes cannot be.
        let (base_node, _) = self.backends.locate(base.node.as_deref()).await?;
        let (target_node, _) = self.backends.locate(target.node.as_deref()).await?;
        if base_node != target_node {
            return Err(Status::invalid_argument("the base and target snapshots are not of the same volume"));
        }
        let (capacity, messages) =
            ranges(&self.backends, target.node.as_deref(), base.key, target.key, r.starting_offset, r.max_results)
                .await?;
        Ok(Response::new(send_all(messages, move |block_metadata| GetMetadataDeltaResponse {
            block_metadata_type: BlockMetadataType::VariableLength as i32,
            volume_capacity_bytes: capacity,
            block_metadata,
        })))
    }
}
