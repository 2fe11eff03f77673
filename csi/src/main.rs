//! `thinbd-csi`: serves the CSI Identity, Controller and/or Node services on a unix socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use thinbd_api::csi::controller_server::ControllerServer;
use thinbd_api::csi::identity_server::IdentityServer;
use thinbd_api::csi::node_server::NodeServer;
use thinbd_csi::backend::Backends;
use thinbd_csi::controller::ControllerService;
use thinbd_csi::identity::IdentityService;
use thinbd_csi::node::NodeService;
use tracing::info;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Controller,
    Node,
    All,
}

#[derive(Parser)]
#[command(name = "thinbd-csi", version, about = "CSI plugin for thinbd (driver thinbd.csi.io)")]
struct Cli {
    /// Where to serve CSI: unix:///path/to/csi.sock
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Log lines as text (colours only on a terminal) or JSON, one object per line.
    #[arg(long, value_enum, default_value = "text", env = "THINBD_LOG_FORMAT")]
    log_format: thinbd_api::logging::LogFormat,
    /// This node's name (Kubernetes node name); required for the node service.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// Management API of the storage server: HOST:PORT, or a template with {node}, e.g.
    /// {node}:10810, when every node runs its own.
    #[arg(long, default_value = "127.0.0.1:10810")]
    thinbd_api: String,
    /// Where the node service keeps reconnect information for attached volumes (default: a
    /// `volumes` directory next to the socket).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// CA of the storage servers' API certificates: talk mutual TLS to them, presenting
    /// --thinbd-api-cert and --thinbd-api-key.
    #[arg(long, requires_all = ["thinbd_api_cert", "thinbd_api_key"])]
    thinbd_api_ca: Option<PathBuf>,
    #[arg(long)]
    thinbd_api_cert: Option<PathBuf>,
    #[arg(long)]
    thinbd_api_key: Option<PathBuf>,
    /// Name the storage servers' API certificates carry (default: the host of their address).
    #[arg(long, requires = "thinbd_api_ca")]
    thinbd_api_server_name: Option<String>,
    /// CA of the storage servers' NBD certificates: the node attaches over TLS (STARTTLS, then
    /// kernel TLS), presenting --nbd-tls-cert/--nbd-tls-key when the server asks for one.
    #[arg(long)]
    nbd_tls_ca: Option<PathBuf>,
    #[arg(long, requires_all = ["nbd_tls_ca", "nbd_tls_key"])]
    nbd_tls_cert: Option<PathBuf>,
    #[arg(long, requires = "nbd_tls_cert")]
    nbd_tls_key: Option<PathBuf>,
    /// Name the storage servers' NBD certificates carry (default: the host of their address).
    #[arg(long, requires = "nbd_tls_ca")]
    nbd_tls_server_name: Option<String>,
    /// Most volumes the node service attaches (kernel NBD devices).
    #[arg(long, default_value_t = 64)]
    max_volumes_per_node: i64,
    /// Attach through this node's own thinbd (--thinbd-api; in a cluster it becomes the volume's
    /// target and forwards to the node holding the data) instead of the address in the publish
    /// context.
    #[arg(long)]
    attach_via_local_target: bool,
}

fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").context("--endpoint must be unix:///path")?;
    if !path.starts_with('/') {
        bail!("--endpoint must be an absolute unix socket path (unix:///path)");
    }
    Ok(PathBuf::from(path))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    thinbd_api::logging::init(cli.log_format);
    let path = socket_path(&cli.endpoint)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a previous run would make bind fail.
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    let controller = matches!(cli.mode, Mode::Controller | Mode::All);
    let node = matches!(cli.mode, Mode::Node | Mode::All);
    let tls = match (&cli.thinbd_api_ca, &cli.thinbd_api_cert, &cli.thinbd_api_key) {
        (Some(ca), Some(cert), Some(key)) => Some(thinbd_api::tls::ApiClientTls {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            server_name: cli.thinbd_api_server_name.clone(),
        }),
        _ => None,
    };
    let backends = Arc::new(Backends::new(&cli.thinbd_api, tls));
    if let Some(ca) = &cli.nbd_tls_ca {
        let client = cli.nbd_tls_cert.as_deref().zip(cli.nbd_tls_key.as_deref());
        let connector = thinbd_protocol::tls::kernel_client_connector(ca, client).context("NBD TLS")?;
        thinbd_csi::attach::use_tls(thinbd_csi::attach::NbdTls {
            connector,
            server_name: cli.nbd_tls_server_name.clone(),
        });
    }
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService { backends: controller.then(|| backends.clone()), node }));
    let mut router = if controller {
        router
            .add_service(ControllerServer::new(ControllerService { backends: backends.clone() }))
            .add_service(thinbd_api::csi::group_controller_server::GroupControllerServer::new(
                thinbd_csi::group_controller::GroupControllerService { backends: backends.clone() },
            ))
            .add_service(thinbd_api::csi::snapshot_metadata_server::SnapshotMetadataServer::new(
                thinbd_csi::snapshot_metadata::SnapshotMetadataService { backends: backends.clone() },
            ))
    } else {
        router.add_optional_service(None::<ControllerServer<ControllerService>>)
    };
    if node {
        thinbd_csi::kernel_modules::load();
        let node_id = cli.node_id.clone().context("--node-id (or NODE_ID) is required for the node service")?;
        let state_dir = cli.state_dir.clone().unwrap_or_else(|| path.parent().unwrap_or(&path).join("volumes"));
        let mut service = NodeService::new(node_id, cli.max_volumes_per_node, state_dir, backends.clone());
        service.attach_via_local_target = cli.attach_via_local_target;
        router = router.add_service(NodeServer::new(service));
    }
    info!(endpoint = %cli.endpoint, controller, node, api = %cli.thinbd_api, "thinbd-csi serving");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    router
        .serve_with_incoming_shutdown(incoming, async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            info!("shutting down");
        })
        .await?;
    Ok(())
}
