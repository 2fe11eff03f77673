//! Extent-map lookups and updates, layer resolution, and snapshot/clone creation on a 1 TiB
//! volume with 100k mapped clusters (printed as well, since the target is "< 100 ms").

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use thinbd::engine::{Engine, EngineConfig};
use thinbd::layers::extent_map::ExtentMap;
use thinbd::layers::layer::Layer;

fn extent_map(c: &mut Criterion) {
    let map = ExtentMap::from_pairs((0..100_000u64).map(|v| (v * 3, v)));
    c.bench_function("extent_map_lookup_100k", |b| {
        let mut v = 0u64;
        b.iter(|| {
            v = (v + 7919) % 300_000;
            black_box(map.get(v))
        })
    });
    c.bench_function("extent_map_insert_remove", |b| {
        let mut m = map.clone();
        let mut v = 1u64;
        b.iter(|| {
            v = (v + 7919) % 300_000;
            m.insert(v, v);
            m.remove(v + 1);
        })
    });
    c.bench_function("extent_map_runs_512", |b| b.iter(|| black_box(map.runs(1000, 1512))));
    // A volume four layers above its oldest snapshot, resolving one 32 MiB read (512 clusters).
    let mut layer = Layer::new(1, map.clone(), None);
    for id in 2..=4 {
        layer = Layer::new(id, ExtentMap::from_pairs((0..10_000u64).map(|v| (v * 7 + id, v))), Some(layer));
    }
    c.bench_function("layer_resolve_512_depth4", |b| b.iter(|| black_box(layer.resolve(20_000, 20_512))));
}

fn snapshot_and_clone(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Engine::open(&EngineConfig {
        data_dir: dir.path().to_path_buf(),
        capacity: Some(1 << 40),
        cluster_size: None,
        io_engine: Default::default(),
        buffered_io: false,
        force: false,
    })
    .expect("engine");
    rt.block_on(async {
        e.create_volume("big", 1 << 40).await.expect("volume");
        // 100k clusters spread over the whole 1 TiB.
        e.populate_for_bench("big", 100_000, 160).await.expect("populate");
        let t = Instant::now();
        e.create_snapshot("big", "first").await.expect("snapshot");
        let snap = t.elapsed();
        let t = Instant::now();
        e.clone_volume("big@first", "clone").await.expect("clone");
        let clone = t.elapsed();
        println!("1 TiB volume, 100k mapped clusters: snapshot {snap:.2?}, clone {clone:.2?}");
    });
    let mut n = 0u64;
    c.bench_function("snapshot_create_1TiB_100k_clusters", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(e.create_snapshot("big", &format!("s{n}"))).expect("snapshot")
        })
    });
    c.bench_function("clone_create_1TiB_100k_clusters", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(e.clone_volume("big@first", &format!("c{n}"))).expect("clone")
        })
    });
}

criterion_group!(benches, extent_map, snapshot_and_clone);
criterion_main!(benches);
