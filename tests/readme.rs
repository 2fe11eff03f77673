//! The README's console examples, run as written: every `$ ` line of every ```console block,
//! in order, against a real daemon on the same data dir (restarted with the flags of the
//! block's `thinbd serve` line, if it has one). Only the ports are changed to the test's, and
//! `thinbd` is the binary under test.

use std::process::Command;

use thinbd_tests::{Server, pattern, require, thinbd_bin};

/// The commands of each ```console block.
fn console_blocks(readme: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```console") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(b), l) => {
                if let Some(cmd) = l.strip_prefix("$ ") {
                    b.push(cmd.to_string());
                }
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn readme_console_examples_run_as_written() {
    for tool in ["qemu-img", "qemu-io", "nbdinfo", "fio", "curl"] {
        if !require(tool) {
            return;
        }
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let blocks = console_blocks(&readme);
    assert!(blocks.len() >= 3, "expected the README's console examples, found {}", blocks.len());
    let work = tempfile::tempdir().unwrap();
    // "disk.img is any raw image": 256 MiB of data.
    std::fs::write(work.path().join("disk.img"), pattern(7, 256 << 20)).unwrap();
    let bin_dir = thinbd_bin().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut server: Option<Server> = None;
    let mut data_dir = None;
    for (i, block) in blocks.iter().enumerate() {
        let serve: Vec<&str> = block
            .iter()
            .find_map(|c| c.strip_prefix("thinbd serve"))
            .map(|flags| flags.trim_end_matches('&').split_whitespace().collect())
            .unwrap_or_default();
        // (Re)start on the same data dir with this block's flags.
        let s = match server.take() {
            Some(mut s) => {
                s.stop();
                s.set_extra(&serve);
                s.spawn();
                s
            }
            None => Server::start_with(&serve),
        };
        data_dir.get_or_insert_with(|| s.data_dir.clone());
        let mut script = String::from("set -euo pipefail\n");
        for cmd in block {
            if cmd.starts_with("alias ") || cmd.starts_with("thinbd serve") {
                continue;
            }
            let cmd = cmd
                .replace("127.0.0.1:10809", &s.addr())
                .replace("127.0.0.1:10811", &format!("127.0.0.1:{}", s.metrics_port));
            script.push_str(&format!("echo '+ {}'\n{cmd}\n", cmd.replace('\'', "")));
        }
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(work.path())
            .env("PATH", &path)
            .env("THINBD_API", format!("127.0.0.1:{}", s.api_port))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README console block {} failed:\n{}\n{}\nserver log:\n{}",
            i + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            s.log_text()
        );
        s.child.as_ref().expect("still running");
        server = Some(s);
    }
}
