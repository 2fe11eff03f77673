//! Admin operations on volumes and snapshots: create, resize, snapshot (single and group),
//! clone, QoS, delete. Each holds the engine's admin lock, so checks and commits never
//! interleave, and commits durably before memory changes.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::{Engine, Snapshot, Volume, VolumeOptions, now_unix, validate_name};
use crate::error::{EngineError, poisoned};
use crate::meta::store::MetaOp;
use crate::meta::uuid::new_uuid_text;

impl Engine {
    /// The UUID a new volume gets: the one the cluster chose (which must be free here), or new.
    fn uuid_for(&self, opts: &VolumeOptions) -> Result<String, EngineError> {
        match &opts.uuid {
            Some(u) if self.graph.list().iter().any(|v| v.uuid == *u) => {
                Err(EngineError::AlreadyExists(format!("a volume with UUID {u}")))
            }
            Some(u) => Ok(u.clone()),
            None => Ok(new_uuid_text()),
        }
    }

    fn check_size(size: u64) -> Result<(), EngineError> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(EngineError::Invalid(format!("volume size {size} must be a positive multiple of 512 bytes")));
        }
        if size > 1 << 60 {
            return Err(EngineError::Invalid(format!("volume size {size} is larger than 1 EiB")));
        }
        Ok(())
    }

    /// A new volume name must not collide with a volume, nor with snapshots left by a deleted
    /// volume of that name (their export names would be ambiguous).
    fn check_new_volume_name(&self, name: &str) -> Result<(), EngineError> {
        validate_name("volume", name)?;
        if let Ok(v) = self.volume(name) {
            return Err(EngineError::AlreadyExists(format!("volume {:?}", v.name)));
        }
        if !self.list_snapshots(Some(name)).is_empty() {
            return Err(EngineError::AlreadyExists(format!(
                "snapshots of a deleted volume {name:?} still exist; delete them or choose another name"
            )));
        }
        Ok(())
    }

    pub async fn create_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<Arc<Volume>, EngineError> {
        self.create_volume_with(name, size, VolumeOptions::default()).await
    }

    pub async fn create_volume_with(
        self: &Arc<Self>,
        name: &str,
        size: u64,
        opts: VolumeOptions,
    ) -> Result<Arc<Volume>, EngineError> {
        Self::check_size(size)?;
        let _admin = self.admin.lock().await;
        self.check_new_volume_name(name)?;
        let uuid = self.uuid_for(&opts)?;
        let top = self.graph.new_layer(None)?;
        let vol = Arc::new(Volume::new(self.graph.take_id(), uuid, name, size, now_unix(), top.clone(), opts));
        let ops = vec![
            MetaOp::PutLayer { id: top.id, parent: None },
            MetaOp::PutVolume(vol.record()?),
            self.graph.next_id_op(),
        ];
        if let Err(e) = self.space.commit(ops, true).await {
            self.graph.forget_layers(&[top.id]);
            return Err(e);
        }
        self.graph.volumes.write().map_err(|_| poisoned())?.insert(name.to_string(), vol.clone());
        tracing::info!(volume = name, size, "volume created");
        Ok(vol)
    }

    /// Grows a volume. New connections see the new size in the handshake; open sessions accept
    /// requests up to the new end as well.
    pub async fn resize_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<Arc<Volume>, EngineError> {
        Self::check_size(size)?;
        let _admin = self.admin.lock().await;
        let vol = self.volume(name)?;
        let old = vol.size();
        if size < old {
            return Err(EngineError::Shrink { volume: name.to_string(), size: old, requested: size });
        }
        if size != old {
            let mut rec = vol.record()?;
            rec.size = size;
            self.space.commit(vec![MetaOp::PutVolume(rec)], true).await?;
            vol.size.store(size, Relaxed);
            tracing::info!(volume = name, old, size, "volume resized");
        }
        Ok(vol)
    }

    /// Freezes the volume's top layer as the snapshot and gives the volume a new, empty top.
    /// Costs the same for an empty volume and a full one.
    pub async fn create_snapshot(self: &Arc<Self>, volume: &str, name: &str) -> Result<Arc<Snapshot>, EngineError> {
        self.create_snapshot_with(volume, name, None).await
    }

    /// `uuid`: the snapshot's UUID when another node chose it (the same snapshot of every copy
    /// of a replicated volume); `None`: a new one.
    pub async fn create_snapshot_with(
        self: &Arc<Self>,
        volume: &str,
        name: &str,
        uuid: Option<String>,
    ) -> Result<Arc<Snapshot>, EngineError> {
        validate_name("snapshot", name)?;
        let mut snaps = self.snapshot_volumes(&[volume.to_string()], name, None, uuid).await?;
        snaps.pop().ok_or_else(|| EngineError::Internal("no snapshot made".into()))
    }

    /// A group snapshot: snapshot `name` of every volume in `volumes`, all of one instant.
    /// Every member's requests in flight finish first and new ones wait, so no write lands in
    /// one member's snapshot while an earlier acknowledged write is missing from another's;
    /// all layers commit in one transaction.
    pub async fn create_snapshot_group(
        self: &Arc<Self>,
        name: &str,
        volumes: &[String],
    ) -> Result<Vec<Arc<Snapshot>>, EngineError> {
        if volumes.is_empty() {
            return Err(EngineError::Invalid("a group snapshot needs at least one volume".into()));
        }
        validate_name("snapshot", name)?;
        self.snapshot_volumes(volumes, name, Some(name), None).await
    }

    /// The members of group snapshot `group`.
    pub fn snapshot_group(&self, group: &str) -> Vec<Arc<Snapshot>> {
        self.list_snapshots(None).into_iter().filter(|s| s.group.as_deref() == Some(group)).collect()
    }

    /// A hidden snapshot of `volume` (named `.MARK`): where a replica left the in-sync set, so
    /// that its rebuild copies only what changed since. Not listed, not in the cluster store;
    /// deleted with the volume.
    pub async fn create_mark(self: &Arc<Self>, volume: &str, mark: &str) -> Result<Arc<Snapshot>, EngineError> {
        validate_name("mark", mark)?;
        let mut snaps = self.snapshot_volumes(&[volume.to_string()], &format!(".{mark}"), None, None).await?;
        snaps.pop().ok_or_else(|| EngineError::Internal("no mark made".into()))
    }

    /// Deletes mark `.MARK` of `volume`; one that is not there is deleted.
    pub async fn delete_mark(self: &Arc<Self>, volume: &str, mark: &str) -> Result<(), EngineError> {
        match self.delete_snapshot(&format!("{volume}@.{mark}")).await {
            Err(EngineError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    /// Snapshot `name` of each of `volumes` (the name is checked by the callers: marks have
    /// names no user can give).
    async fn snapshot_volumes(
        self: &Arc<Self>,
        volumes: &[String],
        name: &str,
        group: Option<&str>,
        uuid: Option<String>,
    ) -> Result<Vec<Arc<Snapshot>>, EngineError> {
        let _admin = self.admin.lock().await;
        let mut sorted: Vec<&String> = volumes.iter().collect();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != volumes.len() {
            return Err(EngineError::Invalid("a volume is named twice".into()));
        }
        let mut vols = Vec::with_capacity(sorted.len());
        for v in &sorted {
            let key = format!("{v}@{name}");
            if self.snapshot(&key).is_ok() {
                return Err(EngineError::AlreadyExists(format!("snapshot {key:?}")));
            }
            vols.push(self.volume(v)?);
        }
        // Wait for requests in flight on every member (in name order, so two group snapshots
        // never wait for each other); new ones wait for the new tops.
        let mut gates = Vec::with_capacity(vols.len());
        for v in &vols {
            gates.push(v.gate.write().await);
        }
        let created_unix = now_unix();
        let mut ops = Vec::new();
        let mut made = Vec::with_capacity(vols.len());
        for vol in &vols {
            let frozen = vol.top()?;
            let top = self.graph.new_layer(Some(frozen.clone()))?;
            let snap = Arc::new(Snapshot::new(
                uuid.clone().filter(|_| vols.len() == 1).unwrap_or_else(new_uuid_text),
                (&vol.name, &vol.uuid),
                name,
                frozen.clone(),
                vol.size(),
                created_unix,
                group.map(str::to_string),
            ));
            let mut rec = vol.record()?;
            rec.layer = top.id;
            ops.push(MetaOp::PutLayer { id: top.id, parent: Some(frozen.id) });
            ops.push(MetaOp::PutVolume(rec));
            ops.push(MetaOp::PutSnapshot(snap.record()));
            made.push((vol.clone(), top, snap));
        }
        ops.push(self.graph.next_id_op());
        if let Err(e) = self.space.commit(ops, true).await {
            self.graph.forget_layers(&made.iter().map(|(_, top, _)| top.id).collect::<Vec<_>>());
            return Err(e);
        }
        let mut out = Vec::with_capacity(made.len());
        for (vol, top, snap) in made {
            vol.set_top(top)?;
            self.graph.snapshots.write().map_err(|_| poisoned())?.insert(snap.key(), snap.clone());
            tracing::info!(snapshot = %snap.key(), group, "snapshot created");
            out.push(snap);
        }
        drop(gates);
        Ok(out)
    }

    /// A writable volume from `VOLUME@SNAPSHOT`, or from a volume's current state (which
    /// freezes it into a hidden layer that both then share).
    pub async fn clone_volume(self: &Arc<Self>, source: &str, name: &str) -> Result<Arc<Volume>, EngineError> {
        self.clone_volume_with(source, name, VolumeOptions::default()).await
    }

    pub async fn clone_volume_with(
        self: &Arc<Self>,
        source: &str,
        name: &str,
        opts: VolumeOptions,
    ) -> Result<Arc<Volume>, EngineError> {
        let _admin = self.admin.lock().await;
        self.check_new_volume_name(name)?;
        let uuid = self.uuid_for(&opts)?;
        let mut ops = Vec::new();
        let source_vol = if source.contains('@') { None } else { Some(self.volume(source)?) };
        let _gate = match &source_vol {
            Some(v) => Some(v.gate.write().await),
            None => None,
        };
        let (base, size) = match &source_vol {
            Some(v) => (v.top()?, v.size()),
            None => {
                let snap = self.snapshot(source)?;
                (snap.layer.clone(), snap.size)
            }
        };
        let mut new_layers = Vec::new();
        let src_top = match &source_vol {
            Some(src) => {
                let t = self.graph.new_layer(Some(base.clone()))?;
                new_layers.push(t.id);
                let mut rec = src.record()?;
                rec.layer = t.id;
                ops.push(MetaOp::PutLayer { id: t.id, parent: Some(base.id) });
                ops.push(MetaOp::PutVolume(rec));
                Some(t)
            }
            None => None,
        };
        let top = self.graph.new_layer(Some(base.clone()))?;
        new_layers.push(top.id);
        let vol = Arc::new(Volume::new(self.graph.take_id(), uuid, name, size, now_unix(), top.clone(), opts));
        ops.push(MetaOp::PutLayer { id: top.id, parent: Some(base.id) });
        ops.push(MetaOp::PutVolume(vol.record()?));
        ops.push(self.graph.next_id_op());
        if let Err(e) = self.space.commit(ops, true).await {
            self.graph.forget_layers(&new_layers);
            return Err(e);
        }
        if let (Some(src), Some(t)) = (&source_vol, src_top) {
            src.set_top(t)?;
            base.hidden.store(true, Relaxed);
        }
        self.graph.volumes.write().map_err(|_| poisoned())?.insert(name.to_string(), vol.clone());
        tracing::info!(source, volume = name, "clone created");
        Ok(vol)
    }

    /// Changes a volume's QoS limits; open sessions get them with their next request.
    pub async fn set_qos(
        self: &Arc<Self>,
        name: &str,
        limits: crate::meta::qos::QosLimits,
    ) -> Result<Arc<Volume>, EngineError> {
        let _admin = self.admin.lock().await;
        let vol = self.volume(name)?;
        let mut rec = vol.record()?;
        rec.qos = limits;
        self.space.commit(vec![MetaOp::PutVolume(rec)], true).await?;
        vol.qos.set(limits);
        tracing::info!(volume = name, ?limits, "QoS limits set");
        Ok(vol)
    }

    pub async fn delete_volume(self: &Arc<Self>, name: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        let vol = self.volume(name)?;
        let _gate = vol.gate.write().await;
        let nodes = self.published_nodes(name);
        if !nodes.is_empty() {
            return Err(EngineError::Published { volume: name.to_string(), nodes });
        }
        // Sessions are counted under the same lock by `open_volume`: once the volume is marked
        // here with none open, no session can open it any more.
        {
            let _vols = self.graph.volumes.write().map_err(|_| poisoned())?;
            let n = vol.sessions();
            if n > 0 {
                return Err(EngineError::InUse { what: format!("volume {name:?}"), sessions: n });
            }
            vol.deleting.store(true, Relaxed);
        }
        if let Err(e) = self.space.commit(vec![MetaOp::DeleteVolume(name.to_string())], true).await {
            vol.deleting.store(false, Relaxed);
            return Err(e);
        }
        if let Some(v) = self.graph.volumes.write().map_err(|_| poisoned())?.remove(name) {
            self.epochs.forget(&v.uuid);
        }
        self.graph.release_layer(vol.top()?.id).await?;
        tracing::info!(volume = name, "volume deleted");
        drop(_gate);
        drop(_admin);
        // Its marks go with it (they serve only its rebuilds).
        for mark in self.graph.list_snapshots(Some(name)).into_iter().filter(|s| super::is_mark(&s.name)) {
            self.delete_snapshot(&format!("{name}@{}", mark.name)).await?;
        }
        Ok(())
    }

    pub async fn delete_snapshot(self: &Arc<Self>, key: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        let snap = {
            let snaps = self.graph.snapshots.write().map_err(|_| poisoned())?;
            let snap = snaps.get(key).cloned().ok_or_else(|| EngineError::NotFound(format!("snapshot {key:?}")))?;
            let n = snap.sessions.load(Relaxed);
            if n > 0 {
                return Err(EngineError::InUse { what: format!("snapshot {key:?}"), sessions: n });
            }
            snap.deleting.store(true, Relaxed);
            snap
        };
        if let Err(e) = self.space.commit(vec![MetaOp::DeleteSnapshot(key.to_string())], true).await {
            snap.deleting.store(false, Relaxed);
            return Err(e);
        }
        self.graph.snapshots.write().map_err(|_| poisoned())?.remove(key);
        self.graph.release_layer(snap.layer.id).await?;
        tracing::info!(snapshot = key, "snapshot deleted");
        Ok(())
    }
}
