//! `deploy/` checks that need no cluster: every manifest parses, the kustomization lists files
//! that exist, the driver name agrees everywhere, and every flag the manifests pass to our
//! binaries exists in their `--help` (so a renamed flag cannot silently break a deployment).

use std::path::{Path, PathBuf};
use std::process::Command;

use thinbd_tests::{csi_bin, require, thinbd_bin};
use yaml_rust2::{Yaml, YamlLoader};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("deploy dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn help(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).arg("--help").output().expect("run --help");
    assert!(out.status.success(), "{} {args:?} --help failed", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The flag names (`--x`) in a container's command and args.
fn flags(container: &Yaml) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    for key in ["command", "args"] {
        if let Some(v) = container[key].as_vec() {
            words.extend(v.iter().filter_map(|w| w.as_str().map(str::to_string)));
        }
    }
    words.iter().filter(|w| w.starts_with("--")).map(|w| w.split('=').next().unwrap_or(w).to_string()).collect()
}

#[test]
fn manifests_parse_and_our_flags_exist() {
    let dir = deploy_dir();
    let files = yaml_files(&dir);
    assert!(files.len() >= 10, "manifests missing: {files:?}");
    let serve_help = help(&thinbd_bin(), &["serve"]);
    let csi_help = help(&csi_bin(), &[]);
    let mut checked = 0;
    let mut kinds = Vec::new();
    for f in &files {
        for d in docs(f) {
            let kind = d["kind"].as_str().unwrap_or_else(|| panic!("{}: a document without kind", f.display()));
            kinds.push(kind.to_string());
            if kind == "Kustomization" {
                for r in d["resources"].as_vec().expect("resources") {
                    let name = r.as_str().expect("resource path");
                    assert!(dir.join(name).exists(), "kustomization lists missing {name}");
                }
                continue;
            }
            assert!(d["apiVersion"].as_str().is_some(), "{}: {kind} without apiVersion", f.display());
            assert!(d["metadata"]["name"].as_str().is_some(), "{}: {kind} without a name", f.display());
            match kind {
                "CSIDriver" => assert_eq!(d["metadata"]["name"].as_str(), Some("thinbd.csi.io")),
                "StorageClass" => assert_eq!(d["provisioner"].as_str(), Some("thinbd.csi.io")),
                "VolumeSnapshotClass" => assert_eq!(d["driver"].as_str(), Some("thinbd.csi.io")),
                _ => {}
            }
            let Some(containers) = d["spec"]["template"]["spec"]["containers"].as_vec() else { continue };
            for c in containers {
                let image = c["image"].as_str().unwrap_or_default();
                let command: Vec<&str> =
                    c["command"].as_vec().map(|v| v.iter().filter_map(Yaml::as_str).collect()).unwrap_or_default();
                let help_text = match (image, command.first().copied()) {
                    ("thinbd", Some("thinbd")) => &serve_help,
                    ("thinbd", Some("thinbd-csi")) => &csi_help,
                    ("thinbd", other) => panic!("{}: thinbd image runs {other:?}", f.display()),
                    _ if !image.starts_with("registry.k8s.io/sig-storage/") => continue,
                    _ => {
                        // A CSI sidecar: pinned to a released version, pointed at our socket.
                        assert!(image.contains(":v"), "{}: unpinned image {image}", f.display());
                        let args = flags(c);
                        assert!(
                            args.iter().any(|a| a == "--csi-address"),
                            "{}: {image} without --csi-address",
                            f.display()
                        );
                        continue;
                    }
                };
                for flag in flags(c) {
                    assert!(
                        help_text.contains(&format!("{flag} "))
                            || help_text.contains(&format!("{flag}\n"))
                            || help_text.contains(&format!("{flag} <")),
                        "{}: {flag} is not a flag of {command:?}",
                        f.display()
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} flags checked");
    for want in [
        "CSIDriver",
        "DaemonSet",
        "Deployment",
        "StorageClass",
        "VolumeSnapshotClass",
        "ClusterRole",
        "ReferenceGrant",
        "Job",
    ] {
        assert!(kinds.iter().any(|k| k == want), "no {want} in deploy/");
    }
}

/// Every object validates against the Kubernetes schemas (kubernetes-validate, strict: unknown
/// fields are errors). CRD kinds (VolumeSnapshot*, ReferenceGrant) have no bundled schema and
/// are only parsed.
#[test]
fn manifests_validate_against_kubernetes_schemas() {
    if !require("kubernetes-validate") {
        return;
    }
    let files: Vec<PathBuf> =
        yaml_files(&deploy_dir()).into_iter().filter(|f| !f.ends_with("kustomization.yaml")).collect();
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg("--quiet")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    assert!(
        out.status.success(),
        "kubernetes-validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
