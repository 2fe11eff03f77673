//! The storage servers the controller talks to. `--thinbd-api` is either one address (a single
//! storage node) or a template with `{node}` (a storage server on every node, reached by node
//! name). Channels are made lazily and kept.

use std::collections::HashMap;
use std::sync::Mutex;

use thinbd_api::csi::TopologyRequirement;
use thinbd_api::pb;
use thinbd_api::pb::management_client::ManagementClient;
use tonic::Status;
use tonic::transport::Channel;

use crate::TOPOLOGY_KEY;

pub type Api = ManagementClient<Channel>;

pub struct Backends {
    api: String,
    tls: Option<thinbd_api::tls::ApiClientTls>,
    clients: Mutex<HashMap<String, Api>>,
    /// The single server's node name, once asked.
    single_node: tokio::sync::OnceCell<String>,
}

/// Where CreateVolume asks for a new volume: the node whose API is asked, and in a cluster the
/// zone and nodes the cluster's placement must honour.
pub struct Placement {
    pub node: String,
    pub zone: String,
    pub nodes: Vec<String>,
    /// The cluster's nodes, when there is a cluster (as asked while placing).
    pub cluster: Option<Vec<pb::Node>>,
}

impl Backends {
    pub fn new(api: &str, tls: Option<thinbd_api::tls::ApiClientTls>) -> Backends {
        Backends { api: api.to_string(), tls, clients: Mutex::default(), single_node: Default::default() }
    }

    pub fn is_template(&self) -> bool {
        self.api.contains("{node}")
    }

    fn address(&self, node: &str) -> String {
        self.api.replace("{node}", node)
    }

    fn channel(&self, address: &str) -> Result<Api, Status> {
        let mut clients = self.clients.lock().map_err(|_| Status::internal("backend cache poisoned"))?;
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let endpoint = thinbd_api::tls::api_endpoint(address, self.tls.as_ref())
            .map_err(|e| Status::invalid_argument(format!("thinbd API {address:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5));
        let c = ManagementClient::new(endpoint.connect_lazy());
        clients.insert(address.to_string(), c.clone());
        Ok(c)
    }

    /// The management API of storage node `node`.
    pub async fn api(&self, node: &str) -> Result<Api, Status> {
        if !self.is_template() {
            let single = self.single_node().await?;
            if node != single {
                return Err(Status::not_found(format!(
                    "storage node {node:?} is not served here (this is {single:?})"
                )));
            }
        }
        self.channel(&self.address(node))
    }

    /// The storage node an id names, or for ids that name none (UUIDs) the single server's;
    /// with its API.
    pub async fn locate(&self, node: Option<&str>) -> Result<(String, Api), Status> {
        let node = match node {
            Some(n) => n.to_string(),
            None if !self.is_template() => self.single_node().await?,
            None => {
                return Err(Status::not_found(
                    "a UUID id cannot be located through a {node} address template (ids are NODE/NAME there)",
                ));
            }
        };
        let api = self.api(&node).await?;
        Ok((node, api))
    }

    /// The node to name in ids made for a volume on `node`: none when one API answers for all
    /// (ids are UUIDs), the node when the controller routes by node name.
    pub fn route<'a>(&self, node: &'a str) -> Option<&'a str> {
        self.is_template().then_some(node)
    }

    /// NOT_FOUND unless `node` is known to the storage side: registered with (or a member of the
    /// cluster behind) the single server, or, through a template, running a server of its own.
    pub async fn check_node(&self, node: &str) -> Result<(), Status> {
        let mut api = match self.is_template() {
            true => self.api(node).await?,
            false => self.channel(&self.address(""))?,
        };
        let nodes = api.list_nodes(pb::ListNodesRequest {}).await.map_err(unavailable)?.into_inner().nodes;
        if nodes.iter().any(|n| n.name == node) {
            return Ok(());
        }
        Err(Status::not_found(format!("node {node:?} does not exist (its CSI node plugin has not registered it)")))
    }

    /// The node name of the single server (`--thinbd-api` without `{node}`).
    pub async fn single_node(&self) -> Result<String, Status> {
        let name = self
            .single_node
            .get_or_try_init(|| async {
                let mut c = self.channel(&self.address(""))?;
                let pool = c.get_pool(pb::GetPoolRequest {}).await.map_err(unavailable)?.into_inner();
                Ok::<_, Status>(pool.node_name)
            })
            .await?;
        Ok(name.clone())
    }

    /// The cluster's nodes when the single server is part of one (`serve --etcd`).
    pub async fn cluster(&self) -> Result<Option<Vec<pb::Node>>, Status> {
        if self.is_template() {
            return Ok(None);
        }
        let mut api = self.channel(&self.address(""))?;
        let listed = api.list_nodes(pb::ListNodesRequest {}).await.map_err(unavailable)?.into_inner();
        Ok(listed.clustered.then_some(listed.nodes))
    }

    /// Where to put a new volume: in a cluster the single server places it (in the first
    /// preferred, else requisite, zone; on the named nodes if any); a single server's node (which
    /// must satisfy the requirement); else the first preferred, then the first requisite node.
    pub async fn place(&self, req: Option<&TopologyRequirement>) -> Result<Placement, Status> {
        let segment = |list: &[thinbd_api::csi::Topology], key: &str| -> Vec<String> {
            list.iter().filter_map(|t| t.segments.get(key).cloned()).collect()
        };
        let nodes = |list: &[thinbd_api::csi::Topology]| segment(list, TOPOLOGY_KEY);
        let preferred = req.map(|r| nodes(&r.preferred)).unwrap_or_default();
        let requisite = req.map(|r| nodes(&r.requisite)).unwrap_or_default();
        let cluster = self.cluster().await?;
        if cluster.is_some() {
            let zones = |list: &[thinbd_api::csi::Topology]| segment(list, crate::ZONE_KEY);
            let zone = req
                .map(|r| zones(&r.preferred).into_iter().chain(zones(&r.requisite)).next().unwrap_or_default())
                .unwrap_or_default();
            let mut on: Vec<String> = preferred.into_iter().chain(requisite).collect();
            on.dedup();
            return Ok(Placement { node: self.single_node().await?, zone, nodes: on, cluster });
        }
        let single = |node| Placement { node, zone: String::new(), nodes: Vec::new(), cluster: None };
        if !self.is_template() {
            let single = self.single_node().await?;
            let constrained = req.is_some_and(|r| !r.requisite.is_empty());
            if constrained && !requisite.contains(&single) {
                return Err(Status::resource_exhausted(format!(
                    "the storage node {single:?} is not among the requisite topologies"
                )));
            }
            return Ok(Placement { node: single, zone: String::new(), nodes: Vec::new(), cluster: None });
        }
        preferred.into_iter().chain(requisite).next().map(single).ok_or_else(|| {
            Status::invalid_argument(format!(
                "accessibility_requirements must name a node ({TOPOLOGY_KEY}); is the StorageClass WaitForFirstConsumer?"
            ))
        })
    }
}

/// Management-API errors keep their code, except transport failures, which become UNAVAILABLE
/// so that the CO retries.
pub fn unavailable(s: Status) -> Status {
    match s.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
            Status::unavailable(format!("thinbd API: {}", s.message()))
        }
        _ => s,
    }
}
