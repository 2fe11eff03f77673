//! Network namespaces for cluster tests: a bridge in a namespace of its own and nodes joined to
//! it by veth pairs (`10.77.0.I/24`), made per test and torn down when dropped. Processes run in
//! a node with `ip netns exec`; test code runs in one on a thread that entered its namespace.
//! Partitions are nftables rules inside a node. Traffic never leaves these namespaces.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Fabric {
    prefix: String,
    nodes: usize,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr))),
    }
}

impl Fabric {
    /// Nodes `1..=nodes` on one bridge. `None` (the test is skipped, loudly) where namespaces
    /// cannot be made here; under CI that fails instead.
    pub fn up(nodes: usize) -> Option<Fabric> {
        // Short: interface names (PREFIX + "h" + I) must fit in 15 bytes.
        let prefix = format!("tb{:x}{}", std::process::id() & 0xfff, NEXT.fetch_add(1, Ordering::Relaxed));
        let fabric = Fabric { prefix, nodes };
        match fabric.build() {
            Ok(()) => Some(fabric),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("cannot make network namespaces: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: cannot make network namespaces here: {e}");
                None
            }
        }
    }

    fn build(&self) -> Result<(), String> {
        let sw = self.ns_name("sw");
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 1..=self.nodes {
            let ns = self.ns(i);
            let (host, peer) = (format!("{}h{i}", self.prefix), format!("{}b{i}", self.prefix));
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &host, "netns", &ns])?;
            ip(&["link", "set", &peer, "netns", &sw])?;
            ip(&["-n", &sw, "link", "set", &peer, "master", "br0", "up"])?;
            ip(&["-n", &ns, "link", "set", &host, "name", "eth0"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", self.ip(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn ns_name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    pub fn ns(&self, i: usize) -> String {
        self.ns_name(&i.to_string())
    }

    pub fn ip(&self, i: usize) -> String {
        format!("10.77.0.{i}")
    }

    /// `program` run in node `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Runs `f` on a thread inside node `i`'s network namespace (sockets it opens live there).
    pub fn run_in<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.ns(i));
        std::thread::scope(|s| {
            s.spawn(move || {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in namespace")
        })
    }

    /// Starts `f` on a thread inside node `i`'s network namespace (a client that runs while the
    /// test does other things).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(i));
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// Waits until something listens on `addr` as seen from node `i`.
    pub fn wait_listening(&self, i: usize, addr: &str, within: Duration) -> bool {
        let addr = addr.to_string();
        self.run_in(i, move || {
            let deadline = Instant::now() + within;
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(&addr).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
    }

    fn nft(&self, i: usize, args: &[&str]) {
        let out = self.command(i, "nft").args(args).output().expect("nft");
        assert!(out.status.success(), "nft {args:?} in node {i}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Drops all traffic between nodes `i` and `j`, both ways.
    pub fn cut(&self, i: usize, j: usize) {
        self.cut_one_way(i, j);
        self.cut_one_way(j, i);
    }

    /// Drops the packets node `i` sends to node `j` (what `j` sends to `i` still arrives).
    pub fn cut_one_way(&self, i: usize, j: usize) {
        for (a, b, hook) in [(i, j, "out"), (j, i, "in")] {
            if self
                .command(a, "nft")
                .args(["list", "table", "inet", "part"])
                .output()
                .is_ok_and(|o| !o.status.success())
            {
                self.nft(a, &["add", "table", "inet", "part"]);
                self.nft(a, &["add", "chain", "inet", "part", "out", "{ type filter hook output priority 0; }"]);
                self.nft(a, &["add", "chain", "inet", "part", "in", "{ type filter hook input priority 0; }"]);
            }
            let (side, address) = if hook == "out" { ("daddr", self.ip(b)) } else { ("saddr", self.ip(b)) };
            self.nft(a, &["add", "rule", "inet", "part", hook, "ip", side, &address, "drop"]);
        }
    }

    /// Removes every partition.
    pub fn heal(&self) {
        for i in 1..=self.nodes {
            let _ = self.command(i, "nft").args(["delete", "table", "inet", "part"]).output();
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        let all = (1..=self.nodes).map(|i| self.ns(i)).chain([self.ns_name("sw")]);
        for ns in all {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// etcd (Debian's etcd-server) in node `i` of a fabric, on `IP:2379`, with its data in a temp dir.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(fabric: &Fabric, i: usize) -> Etcd {
        let ip = fabric.ip(i);
        let (etcd, client) = Self::spawn(fabric.command(i, "etcd"), &ip, 2379, 2380);
        assert!(fabric.wait_listening(i, &client, Duration::from_secs(20)), "etcd did not start");
        etcd
    }

    /// etcd on loopback, on free ports (tests that need no namespaces).
    pub fn start_local() -> Etcd {
        let (client_port, peer_port) = (crate::free_port(), crate::free_port());
        let (etcd, client) = Self::spawn(Command::new("etcd"), "127.0.0.1", client_port, peer_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&client).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }

    fn spawn(mut etcd: Command, ip: &str, client_port: u16, peer_port: u16) -> (Etcd, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let (client, peer) = (format!("http://{ip}:{client_port}"), format!("http://{ip}:{peer_port}"));
        let child = etcd
            .args(["--name", "e", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("e={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        (Etcd { child, endpoint: client, _dir: dir }, format!("{ip}:{client_port}"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `thinbd serve` in node `i` of a fabric: NBD on `IP:10809`, API on `IP:10810`, metrics on
/// `IP:10811`, joined to `etcd`, named `node-I`.
pub struct NetNode {
    pub index: usize,
    pub name: String,
    pub ip: String,
    pub data_dir: std::path::PathBuf,
    pub log: std::path::PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    /// Environment of [`NetNode::cli`] (the CLI's `THINBD_API_*` TLS settings).
    pub cli_env: Vec<(String, String)>,
    _tmp: tempfile::TempDir,
}

impl NetNode {
    pub fn start(fabric: &Fabric, i: usize, etcd: &str, extra: &[&str]) -> NetNode {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ip = fabric.ip(i);
        let name = format!("node-{i}");
        let mut args: Vec<String> =
            ["serve", "--nbd-listen", &format!("{ip}:10809"), "--api-listen"].iter().map(|s| s.to_string()).collect();
        args.extend([
            format!("{ip}:10810"),
            "--metrics-listen".into(),
            format!("{ip}:10811"),
            "--etcd".into(),
            etcd.into(),
            "--node-name".into(),
            name.clone(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut n = NetNode {
            index: i,
            name,
            ip,
            data_dir: tmp.path().join("data"),
            log: crate::log_path(tmp.path(), "thinbd.log"),
            child: None,
            args,
            cli_env: Vec::new(),
            _tmp: tmp,
        };
        n.spawn(fabric);
        n
    }

    /// Starts (again) on the same data dir.
    pub fn spawn(&mut self, fabric: &Fabric) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let child = fabric
            .command(self.index, crate::thinbd_bin())
            .args(&self.args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn thinbd");
        self.child = Some(child);
        let api = format!("{}:10810", self.ip);
        assert!(
            fabric.wait_listening(self.index, &api, Duration::from_secs(30)),
            "{} did not start:\n{}",
            self.name,
            self.log_text()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9 (of `ip netns exec`, which exec'd thinbd: the same process).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A CLI command against this node's API, run in its namespace, as it ended.
    pub fn cli_output(&self, fabric: &Fabric, args: &[&str]) -> std::process::Output {
        fabric
            .command(self.index, crate::thinbd_bin())
            .args(args)
            .args(["--api", &format!("{}:10810", self.ip)])
            .envs(self.cli_env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run thinbd")
    }

    /// A CLI command against this node's API, run in its namespace; panics on failure.
    pub fn cli(&self, fabric: &Fabric, args: &[&str]) -> String {
        let out = self.cli_output(fabric, args);
        assert!(
            out.status.success(),
            "thinbd {args:?} on {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `node list -o json` as this node sees it: name → up.
    pub fn nodes_up(&self, fabric: &Fabric) -> std::collections::BTreeMap<String, bool> {
        let v: serde_json::Value =
            serde_json::from_str(&self.cli(fabric, &["node", "list", "-o", "json"])).expect("json");
        v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| (n["name"].as_str().unwrap_or_default().to_string(), n["up"].as_bool().unwrap_or(false)))
            .collect()
    }
}

impl Drop for NetNode {
    fn drop(&mut self) {
        self.kill9();
    }
}
