//! Why a connection or a request was refused or failed: one flag per cause, for logs and
//! the `response_flags` label (Envoy's names where Envoy has one). The node agent and the
//! waypoint share the one enum; each uses the flags of its layer.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// Denied by AuthorizationPolicy (a waypoint answers 403).
    Deny,
    /// Plaintext to a workload whose PeerAuthentication is STRICT (node agent).
    PeerAuthn,
    /// TLS handshake failed (no/invalid client certificate, wrong identity, not TLS 1.3...).
    Tls,
    /// Malformed request: a tunnel that is not `CONNECT ip:port`, or an HTTP request that
    /// cannot be forwarded as it is (400).
    BadRequest,
    /// CONNECT to an address this workload does not serve (node agent).
    NotServed,
    /// A connection straight to one of the agent's own ports (would loop).
    Loop,
    /// The upstream could not be reached (every endpoint tried failed to connect: 503).
    UpstreamFailure,
    /// No ready endpoint (503).
    NoHealthyUpstream,
    /// The HBONE peer refused the tunnel (401).
    UpstreamDenied,
    /// Closed because a policy change revoked it (node agent).
    Revoked,
    /// The original destination could not be recovered (node agent).
    NoOriginalDst,
    /// The upstream reset or closed before answering (503).
    UpstreamReset,
    /// The downstream went away before the response finished.
    DownstreamClosed,
    /// HTTPRoutes apply to the destination but none of their rules matches (404).
    NoRoute,
    /// The chosen rule has no usable backend: none, all of weight 0, or one the model does
    /// not have or may not be used (cross-namespace without a ReferenceGrant) (500).
    NoCluster,
    /// `timeouts.request` or `timeouts.backendRequest` expired before the response (504).
    UpstreamTimeout,
    /// RequestAuthentication refused the request's JWT (401).
    JwtDenied,
    /// A DestinationRule connection-pool limit was reached: `http2MaxRequests` in flight,
    /// or `http1MaxPendingRequests` already waiting for a connection (503).
    UpstreamOverflow,
    /// Retries ran out on a retriable upstream response (which is passed on).
    RetryLimitExceeded,
    /// A VirtualService fault delayed the request.
    DelayInjected,
    /// A VirtualService fault aborted the request.
    FaultInjected,
    /// Closed at once because a limit of this process was reached (open connections of the
    /// process or the pod, TLS handshakes in progress): Envoy's overload-manager flag.
    Overload,
    /// A destination outside the mesh's registry refused by `REGISTRY_ONLY` (node agent):
    /// Istio's BlackHoleCluster.
    BlackHole,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::Deny => "DENY",
            ResponseFlag::PeerAuthn => "PEERAUTHN",
            ResponseFlag::Tls => "TLS",
            ResponseFlag::BadRequest => "BADREQ",
            // Envoy's "no route": nothing here for this destination.
            ResponseFlag::NotServed | ResponseFlag::NoRoute => "NR",
            ResponseFlag::Loop => "LOOP",
            ResponseFlag::UpstreamFailure => "UF",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamDenied => "UAEX",
            ResponseFlag::Revoked => "REVOKED",
            ResponseFlag::NoOriginalDst => "NOORIGDST",
            ResponseFlag::UpstreamReset => "UC",
            ResponseFlag::DownstreamClosed => "DC",
            ResponseFlag::NoCluster => "NC",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::JwtDenied => "JWT",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::RetryLimitExceeded => "URX",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::Overload => "OM",
            ResponseFlag::BlackHole => "BLACKHOLE",
        }
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ResponseFlag::{self, *};

    #[test]
    fn each_flag_keeps_the_name_logs_and_metrics_use() {
        let check = |f: ResponseFlag, name: &str| assert_eq!(f.to_string(), name);
        // The node agent's.
        check(Deny, "DENY");
        check(PeerAuthn, "PEERAUTHN");
        check(Tls, "TLS");
        check(BadRequest, "BADREQ");
        check(NotServed, "NR");
        check(Loop, "LOOP");
        check(UpstreamFailure, "UF");
        check(NoHealthyUpstream, "UH");
        check(UpstreamDenied, "UAEX");
        check(Revoked, "REVOKED");
        check(NoOriginalDst, "NOORIGDST");
        check(BlackHole, "BLACKHOLE");
        // The waypoint's.
        check(UpstreamReset, "UC");
        check(DownstreamClosed, "DC");
        check(NoRoute, "NR");
        check(NoCluster, "NC");
        check(UpstreamTimeout, "UT");
        check(JwtDenied, "JWT");
        check(UpstreamOverflow, "UO");
        check(RetryLimitExceeded, "URX");
        check(DelayInjected, "DI");
        check(FaultInjected, "FI");
        // Both.
        check(Overload, "OM");
    }
}
