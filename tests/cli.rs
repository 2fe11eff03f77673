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

/// `thinbd status` names the versions, the node, how the pool is driven and the cluster; the
/// metrics page has the same as `thinbd_build_info` and `thinbd_pool_info`.
#[test]
fn status_shows_how_the_pool_is_driven() {
    let s = Server::start();
    let status: serde_json::Value = serde_json::from_str(&s.cli(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["daemon_version"], status["cli_version"], "{status}");
    assert_eq!(status["io_engine_requested"], "uring", "{status}");
    assert_eq!(status["clustered"], false, "{status}");
    assert!(status["node"].as_str().is_some_and(|n| !n.is_empty()), "{status}");
    let engine = status["io_engine"].as_str().unwrap().to_string();
    let m = s.metrics();
    assert!(m.contains(&format!("thinbd_pool_info{{io_engine=\"{engine}\",io_engine_requested=\"uring\",")), "{m}");
    assert!(m.contains("thinbd_build_info{version=\""), "{m}");
    let table = s.cli(&["status"]);
    assert!(table.contains("io engine:") && table.contains("cluster:    none"), "{table}");
    // -o yaml: the same fields.
    let yaml = s.cli(&["status", "-o", "yaml"]);
    let doc = &yaml_rust2::YamlLoader::load_from_str(&yaml).unwrap()[0];
    assert_eq!(doc["io_engine"].as_str(), status["io_engine"].as_str(), "{yaml}");
    assert_eq!(doc["capacity_bytes"].as_i64(), status["capacity_bytes"].as_i64(), "{yaml}");
    assert_eq!(doc["clustered"].as_bool(), Some(false), "{yaml}");
}

/// A daemon that may not use io_uring (containerd 2's default seccomp profile forbids it) falls
/// back to threads, and says so: a warning in its log, `thinbd status`, `thinbd_pool_info`.
#[test]
fn a_refused_io_uring_is_reported_not_silent() {
    if !thinbd_tests::require_python_seccomp() {
        return;
    }
    const FORBID_URING: &str = "import os, sys, seccomp\n\
        f = seccomp.SyscallFilter(seccomp.ALLOW)\n\
        f.add_rule(seccomp.ERRNO(1), 'io_uring_setup')\n\
        f.load()\n\
        os.execv(sys.argv[1], sys.argv[1:])\n";
    let mut s = Server::unstarted(&[], "info");
    s.launcher = vec!["/usr/bin/python3".into(), "-c".into(), FORBID_URING.into()];
    s.spawn();
    s.create_volume("v", "16MiB");
    let status: serde_json::Value = serde_json::from_str(&s.cli(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["io_engine"], "threads", "{status}");
    assert_eq!(status["io_engine_requested"], "uring", "{status}");
    assert!(s.cli(&["status"]).contains("WARNING: uring was asked for and refused"));
    let m = s.metrics();
    assert!(m.contains("thinbd_pool_info{io_engine=\"threads\",io_engine_requested=\"uring\","), "{m}");
    assert!(s.log_text().contains("pool I/O does not use the requested engine"), "{}", s.log_text());
}

/// `-o wide` adds UUIDs, where the data is and creation times (RFC 3339, UTC) to the lists;
/// JSON carries the same time as `created` beside the Unix seconds.
#[test]
fn wide_lists_show_uuids_and_rfc3339_times() {
    let s = Server::start();
    s.cli(&["volume", "create", "v", "--size", "16Mi"]);
    s.cli(&["snapshot", "create", "v", "s1"]);
    let v = s.volume_json("v");
    let created = v["created"].as_str().expect("created").to_string();
    let secs = v["created_unix_seconds"].as_u64().unwrap();
    // Independent of our formatter: GNU date renders the same second.
    let date = Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"]).output().unwrap();
    assert_eq!(created, String::from_utf8_lossy(&date.stdout).trim(), "created is RFC 3339 in UTC");
    let uuid = v["uuid"].as_str().unwrap().to_string();

    let narrow = s.cli(&["volume", "list"]);
    assert!(!narrow.contains(&uuid) && !narrow.contains("CREATED"), "{narrow}");
    let wide = s.cli(&["volume", "list", "-o", "wide"]);
    let header = wide.lines().next().unwrap();
    assert!(header.contains("UUID") && header.contains("DATA ON") && header.contains("CREATED"), "{wide}");
    let row = wide.lines().find(|l| l.starts_with("v ")).unwrap_or_else(|| panic!("{wide}"));
    assert!(row.contains(&uuid) && row.contains(&created), "{row}");

    let snaps = s.cli(&["snapshot", "list", "-o", "wide"]);
    let row = snaps.lines().find(|l| l.starts_with("v@s1")).unwrap_or_else(|| panic!("{snaps}"));
    let snap: serde_json::Value = serde_json::from_str(&s.cli(&["snapshot", "list", "-o", "json"])).unwrap();
    let snap_created = snap[0]["created"].as_str().unwrap();
    assert!(row.contains(snap[0]["uuid"].as_str().unwrap()) && row.contains(snap_created), "{row}");
    assert!(s.cli(&["volume", "show", "v"]).contains(&format!("created:   {created}")));
}
