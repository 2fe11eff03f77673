//! Group snapshots are one instant across their members: a writer alternates acknowledged
//! writes between two volumes with increasing sequence numbers while group snapshots are
//! taken; the sequence numbers a group holds, over both members, are always 1..=k with no gap.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_tests::{Server, runtime};

const BLOCK: u64 = 4096;
const WRITES: u64 = 3000;

/// Sequence numbers found in `export`'s blocks (block i of volume `a` holds 2i+1, of `b` 2i+2).
async fn sequences(c: &Client, blocks: u64) -> BTreeSet<u64> {
    let data = c.read(0, (blocks * BLOCK) as u32).await.unwrap();
    data.chunks(BLOCK as usize).map(|b| u64::from_le_bytes(b[..8].try_into().unwrap())).filter(|s| *s != 0).collect()
}

#[test]
fn a_group_snapshot_is_one_instant_across_its_volumes() {
    let s = Server::start();
    s.create_volume("a", "16MiB");
    s.create_volume("b", "16MiB");
    let rt = runtime();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (addr, done) = (s.addr(), done.clone());
        rt.spawn(async move {
            let a = Client::connect(&addr, ClientOptions::new("a")).await.unwrap();
            let b = Client::connect(&addr, ClientOptions::new("b")).await.unwrap();
            for seq in 1..=WRITES {
                let block = vec![0u8; BLOCK as usize];
                let mut block = block;
                block[..8].copy_from_slice(&seq.to_le_bytes());
                let (c, i) = if seq % 2 == 1 { (&a, (seq - 1) / 2) } else { (&b, (seq - 2) / 2) };
                // Each write is acknowledged before the next one is sent.
                c.write(i * BLOCK, &block, 0).await.unwrap();
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut groups = 0;
    while !done.load(Ordering::SeqCst) && groups < 20 {
        s.cli(&["snapshot", "create-group", &format!("g{groups}"), "a", "b"]);
        groups += 1;
    }
    rt.block_on(writer).unwrap();
    assert!(groups >= 3, "the writer finished before enough group snapshots were taken ({groups})");
    rt.block_on(async {
        let mut nonempty = 0;
        for g in 0..groups {
            let a = Client::connect(s.addr(), ClientOptions::new(&format!("a@g{g}"))).await.unwrap();
            let b = Client::connect(s.addr(), ClientOptions::new(&format!("b@g{g}"))).await.unwrap();
            let blocks = WRITES.div_ceil(2);
            let mut all = sequences(&a, blocks).await;
            all.extend(sequences(&b, blocks).await);
            let k = all.len() as u64;
            assert!(
                all.iter().copied().eq(1..=k),
                "group g{g} is not one instant: it holds {k} sequence numbers but not 1..={k} (largest {:?})",
                all.last()
            );
            nonempty += u32::from(k > 0 && k < WRITES);
        }
        assert!(nonempty >= 1, "no group snapshot was taken while writes were going on");
    });
    let listed: serde_json::Value = serde_json::from_str(&s.cli(&["snapshot", "list", "-o", "json"])).unwrap();
    let in_g0 = listed.as_array().unwrap().iter().filter(|x| x["group"] == "g0").count();
    assert_eq!(in_g0, 2, "{listed}");
    let err = s.cli_output(&["snapshot", "create-group", "g0", "a", "b"]);
    assert!(!err.status.success(), "a second group of the same name");
}
