//! Build hygiene that a reviewer would otherwise check by hand: the workspace's declared
//! `rust-version` is one that every locked dependency accepts.

use std::process::Command;

/// The platform the tests run on (the packages of other platforms' dependencies are not
/// downloaded here).
fn host() -> String {
    let out = Command::new("rustc").arg("-vV").output().expect("rustc -vV");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names the host").to_string()
}

/// `major.minor[.patch]` as a comparable triple.
fn version(v: &str) -> (u64, u64, u64) {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or_else(|_| panic!("bad version {v:?}")));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Every package `cargo metadata` resolves from the lock file states the oldest compiler it
/// builds with; ours must not be older than any of them, nor than what edition 2024 needs.
#[test]
fn rust_version_is_one_the_locked_dependencies_build_with() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline", "--filter-platform", &host()])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let ours: Vec<&serde_json::Value> = packages.iter().filter(|p| p["source"].is_null()).collect();
    assert!(!ours.is_empty());
    let declared = ours[0]["rust_version"].as_str().expect("the workspace declares rust-version");
    for p in &ours {
        assert_eq!(p["rust_version"].as_str(), Some(declared), "{} has another rust-version", p["name"]);
    }
    let (mut needed, mut by) = ((1, 85, 0), "edition 2024".to_string());
    for p in packages.iter().filter(|p| !p["source"].is_null()) {
        if let Some(v) = p["rust_version"].as_str().map(version).filter(|v| *v > needed) {
            (needed, by) = (v, format!("{} {}", p["name"].as_str().unwrap(), p["version"].as_str().unwrap()));
        }
    }
    assert!(
        version(declared) >= needed,
        "rust-version {declared} is older than {}.{}.{}, which {by} needs",
        needed.0,
        needed.1,
        needed.2
    );
}
