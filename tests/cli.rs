//! The `thinbd` command line as scripts use it: exit codes by kind of failure, sizes as
//! Kubernetes writes them, shell completions, the man page, JSON logs.

use std::process::Command;

use thinbd_tests::{Server, thinbd_bin};

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

/// Each kind of failure has its own exit code (the table in the README and `thinbd --help`).
#[test]
fn failures_exit_with_the_code_of_their_kind() {
    let s = Server::start();
    let missing = s.cli_output(&["volume", "show", "no-such-volume"]);
    assert_eq!(code(&missing), Some(3), "not found: {}", String::from_utf8_lossy(&missing.stderr));
    s.cli(&["volume", "create", "v", "--size", "16Mi"]);
    assert_eq!(s.volume_json("v")["size_bytes"], 16 << 20, "16Mi is 16 MiB");
    let again = s.cli_output(&["volume", "create", "v", "--size", "16Mi"]);
    assert_eq!(code(&again), Some(4), "exists already: {}", String::from_utf8_lossy(&again.stderr));
    let shrink = s.cli_output(&["volume", "resize", "v", "--size", "8Mi"]);
    assert!(matches!(code(&shrink), Some(4 | 6)), "shrink refused: {}", String::from_utf8_lossy(&shrink.stderr));
    let odd = s.cli_output(&["volume", "create", "odd", "--size", "1000"]);
    assert_eq!(code(&odd), Some(6), "not a multiple of 512: {}", String::from_utf8_lossy(&odd.stderr));
    let usage = s.cli_output(&["volume", "frobnicate"]);
    assert_eq!(code(&usage), Some(2));
    // Nobody listens on port 1.
    let down = Command::new(thinbd_bin()).args(["volume", "list", "--api", "127.0.0.1:1"]).output().unwrap();
    assert_eq!(code(&down), Some(5), "unreachable: {}", String::from_utf8_lossy(&down.stderr));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach thinbd"));
}

#[test]
fn completions_and_man_page_are_generated() {
    let bash = Command::new(thinbd_bin()).args(["completions", "bash"]).output().unwrap();
    assert!(bash.status.success());
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(script.contains("complete") && script.contains("set-replicas"), "{script}");
    // bash accepts it.
    let path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(path.path(), &bash.stdout).unwrap();
    let sourced = Command::new("bash").arg("-c").arg(format!("source {}", path.path().display())).output().unwrap();
    assert!(sourced.status.success(), "{}", String::from_utf8_lossy(&sourced.stderr));
    let man = Command::new(thinbd_bin()).arg("man").output().unwrap();
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH thinbd"), "{page}");
    assert!(page.contains("Exit codes"), "the man page lists the exit codes");
}

/// `--log-format json`: every line the daemon logs is one JSON object; text logs carry no ANSI
/// codes when stderr is not a terminal.
#[test]
fn logs_are_json_lines_or_plain_text() {
    let mut json = Server::start_with(&["--log-format", "json"]);
    json.create_volume("v", "16MiB");
    json.stop();
    let log = json.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    let mut text = Server::start();
    text.create_volume("v", "16MiB");
    text.stop();
    assert!(!text.log_text().contains('\u{1b}'), "ANSI codes in a log that is not a terminal");
}
