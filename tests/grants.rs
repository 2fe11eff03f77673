//! Attachment grants through the real binary with `--require-grants`: names without a grant are
//! refused, a grant's export name works (read-only grants refuse writes), single-writer grants
//! keep other nodes read-only, unpublish ends open sessions, grants survive a restart, and a
//! published volume cannot be deleted.

use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_tests::{Server, assert_no_secrets, runtime};

fn publish(s: &Server, vol: &str, node: &str, extra: &[&str]) -> Result<String, String> {
    let mut args = vec!["volume", "publish", vol, "--node", node];
    args.extend_from_slice(extra);
    let out = s.cli_output(&args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn grants_gate_exports_and_revocation_ends_sessions() {
    let mut s = Server::start_logged(&["--require-grants"], "trace");
    s.create_volume("vol", "16MiB");
    let rt = runtime();
    rt.block_on(async {
        // By name: refused, and the list is empty.
        assert!(Client::connect(s.addr(), ClientOptions::new("vol")).await.is_err(), "plain name must be refused");
        let listed = thinbd_protocol::client::list_exports(s.addr(), &ClientOptions::new("")).await.unwrap();
        assert!(listed.is_empty(), "export names leaked: {listed:?}");
    });

    let rw = publish(&s, "vol", "node-a", &["--single-writer"]).expect("publish");
    assert!(rw.starts_with("vol#") && rw.len() > 30, "export name {rw}");
    assert_eq!(publish(&s, "vol", "node-a", &["--single-writer"]).unwrap(), rw, "publish is idempotent");
    let err = publish(&s, "vol", "node-a", &["--read-only"]).unwrap_err();
    assert!(err.contains("other access"), "{err}");
    let err = publish(&s, "vol", "node-b", &[]).unwrap_err();
    assert!(err.contains("single writer"), "{err}");
    let ro = publish(&s, "vol", "node-b", &["--read-only"]).expect("a reader may join");
    // A guessed token is no better than no token.
    let forged = format!("vol#{}", "0".repeat(32));

    rt.block_on(async {
        assert!(Client::connect(s.addr(), ClientOptions::new(&forged)).await.is_err());
        let c = Client::connect(s.addr(), ClientOptions::new(&rw)).await.expect("grant opens");
        c.write(0, b"granted", 0).await.unwrap();
        c.flush().await.unwrap();
        let r = Client::connect(s.addr(), ClientOptions::new(&ro)).await.expect("read-only grant opens");
        assert_eq!(r.read(0, 7).await.unwrap(), b"granted");
        let e = r.write(0, b"x", 0).await.expect_err("read-only grant must refuse writes");
        assert_eq!(e.errno(), Some(1), "EPERM");
        r.disconnect().await.unwrap();
        // Unpublishing ends the open session.
        s.cli(&["volume", "unpublish", "vol", "--node", "node-a"]);
        let mut closed = false;
        for _ in 0..50 {
            if c.read(0, 1).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(closed, "session survived its revoked grant");
        assert!(Client::connect(s.addr(), ClientOptions::new(&rw)).await.is_err(), "revoked name still opens");
    });

    // Deleting a published volume is refused; grants survive a restart.
    let out = s.cli_output(&["volume", "delete", "vol"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("published to node-b"));
    s.stop();
    s.spawn();
    let v = s.volume_json("vol");
    assert_eq!(v["published_nodes"], serde_json::json!(["node-b"]));
    rt.block_on(async {
        let r = Client::connect(s.addr(), ClientOptions::new(&ro)).await.expect("grant survives restart");
        assert_eq!(r.read(0, 7).await.unwrap(), b"granted");
        r.disconnect().await.unwrap();
    });
    s.cli(&["volume", "unpublish", "vol", "--node", "node-b"]);
    s.cli(&["volume", "unpublish", "vol", "--node", "node-b"]);
    s.cli(&["volume", "delete", "vol"]);
    // Every line the daemon logged, at every level, is free of the grant secrets.
    let token = |name: &str| name.split_once('#').map(|(_, t)| t.to_string()).unwrap();
    assert_no_secrets("thinbd", &s.log_text(), &[&token(&rw), &token(&ro)]);
    // scripts/test searches the logs of the whole suite for words of this shape.
    for t in [token(&rw), token(&ro)] {
        assert!(t.len() == 32 && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "token {t}");
    }
    assert!(s.log_text().contains("NBD session started"), "the log was not written at all");
}

#[test]
fn a_plain_name_is_refused_with_the_reason() {
    let s = Server::start_with(&["--require-grants"]);
    s.create_volume("vol", "1MiB");
    let err = runtime().block_on(Client::connect(s.addr(), ClientOptions::new("vol"))).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("grant is required") && msg.contains("%23"), "{msg}");
}

#[test]
fn loopback_is_trusted_by_default() {
    let s = Server::start();
    s.create_volume("open", "1MiB");
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("open")).await.expect("loopback opens by name");
        c.disconnect().await.unwrap();
    });
}
