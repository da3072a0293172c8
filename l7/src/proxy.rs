//! What the data path shares: the inputs of every connection, and what is known about one
//! downstream tunnel.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_model::identity::Identity;
use mesh_model::model::{Model, NamespacedName};
use mesh_pki::certs::CertManager;
use mesh_telemetry::Metrics;
use tokio_util::sync::CancellationToken;

use crate::jwks::JwksCache;
use crate::protocol::Declared;
use crate::target::Target;
use crate::telemetry::{AccessLogSwitch, HttpMetrics};
use crate::upstream::{UpstreamProto, Upstreams};

/// Who the proxy running the engine is (a waypoint, a gateway): the binary fills this from
/// its flags.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The Gateway the proxy implements: its policies, routes and DestinationRules apply.
    pub gateway: NamespacedName,
    /// The identity the proxy presents (and opens upstream tunnels with).
    pub identity: Identity,
    /// The trust domain of the endpoints' identities.
    pub trust_domain: String,
    /// Proxies in front of the mesh whose `x-forwarded-for` entries are trusted for
    /// `remote.ip` (Istio's `numTrustedProxies`); 0: the address the mesh carried.
    pub num_trusted_proxies: u32,
}

/// Everything the proxy shares; one per process.
pub struct Inputs {
    pub cfg: EngineConfig,
    pub model: Arc<ArcSwap<Model>>,
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    pub http_metrics: HttpMetrics,
    pub upstreams: Arc<Upstreams>,
    /// Keys of RequestAuthentication `jwksUri`s.
    pub jwks: Arc<JwksCache>,
    /// Cancelled on shutdown: HBONE connections send GOAWAY, HTTP connections finish the
    /// requests in flight and close.
    pub drain: CancellationToken,
    /// The process's receive-buffer budget: each downstream HTTP/2 connection reserves its
    /// connection window here (`crate::http::serve`).
    pub receive_budget: mesh_hbone::ReceiveBudget,
    /// Whether requests get an access-log line (updated with every model).
    pub access_log: Arc<AccessLogSwitch>,
    /// Host names of `DNS` ServiceEntries, resolved by the proxy.
    pub hosts: Arc<crate::resolve::HostCache>,
}

/// One downstream tunnel: who sent it and what it is for.
#[derive(Clone, Debug)]
pub struct ConnCtx {
    /// The HBONE peer (the client's node agent, from the client pod's address): the
    /// client's address as the mesh carried it, for `source.ip` / `ipBlocks` (never taken
    /// from a header).
    pub peer: SocketAddr,
    /// Our own address on that connection.
    pub local: SocketAddr,
    /// The client's identity, from its certificate; `None` for a client outside the mesh
    /// (an ingress gateway's plain or TLS listener).
    pub peer_identity: Option<Identity>,
    /// The CONNECT `:authority`.
    pub authority: SocketAddr,
    pub target: Target,
    pub declared: Declared,
    /// The addresses of the host names the target needs (a `DNS` ServiceEntry's), resolved
    /// when the tunnel opened ([`crate::resolve::HostCache::for_target`]); empty otherwise.
    pub hosts: Arc<[crate::target::HostAddrs]>,
}

impl ConnCtx {
    /// The HTTP version to speak upstream: what the port declares, else what the client
    /// spoke (Envoy's `USE_DOWNSTREAM_PROTOCOL` for undeclared ports).
    pub fn upstream_proto(&self, downstream_h2: bool) -> UpstreamProto {
        upstream_proto(self.declared, downstream_h2)
    }
}

/// The HTTP version to speak to a port that declares `declared`.
pub fn upstream_proto(declared: Declared, downstream_h2: bool) -> UpstreamProto {
    match declared {
        Declared::Http => UpstreamProto::Http1,
        Declared::Http2 | Declared::Grpc => UpstreamProto::Http2,
        Declared::Tcp | Declared::Unknown if downstream_h2 => UpstreamProto::Http2,
        Declared::Tcp | Declared::Unknown => UpstreamProto::Http1,
    }
}
