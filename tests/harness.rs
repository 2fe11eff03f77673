//! Test harness: runs the real `thinbd` binary on free loopback ports in a temporary data dir,
//! and finds the external NBD clients the tests drive.

pub mod fault_proxy;
pub mod netns;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether an external tool is installed. Under CI (`CI=true`) a missing tool fails the test,
/// since the setup script must have installed it; elsewhere the test is skipped, loudly.
/// Whether Python's libseccomp binding (Debian's python3-seccomp) is there, for tests that run
/// a process under a seccomp filter; like [`require`], missing under CI is a failure.
pub fn require_python_seccomp() -> bool {
    let found = Command::new("/usr/bin/python3").args(["-c", "import seccomp"]).status().is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "python3-seccomp is missing; scripts/setup installs it");
        eprintln!("SKIPPED: python3-seccomp is not installed (run scripts/setup)");
    }
    found
}

/// Where a test daemon's log goes: `dir/name`, or, when `THINBD_TEST_LOGS` names a directory
/// (scripts/test sets it), a file of its own there, kept after the test so that scripts/test
/// can search every log of the suite for secrets.
pub fn log_path(dir: &Path, name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    match std::env::var_os("THINBD_TEST_LOGS") {
        Some(keep) => {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            PathBuf::from(keep).join(format!("{}-{n}-{name}", std::process::id()))
        }
        None => dir.join(name),
    }
}

pub fn require(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is not installed; scripts/setup installs it");
        }
        eprintln!("SKIPPED: {tool} is not installed (run scripts/setup)");
    }
    found
}

/// The `thinbd` binary next to the test executable (target/<profile>/thinbd), built on demand.
pub fn thinbd_bin() -> PathBuf {
    workspace_bin("thinbd", "thinbd")
}

/// The guest half of the kernel end-to-end test, built on demand.
pub fn guest_driver_bin() -> PathBuf {
    workspace_bin("thinbd-tests", "thinbd-e2e-guest")
}

/// The `thinbd-csi` binary, built on demand.
pub fn csi_bin() -> PathBuf {
    workspace_bin("thinbd-csi", "thinbd-csi")
}

fn workspace_bin(package: &str, name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let exe = std::env::current_exe().expect("executable path");
    let mut profile_dir = exe.parent().expect("target/<profile>");
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().expect("target/<profile>");
    }
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", name]);
        if release {
            cmd.arg("--release");
        }
        assert!(cmd.status().expect("cargo build").success(), "building {name} failed");
    }
    bin
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub struct Server {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub nbd_port: u16,
    pub api_port: u16,
    pub metrics_port: u16,
    pub log: PathBuf,
    extra: Vec<String>,
    /// RUST_LOG for the daemon.
    pub rust_log: String,
    /// A program (and its arguments) that starts the daemon, given its path and arguments
    /// after them: e.g. one that installs a seccomp filter first. Empty: started directly.
    pub launcher: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        Self::start_logged(extra, "info")
    }

    /// Starts with `rust_log` as the daemon's RUST_LOG (tests that read every log line).
    pub fn start_logged(extra: &[&str], rust_log: &str) -> Server {
        let mut s = Self::unstarted(extra, rust_log);
        s.spawn();
        s
    }

    /// Ports, data dir and log chosen, daemon not started (see [`Server::try_spawn`]).
    pub fn unstarted(extra: &[&str], rust_log: &str) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        Server {
            child: None,
            log: log_path(tmp.path(), "thinbd.log"),
            data_dir,
            nbd_port: free_port(),
            api_port: free_port(),
            metrics_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            rust_log: rust_log.to_string(),
            launcher: Vec::new(),
            _tmp: Some(tmp),
        }
    }

    /// Replaces the extra `serve` arguments for the next [`Server::spawn`].
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Starts (again) on the same data dir and ports.
    pub fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Starts and waits until it listens; `Err` with the exit status and log if it exited.
    pub fn try_spawn(&mut self) -> Result<(), String> {
        // A port `free_port` found free may be taken by another test before the daemon binds
        // it: then start again on fresh ports.
        for _ in 0..5 {
            let before = self.log_text().len();
            match self.spawn_once() {
                Err(_) if self.log_text()[before..].contains("Address already in use") => {
                    self.nbd_port = free_port();
                    self.api_port = free_port();
                    self.metrics_port = free_port();
                }
                r => return r,
            }
        }
        self.spawn_once()
    }

    fn spawn_once(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(thinbd_bin());
                c
            }
            None => Command::new(thinbd_bin()),
        };
        let child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--nbd-listen", &format!("127.0.0.1:{}", self.nbd_port)])
            .args(["--api-listen", &format!("127.0.0.1:{}", self.api_port)])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.metrics_port)])
            // `{nbd_port}` in extra arguments stands for the NBD port chosen here.
            .args(self.extra.iter().map(|a| a.replace("{nbd_port}", &self.nbd_port.to_string())))
            .env("RUST_LOG", &self.rust_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn thinbd");
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.api_port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.nbd_port)).is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("thinbd exited with {status} during start:\n{}", self.log_text()));
            }
            assert!(Instant::now() < deadline, "thinbd did not start:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd_port)
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }

    /// Runs a CLI command against this server; panics with its stderr on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(out.status.success(), "thinbd {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn cli_output(&self, args: &[&str]) -> Output {
        Command::new(thinbd_bin())
            .args(args)
            .args(["--api", &format!("127.0.0.1:{}", self.api_port)])
            .output()
            .expect("run thinbd")
    }

    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli(&["volume", "create", name, "--size", size]);
    }

    pub fn volume_json(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli(&["volume", "show", name, "-o", "json"])).expect("json")
    }

    pub fn metrics(&self) -> String {
        self.http_get("/metrics")
    }

    /// The metrics page once `ready` holds for it, within 10 s: counters the server updates
    /// just after the client has its answer. `why` describes what was missing when it fails.
    pub fn metrics_when(&self, ready: impl Fn(&str) -> bool, why: impl Fn(&str) -> String) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics();
            if ready(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "{}", why(&m));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The raw HTTP/1.0 response (status line, headers, body) of GET `path` on the metrics port.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics port");
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("response");
        body
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        send_signal(child.id(), "TERM");
        wait_timeout(&mut child, Duration::from_secs(40)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("thinbd did not stop on SIGTERM:\n{}", self.log_text())
        })
    }

    /// kill -9: no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The project's qemu guest with nbd.ko (tests/vm/guest.sh), if this machine can run it.
/// Under CI it must: a missing guest fails the test instead of skipping it.
pub fn guest_available() -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/guest.sh");
    let ok = require("qemu-system-x86_64")
        && Command::new("bash").arg(&script).arg("setup").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the qemu guest cannot be set up here (tests/vm/guest.sh setup)");
        }
        eprintln!("SKIPPED: no qemu guest with nbd.ko (tests/vm/guest.sh setup failed)");
    }
    ok
}

/// Runs `cmd` with bash inside the guest; `rw` directories are writable there. Returns the
/// exit status and the guest's output.
pub fn in_guest(cmd: &str, rw: &[&Path]) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/guest.sh");
    let rw: Vec<String> = rw.iter().map(|p| p.display().to_string()).collect();
    let out = Command::new("bash")
        .arg(&script)
        .args(["run", cmd])
        .env("NBD_GUEST_RW", rw.join(" "))
        .env("NBD_GUEST_TIMEOUT", "300")
        .output()
        .expect("run the guest");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A CSI volume capability: raw block (`fs` None) or a filesystem.
pub fn csi_cap(
    mode: thinbd_api::csi::volume_capability::access_mode::Mode,
    fs: Option<&str>,
) -> thinbd_api::csi::VolumeCapability {
    use thinbd_api::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    let access = match fs {
        None => AccessType::Block(BlockVolume {}),
        Some(f) => AccessType::Mount(MountVolume { fs_type: f.into(), ..Default::default() }),
    };
    thinbd_api::csi::VolumeCapability { access_type: Some(access), access_mode: Some(AccessMode { mode: mode as i32 }) }
}

/// A running `thinbd-csi` on a unix socket in a temporary directory.
pub struct CsiPlugin {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl CsiPlugin {
    /// Starts the plugin in `mode` (controller, node or all) against `api` (HOST:PORT).
    pub fn start(mode: &str, api: &str, node_id: &str) -> CsiPlugin {
        Self::start_with(mode, api, node_id, &[])
    }

    /// The same, with extra command-line arguments.
    pub fn start_with(mode: &str, api: &str, node_id: &str, extra: &[&str]) -> CsiPlugin {
        let tmp = tempfile::tempdir().expect("tempdir");
        let socket = tmp.path().join("csi.sock");
        let log = log_path(tmp.path(), "csi.log");
        let child = Command::new(csi_bin())
            .args(["--endpoint", &format!("unix://{}", socket.display())])
            .args(["--mode", mode, "--thinbd-api", api, "--node-id", node_id])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn thinbd-csi");
        let mut p = CsiPlugin { child, socket, log, _tmp: tmp };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&p.socket).is_err() {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("thinbd-csi exited with {st}:\n{}", p.log_text());
            }
            assert!(Instant::now() < deadline, "thinbd-csi did not start:\n{}", p.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A gRPC channel over the plugin's unix socket.
    pub async fn channel(&self) -> tonic::transport::Channel {
        let path = self.socket.clone();
        tonic::transport::Endpoint::try_from("http://localhost")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            }))
            .await
            .expect("connect to the CSI socket")
    }
}

impl Drop for CsiPlugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Panics if any of `secrets` appears in `log` (grant tokens, private keys).
pub fn assert_no_secrets(what: &str, log: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!s.is_empty() && !log.contains(s), "{what} log contains a secret ({} bytes of it)", s.len());
    }
}

/// Sends a signal through kill(1), which keeps this crate free of unsafe code.
pub fn send_signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "kill -{sig} {pid} failed");
    if sig == "STOP" {
        wait_stopped(pid);
    }
}

/// Waits until every thread of `pid` is stopped. `kill` returns once SIGSTOP is queued, but
/// the group stop reaches the other threads only when one of them takes the signal: until
/// then they go on running (on a loaded machine, for milliseconds) and may still serve a
/// request the test sends "to a paused process".
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let states: Vec<char> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            // The state follows the command name, which is in parentheses and may hold spaces.
            .filter_map(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
            .collect();
        if !states.is_empty() && states.iter().all(|s| matches!(s, 'T' | 't')) {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop: thread states {states:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn wait_timeout(child: &mut Child, d: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Runs an external command; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Writes a test CA, a server certificate for localhost/127.0.0.1 and a client certificate
/// into `dir`, named as GnuTLS clients (libnbd, qemu) expect: ca-cert.pem, server-cert.pem,
/// server-key.pem, client-cert.pem, client-key.pem.
pub fn make_certs(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "thinbd test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    for (who, usage) in
        [("server", ExtendedKeyUsagePurpose::ServerAuth), ("client", ExtendedKeyUsagePurpose::ClientAuth)]
    {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, format!("thinbd test {who}"));
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{who}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{who}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// What a writer was told about its writes, slot by slot: the last acknowledged one and the
/// ones after it that got no acknowledgement (they may or may not be on the volume). Writes are
/// `pattern(seed, slot_size)`, a fresh seed each. [`AckLog::check`] proves that a copy lost no
/// acknowledged write: each slot holds its last acknowledged write, or one sent after it.
pub struct AckLog {
    pub slot_size: usize,
    acked: Vec<Option<u64>>,
    unacked: Vec<Vec<u64>>,
}

impl AckLog {
    pub fn new(slots: usize, slot_size: usize) -> AckLog {
        AckLog { slot_size, acked: vec![None; slots], unacked: vec![Vec::new(); slots] }
    }

    pub fn acknowledged(&mut self, slot: usize, seed: u64) {
        self.acked[slot] = Some(seed);
        self.unacked[slot].clear();
    }

    pub fn unacknowledged(&mut self, slot: usize, seed: u64) {
        self.unacked[slot].push(seed);
    }

    pub fn acknowledged_count(&self) -> usize {
        self.acked.iter().flatten().count()
    }

    /// `copy`: the slots' bytes, from offset 0.
    pub fn check(&self, copy: &[u8]) -> Result<(), String> {
        for (slot, acked) in self.acked.iter().enumerate() {
            let got = &copy[slot * self.slot_size..(slot + 1) * self.slot_size];
            let fits = |seed: &u64| got == &pattern(*seed, self.slot_size)[..];
            let ok = match acked {
                Some(seed) => fits(seed) || self.unacked[slot].iter().any(fits),
                None => got.iter().all(|b| *b == 0) || self.unacked[slot].iter().any(fits),
            };
            if !ok {
                return Err(format!(
                    "slot {slot}: neither its last acknowledged write ({acked:?}) nor a later one ({:?})",
                    self.unacked[slot]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod ack_log_tests {
    use super::*;

    #[test]
    fn a_lost_or_stale_slot_is_caught_and_an_unacknowledged_one_allowed() {
        let mut log = AckLog::new(3, 16);
        log.acknowledged(0, 1);
        log.acknowledged(1, 2);
        log.unacknowledged(1, 3);
        let mut copy = [pattern(1, 16), pattern(3, 16), vec![0; 16]].concat();
        assert_eq!(log.check(&copy), Ok(()));
        // Slot 0 holds something older than its acknowledged write.
        copy[..16].copy_from_slice(&pattern(9, 16));
        assert!(log.check(&copy).is_err());
        copy[..16].copy_from_slice(&pattern(1, 16));
        // Slot 2 was never written: zeros only.
        copy[40] = 1;
        assert!(log.check(&copy).is_err());
    }
}
