//! The `thinbd` binary: `serve` runs the daemon; the other commands talk to it over the
//! management API.

use std::path::PathBuf;

mod exit_code;
mod yaml;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use thinbd::daemon::{ServeOptions, serve};
use thinbd::size::{format_size, parse_size};
use thinbd_api::pb;
use thinbd_api::pb::management_client::ManagementClient;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "thinbd",
    version,
    about = "Thin-provisioned copy-on-write block volumes over NBD",
    after_help = exit_code::HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, Default)]
enum Output {
    #[default]
    Table,
    /// The table with more columns (UUIDs, where the data is, creation times).
    Wide,
    Json,
    Yaml,
}

impl Output {
    /// Prints `v` as JSON (one line) or YAML; tables are printed by each command.
    fn emit(self, v: &serde_json::Value) {
        match self {
            Output::Yaml => print!("{}", yaml::to_yaml(v)),
            _ => println!("{v}"),
        }
    }
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Management API of the daemon.
    #[arg(long, global = true, default_value = "127.0.0.1:10810", env = "THINBD_API")]
    api: String,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// CA that signed the API server's certificate: talk TLS, presenting --api-cert/--api-key.
    #[arg(long, global = true, env = "THINBD_API_CA", requires_all = ["api_cert", "api_key"])]
    api_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to the API server.
    #[arg(long, global = true, env = "THINBD_API_CERT")]
    api_cert: Option<PathBuf>,
    /// Private key (PEM) of --api-cert.
    #[arg(long, global = true, env = "THINBD_API_KEY")]
    api_key: Option<PathBuf>,
    /// Name the API server's certificate carries, if not the host of --api.
    #[arg(long, global = true, env = "THINBD_API_SERVER_NAME")]
    api_server_name: Option<String>,
}

impl ClientArgs {
    fn tls(&self) -> Option<thinbd_api::tls::ApiClientTls> {
        match (&self.api_ca, &self.api_cert, &self.api_key) {
            (Some(ca), Some(cert), Some(key)) => Some(thinbd_api::tls::ApiClientTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: self.api_server_name.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the storage daemon.
    #[command(after_help = "Examples:\n  thinbd serve --data-dir /var/lib/thinbd --capacity 100GiB\n  \
        thinbd serve --data-dir /var/lib/thinbd --etcd http://10.0.0.5:2379 --node-name node-1")]
    Serve(Box<ServeOptions>),
    /// Manage volumes.
    #[command(after_help = "Examples:\n  thinbd volume create pg-data --size 20GiB\n  \
        thinbd volume create pg-data --size 20Gi --replicas 3 --max-iops 5000\n  \
        thinbd volume list -o json\n  thinbd volume resize pg-data --size 40GiB\n  \
        thinbd volume publish pg-data --node node-1 --single-writer")]
    Volume {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Manage snapshots.
    #[command(after_help = "Examples:\n  thinbd snapshot create pg-data before-upgrade\n  \
        thinbd snapshot list pg-data\n  thinbd volume clone pg-data@before-upgrade pg-test\n  \
        thinbd snapshot diff pg-data@before-upgrade pg-data -o json")]
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Cluster nodes (with `serve --etcd`), or this node alone.
    #[command(after_help = "Example:\n  thinbd node list -o json")]
    Node {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Versions, this node, how its pool is driven (io engine, direct I/O), the pool and the
    /// cluster at a glance.
    #[command(after_help = "Example:\n  thinbd status\n  thinbd status -o json --api 10.0.0.7:10810")]
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the pool.
    #[command(after_help = "Example:\n  thinbd pool --api 10.0.0.7:10810")]
    Pool {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  thinbd completions bash > /etc/bash_completion.d/thinbd")]
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(after_help = "Example:\n  thinbd man > /usr/local/share/man/man1/thinbd.1")]
    Man,
    /// Check that maps, allocator and layers agree (the daemon must be stopped).
    Fsck {
        /// The daemon's data directory (meta.redb and pool.img).
        #[arg(long, default_value = "./thinbd-data")]
        data_dir: PathBuf,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Every node with its addresses, space, zone and whether it is up.
    List,
    /// Record that node NAME exists, so volumes may be published to it through CSI (the CSI
    /// node plugin does this itself).
    Register {
        /// The node's name (as Kubernetes knows it).
        name: String,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Snapshot a volume (instant, copy-on-write).
    Create {
        /// The volume.
        volume: String,
        /// The snapshot's name, unique within the volume.
        name: String,
    },
    /// List snapshots, of one volume or all.
    List {
        /// Only this volume's snapshots.
        volume: Option<String>,
    },
    /// Delete VOLUME@SNAPSHOT (or a snapshot's UUID), freeing the clusters nobody else
    /// references.
    Delete {
        /// VOLUME@SNAPSHOT or the snapshot's UUID.
        snapshot: String,
    },
    /// Snapshot NAME of every VOLUME at one instant (a group snapshot: a write acknowledged on
    /// one member before another's is never missing from the first while in the second).
    CreateGroup {
        /// The snapshot's name on every volume.
        name: String,
        /// The volumes (at least one).
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Byte ranges changed from snapshot BASE (VOLUME@SNAPSHOT) to TARGET (a later snapshot of
    /// the same volume, or the volume), exact at cluster granularity.
    Diff {
        /// The earlier snapshot, VOLUME@SNAPSHOT.
        base: String,
        /// A later snapshot of the same volume (VOLUME@SNAPSHOT), or the volume.
        target: String,
    },
    /// Byte ranges TARGET (VOLUME@SNAPSHOT or VOLUME) holds data in.
    Allocated {
        /// VOLUME@SNAPSHOT or VOLUME.
        target: String,
    },
}

/// Prints changed or allocated ranges: a table, or `[{"offset":…,"length":…}]`.
async fn print_ranges(
    c: &mut ManagementClient<Channel>,
    out: Output,
    base: String,
    target: String,
) -> anyhow::Result<()> {
    let mut stream = c.changed_ranges(pb::ChangedRangesRequest { base, target }).await.map_err(rpc_error)?.into_inner();
    let mut ranges = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(rpc_error)? {
        ranges.extend(chunk.ranges.into_iter().map(|r| (r.offset, r.length)));
    }
    match out {
        o @ (Output::Json | Output::Yaml) => {
            let v: Vec<_> = ranges.iter().map(|(o, l)| serde_json::json!({ "offset": o, "length": l })).collect();
            o.emit(&serde_json::Value::Array(v));
        }
        Output::Table | Output::Wide => {
            println!("{:>16}  {:>16}", "OFFSET", "LENGTH");
            for (o, l) in &ranges {
                println!("{o:>16}  {l:>16}");
            }
            let total: u64 = ranges.iter().map(|(_, l)| l).sum();
            println!("{} range(s), {}", ranges.len(), format_size(total));
        }
    }
    Ok(())
}

/// QoS limits of a volume (none given: unlimited). Shared by all its connections.
#[derive(clap::Args, Default)]
struct QosArgs {
    /// Read plus write operations per second.
    #[arg(long)]
    max_iops: Option<u64>,
    /// Read operations per second.
    #[arg(long)]
    max_read_iops: Option<u64>,
    /// Write operations per second.
    #[arg(long)]
    max_write_iops: Option<u64>,
    /// Read plus write bytes per second, e.g. 100MiB.
    #[arg(long, value_parser = parse_size)]
    max_bandwidth: Option<u64>,
    /// Read bytes per second, e.g. 100MiB.
    #[arg(long, value_parser = parse_size)]
    max_read_bandwidth: Option<u64>,
    /// Write bytes per second, e.g. 100MiB.
    #[arg(long, value_parser = parse_size)]
    max_write_bandwidth: Option<u64>,
    /// Milliseconds of full speed a volume may save up while idle (default 100).
    #[arg(long)]
    qos_burst_ms: Option<u64>,
}

impl QosArgs {
    fn to_pb(&self) -> pb::Qos {
        let v = |o: Option<u64>| o.unwrap_or(0);
        pb::Qos {
            iops: v(self.max_iops),
            read_iops: v(self.max_read_iops),
            write_iops: v(self.max_write_iops),
            bandwidth: v(self.max_bandwidth),
            read_bandwidth: v(self.max_read_bandwidth),
            write_bandwidth: v(self.max_write_bandwidth),
            burst_ms: v(self.qos_burst_ms),
        }
    }
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a thin volume.
    Create {
        /// The volume's name, unique in the pool (or the cluster).
        name: String,
        /// Size in bytes or with a unit: 20GiB, 20Gi, 512MiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        qos: QosArgs,
        /// In a cluster: place it on a node of this zone.
        #[arg(long, default_value = "")]
        zone: String,
        /// In a cluster: place it on one of these nodes (repeatable; the first with room wins
        /// ties).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// In a cluster: keep a copy on this many distinct nodes (zones where they differ);
        /// writes are acknowledged when every in-sync copy has them. Default: 3, or one per
        /// node up when there are fewer.
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        replicas: u32,
        /// Copies that must stay in sync for writes to be acknowledged (default: replicas - 1,
        /// at least 1).
        #[arg(long, default_value_t = 0)]
        min_insync: u32,
    },
    /// Rebuild the copies of a replicated volume that left the in-sync set (on its target;
    /// writes wait meanwhile) and bring them back in sync.
    Rebuild {
        /// The volume.
        name: String,
    },
    /// Change how many copies a volume has (in a cluster): new ones are made on other nodes and
    /// rebuilt, removed ones leave the in-sync set first.
    SetReplicas {
        /// The volume.
        name: String,
        /// How many copies it keeps from now on.
        replicas: u32,
        /// Copies that must stay in sync for writes to be acknowledged (default: replicas - 1,
        /// at least 1).
        #[arg(long, default_value_t = 0)]
        min_insync: u32,
    },
    /// Compare the in-sync copies of a replicated volume (writes wait meanwhile) and report
    /// where they differ; --repair rewrites those ranges from the first copy.
    Scrub {
        /// The volume.
        name: String,
        /// Rewrite the differing ranges from the first copy.
        #[arg(long)]
        repair: bool,
    },
    /// Make one copy of a replicated volume the whole in-sync set when too few are left to
    /// acknowledge writes. Writes only the other copies had are lost: needs --accept-data-loss.
    ForcePromote {
        /// The volume.
        name: String,
        /// The node whose copy is kept.
        #[arg(long)]
        node: String,
        /// Confirm that writes only the other copies had are lost.
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// Set or clear (no limit given) a volume's QoS limits; connected clients get them at once.
    SetQos {
        /// The volume.
        name: String,
        #[command(flatten)]
        qos: QosArgs,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show {
        /// The volume's name or UUID.
        name: String,
    },
    /// Grow a volume (shrinking is refused).
    Resize {
        /// The volume.
        name: String,
        /// The new size, e.g. 40GiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume and free its clusters.
    Delete {
        /// The volume.
        name: String,
    },
    /// Create a writable volume from VOLUME@SNAPSHOT or from a volume's current state.
    Clone {
        /// VOLUME@SNAPSHOT, or a volume (cloned as it is now).
        source: String,
        /// The new volume's name.
        name: String,
    },
    /// Grant a node access and print the export name it must attach (what CSI
    /// ControllerPublishVolume does).
    Publish {
        /// The volume.
        name: String,
        /// The node that attaches it.
        #[arg(long)]
        node: String,
        /// A read-only grant.
        #[arg(long)]
        read_only: bool,
        /// Refuse writable grants to other nodes while this one lasts.
        #[arg(long)]
        single_writer: bool,
    },
    /// Revoke a node's grant and disconnect its sessions.
    Unpublish {
        /// The volume.
        name: String,
        /// The node whose grant goes.
        #[arg(long)]
        node: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(exit_code::of(&e))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(opts) => {
            thinbd_api::logging::init(opts.log_format);
            serve(*opts).await
        }
        Command::Volume { client, command } => volume_command(client, command).await,
        Command::Snapshot { client, command } => snapshot_command(client, command).await,
        Command::Fsck { data_dir, output } => fsck(&data_dir, output),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "thinbd",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Node { client, command: NodeCommand::Register { name } } => {
            let mut c = connect(&client).await?;
            let n = c.register_node(pb::RegisterNodeRequest { name }).await.map_err(rpc_error)?.into_inner();
            match client.output {
                o @ (Output::Json | Output::Yaml) => o.emit(&serde_json::json!({ "registered": n.name })),
                Output::Table | Output::Wide => println!("node {} registered", n.name),
            }
            Ok(())
        }
        Command::Node { client, command: NodeCommand::List } => {
            let mut c = connect(&client).await?;
            let r = c.list_nodes(pb::ListNodesRequest {}).await.map_err(rpc_error)?.into_inner();
            match client.output {
                o @ (Output::Json | Output::Yaml) => {
                    let nodes: Vec<serde_json::Value> = r
                        .nodes
                        .iter()
                        .map(|n| {
                            serde_json::json!({
                                "name": n.name, "up": n.up, "nbd_address": n.nbd_address,
                                "api_address": n.api_address, "capacity_bytes": n.capacity_bytes,
                                "available_bytes": n.available_bytes, "zone": n.zone, "labels": n.labels,
                                "storage": n.storage,
                            })
                        })
                        .collect();
                    o.emit(&serde_json::json!({ "clustered": r.clustered, "nodes": nodes }));
                }
                Output::Table | Output::Wide => {
                    println!("{:<20} {:<5} {:<22} {:>10} {:>10} ZONE", "NODE", "STATE", "NBD", "CAPACITY", "FREE");
                    for n in &r.nodes {
                        println!(
                            "{:<20} {:<5} {:<22} {:>10} {:>10} {}",
                            n.name,
                            if n.up { "up" } else { "down" },
                            n.nbd_address,
                            format_size(n.capacity_bytes),
                            format_size(n.available_bytes),
                            n.zone
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Pool { client } => {
            let mut c = connect(&client).await?;
            let p = c.get_pool(pb::GetPoolRequest {}).await.map_err(rpc_error)?.into_inner();
            match client.output {
                o @ (Output::Json | Output::Yaml) => o.emit(&serde_json::json!({
                    "capacity_bytes": p.capacity_bytes, "used_bytes": p.used_bytes,
                    "cluster_size": p.cluster_size, "volume_count": p.volume_count,
                    "snapshot_count": p.snapshot_count, "data_dir": p.data_dir,
                })),
                Output::Table | Output::Wide => {
                    println!("data dir:     {}", p.data_dir);
                    println!("capacity:     {}", format_size(p.capacity_bytes));
                    println!("used:         {}", format_size(p.used_bytes));
                    println!("cluster size: {}", format_size(p.cluster_size as u64));
                    println!("volumes:      {}", p.volume_count);
                    println!("snapshots:    {}", p.snapshot_count);
                }
            }
            Ok(())
        }
        Command::Status { client } => status(&client).await,
    }
}

/// `thinbd status`: versions, this node, how its pool is driven, the pool, the cluster.
async fn status(client: &ClientArgs) -> anyhow::Result<()> {
    let mut c = connect(client).await?;
    let p = c.get_pool(pb::GetPoolRequest {}).await.map_err(rpc_error)?.into_inner();
    let n = c.list_nodes(pb::ListNodesRequest {}).await.map_err(rpc_error)?.into_inner();
    let up = n.nodes.iter().filter(|n| n.up).count();
    let fell_back = p.io_engine != p.io_engine_requested;
    match client.output {
        o @ (Output::Json | Output::Yaml) => o.emit(&serde_json::json!({
            "cli_version": env!("CARGO_PKG_VERSION"), "daemon_version": p.version, "node": p.node_name,
            "nbd_address": p.nbd_address, "io_engine": p.io_engine, "io_engine_requested": p.io_engine_requested,
            "direct_io": p.direct_io, "data_dir": p.data_dir, "capacity_bytes": p.capacity_bytes,
            "used_bytes": p.used_bytes, "volume_count": p.volume_count, "snapshot_count": p.snapshot_count,
            "clustered": n.clustered, "nodes": n.nodes.len(), "nodes_up": up,
        })),
        Output::Table | Output::Wide => {
            println!("version:    {} (daemon {})", env!("CARGO_PKG_VERSION"), p.version);
            println!("node:       {} (NBD at {})", p.node_name, p.nbd_address);
            let direct = if p.direct_io { "O_DIRECT" } else { "page cache" };
            if fell_back {
                println!(
                    "io engine:  {}, {direct} -- WARNING: {} was asked for and refused (kernel or seccomp)",
                    p.io_engine, p.io_engine_requested
                );
            } else {
                println!("io engine:  {}, {direct}", p.io_engine);
            }
            println!(
                "pool:       {} used of {} in {}; {} volume(s), {} snapshot(s)",
                format_size(p.used_bytes),
                format_size(p.capacity_bytes),
                p.data_dir,
                p.volume_count,
                p.snapshot_count
            );
            if n.clustered {
                println!("cluster:    {} node(s), {up} up", n.nodes.len());
            } else {
                println!("cluster:    none (single node)");
            }
        }
    }
    Ok(())
}

async fn connect(client: &ClientArgs) -> anyhow::Result<ManagementClient<Channel>> {
    let ep = thinbd_api::tls::api_endpoint(&client.api, client.tls().as_ref())?;
    let url = ep.uri().to_string();
    let channel = ep.connect().await.map_err(|e| {
        anyhow::Error::new(e).context(exit_code::CommandError::new(
            exit_code::Failure::Unreachable,
            format!("cannot reach thinbd at {url} (is `thinbd serve` running? --api sets the address)"),
        ))
    })?;
    Ok(ManagementClient::new(channel))
}

fn rpc_error(s: tonic::Status) -> anyhow::Error {
    exit_code::CommandError::from_status(s).into()
}

/// A time as RFC 3339 in UTC (`2026-11-28T16:45:00Z`), as kubectl prints them; `-` when unknown.
fn rfc3339(unix_seconds: u64) -> String {
    let formatted = i64::try_from(unix_seconds)
        .ok()
        .filter(|s| *s > 0)
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
    formatted.unwrap_or_else(|| "-".to_string())
}

fn volume_json(v: &pb::Volume) -> serde_json::Value {
    let q = v.qos.unwrap_or_default();
    serde_json::json!({
        "name": v.name, "id": v.id, "uuid": v.uuid, "node": v.node, "target_node": v.target_node,
        "target_epoch": v.target_epoch, "available": !v.unavailable, "size_bytes": v.size_bytes,
        "allocated_bytes": v.allocated_bytes,
        "exclusive_bytes": v.exclusive_bytes, "shared_bytes": v.shared_bytes,
        "sessions": v.sessions, "created_unix_seconds": v.created_unix_seconds,
        "created": rfc3339(v.created_unix_seconds),
        "labels": v.labels, "published_nodes": v.published_nodes,
        "replicas": v.replicas, "in_sync": v.in_sync,
        "replica_states": v.replica_states.iter().map(|r| serde_json::json!({
            "node": r.node, "state": r.state, "rebuilt_bytes": r.rebuilt_bytes,
            "rebuild_total_bytes": r.rebuild_total_bytes,
        })).collect::<Vec<_>>(),
        "qos": {
            "iops": q.iops, "read_iops": q.read_iops, "write_iops": q.write_iops,
            "bandwidth": q.bandwidth, "read_bandwidth": q.read_bandwidth, "write_bandwidth": q.write_bandwidth,
            "burst_ms": q.burst_ms,
        },
        "throttled_seconds": v.throttled_seconds,
    })
}

/// The limits that are set, as `iops 2000, write bandwidth 100 MiB/s`; `None` when unlimited.
fn qos_text(q: &pb::Qos) -> Option<String> {
    let mut parts = Vec::new();
    for (what, n) in [("iops", q.iops), ("read iops", q.read_iops), ("write iops", q.write_iops)] {
        if n > 0 {
            parts.push(format!("{what} {n}"));
        }
    }
    for (what, n) in
        [("bandwidth", q.bandwidth), ("read bandwidth", q.read_bandwidth), ("write bandwidth", q.write_bandwidth)]
    {
        if n > 0 {
            parts.push(format!("{what} {}/s", format_size(n)));
        }
    }
    if parts.is_empty() {
        return None;
    }
    if q.burst_ms > 0 {
        parts.push(format!("burst {} ms", q.burst_ms));
    }
    Some(parts.join(", "))
}

/// `nbd` is the server's advertised NBD address, for the single-volume view.
/// `NAMESPACE/NAME` of the PersistentVolumeClaim a CSI-made volume belongs to (labels from
/// csi-provisioner's `--extra-create-metadata`).
fn claim_of(v: &pb::Volume) -> Option<String> {
    let name = v.labels.get("kubernetes.pvc-name")?;
    Some(match v.labels.get("kubernetes.pvc-namespace") {
        Some(ns) => format!("{ns}/{name}"),
        None => name.clone(),
    })
}

fn print_volumes(out: Output, vols: &[pb::Volume], single: bool, nbd: &str) {
    match out {
        o @ (Output::Json | Output::Yaml) if single && vols.len() == 1 => o.emit(&volume_json(&vols[0])),
        o @ (Output::Json | Output::Yaml) => o.emit(&serde_json::Value::Array(vols.iter().map(volume_json).collect())),
        Output::Table | Output::Wide if single => {
            for v in vols {
                println!("name:      {}", v.name);
                println!("uuid:      {}", v.uuid);
                println!("data on:   {}{}", v.node, if v.unavailable { " (down: unavailable)" } else { "" });
                for r in &v.replica_states {
                    let progress = match r.rebuild_total_bytes {
                        0 => String::new(),
                        total => format!(
                            " {}% ({} of {})",
                            r.rebuilt_bytes * 100 / total,
                            format_size(r.rebuilt_bytes),
                            format_size(total)
                        ),
                    };
                    println!("replica:   {} {}{progress}", r.node, r.state);
                }
                if !v.target_node.is_empty() {
                    println!("target:    {} (epoch {})", v.target_node, v.target_epoch);
                }
                println!("size:      {} ({} bytes)", format_size(v.size_bytes), v.size_bytes);
                println!("allocated: {} ({} bytes)", format_size(v.allocated_bytes), v.allocated_bytes);
                println!("exclusive: {} ({} bytes)", format_size(v.exclusive_bytes), v.exclusive_bytes);
                println!("shared:    {} ({} bytes)", format_size(v.shared_bytes), v.shared_bytes);
                println!("sessions:  {}", v.sessions);
                println!("created:   {}", rfc3339(v.created_unix_seconds));
                if let Some(claim) = claim_of(v) {
                    println!("claim:     {claim} (PersistentVolumeClaim)");
                }
                if !v.published_nodes.is_empty() {
                    println!("published: {}", v.published_nodes.join(", "));
                }
                if let Some(q) = v.qos.as_ref().and_then(qos_text) {
                    println!("qos:       {q} (throttled {:.1} s so far)", v.throttled_seconds);
                }
                println!("export:    nbd://{nbd}/{}", v.name);
            }
        }
        o @ (Output::Table | Output::Wide) => {
            let wide = matches!(o, Output::Wide);
            let w = vols.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
            // The claim column only when some volume came from a PersistentVolumeClaim.
            let claims = vols.iter().any(|v| claim_of(v).is_some());
            let claim_header = if claims { "  CLAIM" } else { "" };
            let wide_header = if wide {
                format!("  {:<36}  {:<12}  {:>8}  {:<16}  CREATED", "UUID", "DATA ON", "IN SYNC", "TARGET")
            } else {
                String::new()
            };
            println!(
                "{:<w$}  {:>10}  {:>10}  {:>8}{claim_header}{wide_header}",
                "NAME", "SIZE", "ALLOCATED", "SESSIONS"
            );
            for v in vols {
                let claim =
                    if claims { format!("  {}", claim_of(v).unwrap_or_else(|| "-".into())) } else { String::new() };
                let more = if wide {
                    let in_sync = match v.replicas.len() {
                        0 => "-".to_string(),
                        n => format!("{}/{n}", v.in_sync.len()),
                    };
                    let target = match v.target_node.as_str() {
                        "" => "-".to_string(),
                        t => format!("{t}@{}", v.target_epoch),
                    };
                    let node = if v.unavailable { format!("{} (down)", v.node) } else { v.node.clone() };
                    format!(
                        "  {:<36}  {node:<12}  {in_sync:>8}  {target:<16}  {}",
                        v.uuid,
                        rfc3339(v.created_unix_seconds)
                    )
                } else {
                    String::new()
                };
                println!(
                    "{:<w$}  {:>10}  {:>10}  {:>8}{claim}{more}",
                    v.name,
                    format_size(v.size_bytes),
                    format_size(v.allocated_bytes),
                    v.sessions
                );
            }
        }
    }
}

async fn volume_command(client: ClientArgs, command: VolumeCommand) -> anyhow::Result<()> {
    let mut c = connect(&client).await?;
    let nbd = match &command {
        VolumeCommand::List
        | VolumeCommand::Delete { .. }
        | VolumeCommand::Publish { .. }
        | VolumeCommand::Unpublish { .. } => String::new(),
        _ => c.get_pool(pb::GetPoolRequest {}).await.map_err(rpc_error)?.into_inner().nbd_address,
    };
    match command {
        VolumeCommand::Create { name, size, qos, zone, nodes, replicas, min_insync } => {
            let qos = Some(qos.to_pb());
            let req = pb::CreateVolumeRequest {
                name,
                size_bytes: size,
                qos,
                zone,
                nodes,
                replicas,
                min_insync,
                ..Default::default()
            };
            let v = c.create_volume(req).await.map_err(rpc_error)?;
            print_volumes(client.output, &[v.into_inner()], true, &nbd);
        }
        VolumeCommand::Rebuild { name } => {
            let v = c
                .rebuild_volume(pb::RebuildVolumeRequest { volume: name, at_target: false, follow_only: false })
                .await
                .map_err(rpc_error)?;
            print_volumes(client.output, &[v.into_inner()], true, &nbd);
        }
        VolumeCommand::SetReplicas { name, replicas, min_insync } => {
            let req = pb::SetReplicasRequest { volume: name, replicas, min_insync };
            let v = c.set_replicas(req).await.map_err(rpc_error)?;
            print_volumes(client.output, &[v.into_inner()], true, &nbd);
        }
        VolumeCommand::Scrub { name, repair } => {
            let r = c.scrub_volume(pb::ScrubVolumeRequest { volume: name, repair, at_target: false }).await;
            let r = r.map_err(rpc_error)?.into_inner();
            match client.output {
                o @ (Output::Json | Output::Yaml) => o.emit(&
                    serde_json::json!({
                        "copies": r.copies, "bytes_compared": r.bytes_compared, "repaired": r.repaired,
                        "differing": r.differing.iter().map(|d| serde_json::json!({"offset": d.offset, "length": d.length})).collect::<Vec<_>>(),
                        "snapshots": r.snapshots,
                        "snapshot_differing": r.snapshot_differing.iter().map(|d| {
                            let range = d.range.unwrap_or_default();
                            serde_json::json!({"snapshot": d.snapshot, "offset": range.offset, "length": range.length})
                        }).collect::<Vec<_>>(),
                    })
                ),
                Output::Table | Output::Wide => {
                    println!("copies:    {}", r.copies.join(", "));
                    println!("compared:  {} bytes", r.bytes_compared);
                    println!("differing: {} ranges{}", r.differing.len(), if r.repaired { " (repaired)" } else { "" });
                    for d in &r.differing {
                        println!("  {} +{}", d.offset, d.length);
                    }
                    println!("snapshots: {} compared, {} ranges differ", r.snapshots.len(), r.snapshot_differing.len());
                    for d in &r.snapshot_differing {
                        let range = d.range.unwrap_or_default();
                        println!("  {} {} +{}", d.snapshot, range.offset, range.length);
                    }
                }
            }
        }
        VolumeCommand::ForcePromote { name, node, accept_data_loss } => {
            let req = pb::ForcePromoteRequest { volume: name, node, accept_data_loss };
            let v = c.force_promote(req).await.map_err(rpc_error)?;
            print_volumes(client.output, &[v.into_inner()], true, &nbd);
        }
        VolumeCommand::SetQos { name, qos } => {
            let req = pb::SetVolumeQosRequest { name, qos: Some(qos.to_pb()) };
            let v = c.set_volume_qos(req).await.map_err(rpc_error)?;
            print_volumes(client.output, &[v.into_inner()], true, &nbd);
        }
        VolumeCommand::List => {
            let r = c.list_volumes(pb::ListVolumesRequest::default()).await.map_err(rpc_error)?.into_inner();
            print_volumes(client.output, &r.volumes, false, &nbd);
        }
        VolumeCommand::Show { name } => {
            let v = c.get_volume(pb::GetVolumeRequest { name }).await.map_err(rpc_error)?;
            print_volumes(client.output, &[v.into_inner()], true, &nbd);
        }
        VolumeCommand::Resize { name, size } => {
            let v = c.resize_volume(pb::ResizeVolumeRequest { name, size_bytes: size }).await.map_err(rpc_error)?;
            print_volumes(client.output, &[v.into_inner()], true, &nbd);
        }
        VolumeCommand::Clone { source, name } => {
            let v = c
                .clone_volume(pb::CloneVolumeRequest { source, name, ..Default::default() })
                .await
                .map_err(rpc_error)?;
            print_volumes(client.output, &[v.into_inner()], true, &nbd);
        }
        VolumeCommand::Delete { name } => {
            c.delete_volume(pb::DeleteVolumeRequest { name: name.clone(), here: false }).await.map_err(rpc_error)?;
            match client.output {
                o @ (Output::Json | Output::Yaml) => o.emit(&serde_json::json!({ "deleted": name })),
                Output::Table | Output::Wide => println!("deleted volume {name}"),
            }
        }
        VolumeCommand::Publish { name, node, read_only, single_writer } => {
            let g = c
                .publish_volume(pb::PublishVolumeRequest {
                    volume: name,
                    node,
                    read_only,
                    single_writer,
                    ..Default::default()
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            match client.output {
                o @ (Output::Json | Output::Yaml) => o
                    .emit(&serde_json::json!({ "volume": g.volume, "node": g.node, "export_name": g.export_name,
                        "nbd_address": g.nbd_address, "read_only": g.read_only, "single_writer": g.single_writer })),
                Output::Table | Output::Wide => println!("{}", g.export_name),
            }
        }
        VolumeCommand::Unpublish { name, node } => {
            c.unpublish_volume(pb::UnpublishVolumeRequest { volume: name.clone(), node: node.clone(), here: false })
                .await
                .map_err(rpc_error)?;
            match client.output {
                o @ (Output::Json | Output::Yaml) => o.emit(&serde_json::json!({ "unpublished": name, "node": node })),
                Output::Table | Output::Wide => println!("unpublished volume {name} from node {node}"),
            }
        }
    }
    Ok(())
}

fn snapshot_json(s: &pb::Snapshot) -> serde_json::Value {
    serde_json::json!({
        "volume": s.volume, "name": s.name, "snapshot": format!("{}@{}", s.volume, s.name),
        "size_bytes": s.size_bytes, "allocated_bytes": s.allocated_bytes, "exclusive_bytes": s.exclusive_bytes,
        "shared_bytes": s.shared_bytes, "sessions": s.sessions, "created_unix_seconds": s.created_unix_seconds,
        "created": rfc3339(s.created_unix_seconds),
        "group": s.group, "uuid": s.uuid, "node": s.node,
    })
}

async fn snapshot_command(client: ClientArgs, command: SnapshotCommand) -> anyhow::Result<()> {
    if let SnapshotCommand::Delete { snapshot } = &command
        && !snapshot.contains('@')
        && !thinbd_api::is_uuid(snapshot)
    {
        anyhow::bail!("name the snapshot as VOLUME@SNAPSHOT or by its UUID");
    }
    let mut c = connect(&client).await?;
    let snaps = match command {
        SnapshotCommand::Diff { base, target } => return print_ranges(&mut c, client.output, base, target).await,
        SnapshotCommand::Allocated { target } => {
            return print_ranges(&mut c, client.output, String::new(), target).await;
        }
        SnapshotCommand::CreateGroup { name, volumes } => {
            let g =
                c.create_snapshot_group(pb::CreateSnapshotGroupRequest { name, volumes }).await.map_err(rpc_error)?;
            g.into_inner().snapshots
        }
        SnapshotCommand::Create { volume, name } => {
            let s = c
                .create_snapshot(pb::CreateSnapshotRequest { volume, name, ..Default::default() })
                .await
                .map_err(rpc_error)?;
            vec![s.into_inner()]
        }
        SnapshotCommand::List { volume } => {
            let r = c
                .list_snapshots(pb::ListSnapshotsRequest { volume: volume.unwrap_or_default(), ..Default::default() })
                .await
                .map_err(rpc_error)?;
            r.into_inner().snapshots
        }
        SnapshotCommand::Delete { snapshot } => {
            c.delete_snapshot(pb::DeleteSnapshotRequest { key: snapshot.clone(), here: false })
                .await
                .map_err(rpc_error)?;
            match client.output {
                o @ (Output::Json | Output::Yaml) => o.emit(&serde_json::json!({ "deleted": snapshot })),
                Output::Table | Output::Wide => println!("deleted snapshot {snapshot}"),
            }
            return Ok(());
        }
    };
    match client.output {
        o @ (Output::Json | Output::Yaml) => {
            o.emit(&serde_json::Value::Array(snaps.iter().map(snapshot_json).collect()))
        }
        o @ (Output::Table | Output::Wide) => {
            let wide = matches!(o, Output::Wide);
            let name = |s: &pb::Snapshot| format!("{}@{}", s.volume, s.name);
            let w = snaps.iter().map(|s| name(s).len()).max().unwrap_or(8).max(8);
            let wide_header = if wide {
                format!("  {:<36}  {:<12}  {:<20}  GROUP", "UUID", "NODE", "CREATED")
            } else {
                String::new()
            };
            println!("{:<w$}  {:>10}  {:>10}  {:>10}{wide_header}", "SNAPSHOT", "SIZE", "ALLOCATED", "EXCLUSIVE");
            for s in &snaps {
                let more = if wide {
                    format!(
                        "  {:<36}  {:<12}  {:<20}  {}",
                        s.uuid,
                        if s.node.is_empty() { "-" } else { &s.node },
                        rfc3339(s.created_unix_seconds),
                        if s.group.is_empty() { "-" } else { &s.group }
                    )
                } else {
                    String::new()
                };
                println!(
                    "{:<w$}  {:>10}  {:>10}  {:>10}{more}",
                    name(s),
                    format_size(s.size_bytes),
                    format_size(s.allocated_bytes),
                    format_size(s.exclusive_bytes)
                );
            }
        }
    }
    Ok(())
}

fn fsck(data_dir: &std::path::Path, output: Output) -> anyhow::Result<()> {
    if !data_dir.join("meta.redb").exists() {
        anyhow::bail!("{} holds no thinbd pool (no meta.redb); --data-dir names it", data_dir.display());
    }
    let _lock = thinbd::daemon::lock_data_dir(data_dir)?;
    let (_store, loaded) = thinbd::meta::store::Store::open_existing(&data_dir.join("meta.redb"))
        .with_context(|| format!("reading metadata in {}", data_dir.display()))?;
    let mut report = thinbd::meta::fsck::check(&loaded);
    if let Err(e) = thinbd::space::pool::Geometry::of(&loaded).verify_file(&data_dir.join("pool.img")) {
        report.problems.push(e.to_string());
    }
    match output {
        o @ (Output::Json | Output::Yaml) => o.emit(&serde_json::json!({
            "ok": report.ok(), "problems": report.problems, "volumes": report.volumes,
            "snapshots": report.snapshots, "layers": report.layers, "mapped_clusters": report.mapped_clusters,
            "free_clusters": report.free_clusters, "high_water": report.high_water,
        })),
        Output::Table | Output::Wide => print!("{report}"),
    }
    if !report.ok() {
        anyhow::bail!("fsck found {} problem(s) in {}", report.problems.len(), data_dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command and argument says what it is for: `--help`, the man page and the shell
    /// completions show it.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if !matches!(id, "help" | "version") && a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let cli = super::Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cli, "thinbd", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
