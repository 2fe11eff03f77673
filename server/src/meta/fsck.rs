//! `thinbd fsck`: proves that the maps, the allocator and the layer graph agree. Every physical
//! cluster below the high-water mark must be owned by exactly one layer or be free; every layer
//! must be reachable from a volume or snapshot; no layer may be its own ancestor.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::meta::store::Loaded;
use crate::meta::store::ZERO_MARK;

#[derive(Debug, Default)]
pub struct Report {
    pub volumes: usize,
    pub snapshots: usize,
    pub layers: usize,
    pub mapped_clusters: u64,
    pub free_clusters: u64,
    pub high_water: u64,
    pub capacity: u64,
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} volumes, {} snapshots, {} layers; {} clusters mapped, {} free, high-water mark {} of {}",
            self.volumes,
            self.snapshots,
            self.layers,
            self.mapped_clusters,
            self.free_clusters,
            self.high_water,
            self.capacity
        )?;
        if self.ok() {
            writeln!(f, "OK: maps, allocator and layers agree")
        } else {
            writeln!(f, "{} problem(s):", self.problems.len())?;
            for p in self.problems.iter().take(100) {
                writeln!(f, "  - {p}")?;
            }
            if self.problems.len() > 100 {
                writeln!(f, "  ... and {} more", self.problems.len() - 100)?;
            }
            Ok(())
        }
    }
}

pub fn check(m: &Loaded) -> Report {
    let mut r = Report {
        volumes: m.volumes.len(),
        snapshots: m.snapshots.len(),
        layers: m.layers.len(),
        free_clusters: m.free.len() as u64,
        high_water: m.high_water,
        capacity: m.config.capacity_clusters,
        ..Report::default()
    };
    let mut p = |s: String| r.problems.push(s);
    if m.high_water > m.config.capacity_clusters {
        p(format!("high-water mark {} is above the capacity {}", m.high_water, m.config.capacity_clusters));
    }
    let parents: BTreeMap<u64, Option<u64>> = m.layers.iter().map(|l| (l.id, l.parent)).collect();
    // Ownership: each physical cluster in at most one place.
    let mut owner: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut mapped = 0u64;
    for l in &m.layers {
        for &(v, pc) in &l.extents {
            if pc == ZERO_MARK {
                continue;
            }
            mapped += 1;
            if pc >= m.high_water {
                p(format!("layer {} cluster {v} maps physical {pc}, above the high-water mark {}", l.id, m.high_water));
            }
            if let Some((ol, ov)) = owner.insert(pc, (l.id, v)) {
                p(format!(
                    "physical cluster {pc} is mapped twice: layer {ol} cluster {ov} and layer {} cluster {v}",
                    l.id
                ));
            }
        }
    }
    let free: BTreeSet<u64> = m.free.iter().copied().collect();
    for &f in &free {
        if f >= m.high_water {
            p(format!("free cluster {f} is above the high-water mark {}", m.high_water));
        }
        if let Some((l, v)) = owner.get(&f) {
            p(format!("physical cluster {f} is free but mapped by layer {l} cluster {v}"));
        }
    }
    let leaked = (0..m.high_water).filter(|c| !owner.contains_key(c) && !free.contains(c)).count();
    if leaked > 0 {
        p(format!("{leaked} cluster(s) below the high-water mark are neither mapped nor free (leaked)"));
    }
    if m.orphan_extents > 0 {
        p(format!("{} extent row(s) belong to layers that do not exist", m.orphan_extents));
    }
    // Layer graph.
    let mut referenced: BTreeSet<u64> = BTreeSet::new();
    for (&id, parent) in &parents {
        if let Some(par) = parent {
            if !parents.contains_key(par) {
                p(format!("layer {id} has missing parent {par}"));
            }
            referenced.insert(*par);
        }
        let mut seen = BTreeSet::from([id]);
        let mut cur = *parent;
        while let Some(c) = cur {
            if !seen.insert(c) {
                p(format!("layer {id} is in a parent cycle"));
                break;
            }
            cur = parents.get(&c).copied().flatten();
        }
    }
    let mut tops: BTreeMap<u64, &str> = BTreeMap::new();
    for v in &m.volumes {
        if !parents.contains_key(&v.layer) {
            p(format!("volume {:?} uses missing layer {}", v.name, v.layer));
        }
        if let Some(other) = tops.insert(v.layer, &v.name) {
            p(format!("volumes {other:?} and {:?} share the writable layer {}", v.name, v.layer));
        }
        if v.id >= m.next_id {
            p(format!("volume {:?} id {} is not below the id counter {}", v.name, v.id, m.next_id));
        }
        referenced.insert(v.layer);
    }
    for s in &m.snapshots {
        if !parents.contains_key(&s.layer) {
            p(format!("snapshot {:?} uses missing layer {}", s.key(), s.layer));
        }
        if let Some(v) = tops.get(&s.layer) {
            p(format!("snapshot {:?} shares layer {} with the writable volume {v:?}", s.key(), s.layer));
        }
        referenced.insert(s.layer);
    }
    for &id in parents.keys() {
        if id >= m.next_id {
            p(format!("layer {id} is not below the id counter {}", m.next_id));
        }
        if !referenced.contains(&id) {
            p(format!("layer {id} is referenced by no volume, snapshot or layer (leaked)"));
        }
        if let Some(v) = tops.get(&id)
            && parents.values().any(|par| *par == Some(id))
        {
            p(format!("the writable layer {id} of volume {v:?} is another layer's parent"));
        }
    }
    r.mapped_clusters = mapped;
    r
}
