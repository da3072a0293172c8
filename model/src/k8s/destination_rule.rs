//! `networking.istio.io` `DestinationRule` (`v1`, `v1beta1`, `v1alpha3`): host, subsets,
//! and the parts of `trafficPolicy` the waypoint applies (`loadBalancer`, `connectionPool`,
//! `outlierDetection`, `tls`, `portLevelSettings`). Unknown fields are refused with a named
//! error, and so are Istio fields this data plane does not implement (`exportTo`,
//! `workloadSelector`, `localityLbSetting`, `simple: PASSTHROUGH`, `tls.credentialName`,
//! `tls.caCrl`, ...): ignoring them would behave differently from what the user wrote.
//! `tls` file fields are kept as paths (absolute; read by the waypoint, see
//! `mesh_l7::origin`). `consistentHash.ringHash`,
//! `maglev` and `minimumRingSize` are accepted and change nothing (the waypoint hashes by
//! rendezvous hashing, which has the stability both promise).

use std::time::Duration;

use http::HeaderName;

use super::yaml::{FieldResult, Node};
use super::{dns_label, Meta};
use crate::duration::parse_duration;
use crate::model::{
    ClientTls, ConnectionPool, DestinationRule, HashKey, LoadBalancer, OutlierDetection,
    PortTrafficPolicy, Subset, TlsMode, TrafficPolicy, CLUSTER_DOMAIN,
};

/// Bounds so that a hostile rule stays small (RELIABILITY 34).
const MAX_SUBSETS: usize = 64;
const MAX_PORT_LEVEL: usize = 64;

/// Istio fields refused with "not supported" rather than "unknown field".
const UNSUPPORTED_SPEC: [&str; 2] = ["exportTo", "workloadSelector"];
const UNSUPPORTED_POLICY: [&str; 2] = ["tunnel", "proxyProtocol"];
/// Longest `sni`/`subjectAltNames` entry, and most `subjectAltNames`.
const MAX_TLS_NAME: usize = 253;
const MAX_SANS: usize = 32;
const UNSUPPORTED_LB: [&str; 2] = ["localityLbSetting", "warmupDurationSecs"];

pub(super) fn destination_rule(obj: &Node<'_>, meta: Meta) -> FieldResult<DestinationRule> {
    let spec = obj.required("spec")?;
    unsupported(&spec, &UNSUPPORTED_SPEC)?;
    spec.only(&["host", "trafficPolicy", "subsets"])?;
    let host = host(&spec.required("host")?, &meta.namespace)?;
    let traffic_policy = match spec.get("trafficPolicy")? {
        Some(n) => traffic_policy(&n, true)?,
        None => TrafficPolicy::default(),
    };
    let subset_nodes = spec.opt_items("subsets")?;
    if subset_nodes.len() > MAX_SUBSETS {
        return Err(spec.required("subsets")?.err(format!(
            "at most {MAX_SUBSETS} subsets allowed, found {}",
            subset_nodes.len()
        )));
    }
    let mut subsets: Vec<Subset> = Vec::new();
    for node in subset_nodes {
        let s = subset(&node)?;
        if subsets.iter().any(|other| other.name == s.name) {
            return Err(node
                .required("name")?
                .err(format!("duplicate subset name {:?}", s.name)));
        }
        subsets.push(s);
    }
    Ok(DestinationRule {
        name: meta.name,
        namespace: meta.namespace,
        created: meta.created,
        host,
        traffic_policy,
        subsets,
    })
}

/// Refuses the first of `names` that `node` sets.
fn unsupported(node: &Node<'_>, names: &[&str]) -> FieldResult<()> {
    for name in names {
        if let Some(n) = node.get(name)? {
            return Err(n.err("not supported by this data plane"));
        }
    }
    Ok(())
}

/// A short name (no dot) is qualified with the rule's namespace; a name with dots is kept
/// (lower-cased) as a fully qualified host.
fn host(node: &Node<'_>, ns: &str) -> FieldResult<String> {
    let h = node.str()?.to_ascii_lowercase();
    let bare = h.strip_prefix("*.").unwrap_or(&h);
    let valid = h == "*" || (!bare.is_empty() && bare.split('.').all(dns_label));
    if !valid {
        return Err(node.err(format!("invalid host {h:?}")));
    }
    if h == "*" {
        return Ok("*".to_string());
    }
    if h.contains('.') {
        Ok(h)
    } else {
        Ok(format!("{h}.{ns}.svc.{CLUSTER_DOMAIN}"))
    }
}

fn subset(node: &Node<'_>) -> FieldResult<Subset> {
    node.only(&["name", "labels", "trafficPolicy"])?;
    let name_node = node.required("name")?;
    let name = name_node.str()?;
    if !dns_label(name) {
        return Err(name_node.err(format!("invalid subset name {name:?}")));
    }
    let traffic_policy = node
        .get("trafficPolicy")?
        .map(|n| traffic_policy(&n, true))
        .transpose()?;
    Ok(Subset {
        name: name.to_string(),
        labels: node.opt_string_map("labels")?,
        traffic_policy,
    })
}

fn traffic_policy(node: &Node<'_>, top: bool) -> FieldResult<TrafficPolicy> {
    unsupported(node, &UNSUPPORTED_POLICY)?;
    if top {
        node.only(&[
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "tls",
            "portLevelSettings",
        ])?;
    } else {
        node.only(&[
            "port",
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "tls",
        ])?;
    }
    let mut port_level: Vec<PortTrafficPolicy> = Vec::new();
    if top {
        let items = node.opt_items("portLevelSettings")?;
        if items.len() > MAX_PORT_LEVEL {
            return Err(node.required("portLevelSettings")?.err(format!(
                "at most {MAX_PORT_LEVEL} entries allowed, found {}",
                items.len()
            )));
        }
        for item in items {
            let port_node = item.required("port")?;
            port_node.only(&["number"])?;
            let port = port_node.required("number")?.port()?;
            if port_level.iter().any(|p| p.port == port) {
                return Err(port_node.err(format!("port {port} listed twice")));
            }
            let p = traffic_policy(&item, false)?;
            port_level.push(PortTrafficPolicy {
                port,
                load_balancer: p.load_balancer,
                connection_pool: p.connection_pool,
                outlier_detection: p.outlier_detection,
                tls: p.tls,
            });
        }
    }
    Ok(TrafficPolicy {
        load_balancer: node
            .get("loadBalancer")?
            .map(|n| load_balancer(&n))
            .transpose()?,
        connection_pool: node
            .get("connectionPool")?
            .map(|n| connection_pool(&n))
            .transpose()?,
        outlier_detection: node
            .get("outlierDetection")?
            .map(|n| outlier_detection(&n))
            .transpose()?,
        tls: node.get("tls")?.map(|n| client_tls(&n)).transpose()?,
        port_level,
    })
}

/// `tls` (`ClientTLSSettings`). The file fields are kept as absolute paths; `MUTUAL`
/// needs a client certificate and key; file fields under a mode that reads no file are
/// refused (as Istio refuses them under `ISTIO_MUTUAL`), so a rule never says more than
/// it does.
fn client_tls(node: &Node<'_>) -> FieldResult<ClientTls> {
    node.only(&[
        "mode",
        "sni",
        "subjectAltNames",
        "caCertificates",
        "clientCertificate",
        "privateKey",
        "insecureSkipVerify",
        "credentialName",
        "caCrl",
    ])?;
    if let Some(n) = node.get("credentialName")? {
        return Err(n.err(
            "not supported: this data plane reads no Kubernetes Secret; mount the files and \
             set caCertificates, clientCertificate and privateKey",
        ));
    }
    if let Some(n) = node.get("caCrl")? {
        return Err(n.err("not supported: certificate revocation lists are not checked"));
    }
    let mode = match node.get("mode")? {
        None => TlsMode::Disable,
        Some(n) => match n.str()? {
            "DISABLE" => TlsMode::Disable,
            "SIMPLE" => TlsMode::Simple,
            "MUTUAL" => TlsMode::Mutual,
            "ISTIO_MUTUAL" => TlsMode::IstioMutual,
            other => {
                return Err(n.err(format!(
                    "unknown tls mode {other:?} (expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL)"
                )))
            }
        },
    };
    let sni = match node.get("sni")? {
        None => None,
        Some(n) => {
            let name = n.str()?.to_ascii_lowercase();
            if name.len() > MAX_TLS_NAME || !name.split('.').all(dns_label) {
                return Err(n.err(format!("sni {name:?} is not a DNS name")));
            }
            Some(name)
        }
    };
    let mut subject_alt_names = Vec::new();
    if let Some(list) = node.get("subjectAltNames")? {
        let items = list.items()?;
        if items.len() > MAX_SANS {
            return Err(list.err(format!(
                "at most {MAX_SANS} names allowed, found {}",
                items.len()
            )));
        }
        for item in items {
            subject_alt_names.push(tls_name(&item, item.str()?)?);
        }
    }
    let file = |key: &str| -> FieldResult<Option<String>> {
        let Some(n) = node.get(key)? else {
            return Ok(None);
        };
        let path = n.str()?;
        if !path.starts_with('/') || path.contains('\0') {
            return Err(n.err(format!("{path:?} is not an absolute path")));
        }
        let allowed = match key {
            "caCertificates" => matches!(mode, TlsMode::Simple | TlsMode::Mutual),
            _ => mode == TlsMode::Mutual,
        };
        if !allowed {
            let modes = match key {
                "caCertificates" => "SIMPLE and MUTUAL",
                _ => "MUTUAL",
            };
            return Err(n.err(format!("applies only to mode {modes}")));
        }
        Ok(Some(path.to_string()))
    };
    let tls = ClientTls {
        mode,
        sni,
        subject_alt_names,
        ca_certificates: file("caCertificates")?,
        client_certificate: file("clientCertificate")?,
        private_key: file("privateKey")?,
        insecure_skip_verify: node.opt_bool("insecureSkipVerify")?.unwrap_or(false),
    };
    if mode == TlsMode::Mutual && (tls.client_certificate.is_none() || tls.private_key.is_none()) {
        return Err(node.err("mode MUTUAL needs clientCertificate and privateKey"));
    }
    Ok(tls)
}

/// An `sni` or `subjectAltNames` entry: a DNS name (`*.` wildcard allowed), an IP address
/// or a URI (`spiffe://...`), printable ASCII, not empty.
fn tls_name(node: &Node<'_>, name: &str) -> FieldResult<String> {
    let printable = name.bytes().all(|b| b.is_ascii_graphic());
    if name.is_empty() || name.len() > MAX_TLS_NAME || !printable {
        return Err(node.err(format!("invalid tls name {name:?}")));
    }
    Ok(name.to_string())
}

fn load_balancer(node: &Node<'_>) -> FieldResult<LoadBalancer> {
    unsupported(node, &UNSUPPORTED_LB)?;
    node.only(&["simple", "consistentHash"])?;
    match (node.get("simple")?, node.get("consistentHash")?) {
        (Some(_), Some(c)) => Err(c.err("set either simple or consistentHash, not both")),
        (Some(s), None) => match s.str()? {
            // UNSPECIFIED is what Istio treats as the default (round robin in Envoy).
            "ROUND_ROBIN" | "UNSPECIFIED" => Ok(LoadBalancer::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" => Ok(LoadBalancer::LeastRequest),
            "RANDOM" => Ok(LoadBalancer::Random),
            "PASSTHROUGH" => Err(s.err(
                "PASSTHROUGH is not supported: the waypoint always balances over the \
                 Service's endpoints (use ROUND_ROBIN, LEAST_REQUEST or RANDOM)",
            )),
            other => Err(s.err(format!(
                "unknown load balancer {other:?} (expected ROUND_ROBIN, LEAST_REQUEST or RANDOM)"
            ))),
        },
        (None, Some(c)) => consistent_hash(&c).map(LoadBalancer::ConsistentHash),
        (None, None) => Ok(LoadBalancer::RoundRobin),
    }
}

fn consistent_hash(node: &Node<'_>) -> FieldResult<HashKey> {
    node.only(&[
        "httpHeaderName",
        "httpCookie",
        "useSourceIp",
        "httpQueryParameterName",
        "ringHash",
        "maglev",
        "minimumRingSize",
    ])?;
    let mut keys = Vec::new();
    if let Some(n) = node.get("httpHeaderName")? {
        let name = n.str()?;
        let h = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| n.err(format!("invalid header name {name:?}")))?;
        keys.push((n, HashKey::Header(h)));
    }
    if let Some(n) = node.get("httpCookie")? {
        n.only(&["name", "path", "ttl"])?;
        let name_node = n.required("name")?;
        let name = name_node.str()?;
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !token {
            return Err(name_node.err(format!("invalid cookie name {name:?}")));
        }
        let path = n.opt_str("path")?.map(str::to_string);
        let ttl = n.get("ttl")?.map(|t| duration(&t)).transpose()?;
        keys.push((
            n,
            HashKey::Cookie {
                name: name.to_string(),
                path,
                ttl,
            },
        ));
    }
    if let Some(n) = node.get("useSourceIp")? {
        if n.bool()? {
            keys.push((n, HashKey::SourceIp));
        }
    }
    if let Some(n) = node.get("httpQueryParameterName")? {
        let name = n.str()?;
        if name.is_empty() {
            return Err(n.err("empty query parameter name"));
        }
        keys.push((n, HashKey::QueryParameter(name.to_string())));
    }
    if keys.len() > 1 {
        return Err(keys[1].0.err("consistentHash takes exactly one hash key"));
    }
    keys.pop()
        .map(|(_, k)| k)
        .ok_or_else(|| node.err("consistentHash needs one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName"))
}

fn connection_pool(node: &Node<'_>) -> FieldResult<ConnectionPool> {
    node.only(&["tcp", "http"])?;
    let mut cp = ConnectionPool::default();
    if let Some(tcp) = node.get("tcp")? {
        tcp.only(&["maxConnections", "connectTimeout"])?;
        cp.max_connections = positive(&tcp, "maxConnections")?;
        cp.connect_timeout = tcp
            .get("connectTimeout")?
            .map(|n| duration(&n))
            .transpose()?;
    }
    if let Some(http) = node.get("http")? {
        http.only(&[
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
        ])?;
        cp.http1_max_pending_requests = positive(&http, "http1MaxPendingRequests")?;
        cp.http2_max_requests = positive(&http, "http2MaxRequests")?;
        cp.max_requests_per_connection = count(&http, "maxRequestsPerConnection")?;
        cp.max_retries = count(&http, "maxRetries")?;
        cp.idle_timeout = http.get("idleTimeout")?.map(|n| duration(&n)).transpose()?;
    }
    Ok(cp)
}

fn outlier_detection(node: &Node<'_>) -> FieldResult<OutlierDetection> {
    node.only(&[
        "consecutive5xxErrors",
        "consecutiveGatewayErrors",
        "interval",
        "baseEjectionTime",
        "maxEjectionPercent",
        "minHealthPercent",
    ])?;
    let percent = |key: &str| -> FieldResult<Option<u32>> {
        match node.get(key)? {
            None => Ok(None),
            Some(n) => {
                let v = n.int()?;
                if !(0..=100).contains(&v) {
                    return Err(n.err(format!("{v} is not a percentage (0-100)")));
                }
                Ok(Some(v as u32))
            }
        }
    };
    let od = OutlierDetection {
        consecutive_5xx_errors: count(node, "consecutive5xxErrors")?,
        consecutive_gateway_errors: count(node, "consecutiveGatewayErrors")?,
        interval: node.get("interval")?.map(|n| duration(&n)).transpose()?,
        base_ejection_time: node
            .get("baseEjectionTime")?
            .map(|n| duration(&n))
            .transpose()?,
        max_ejection_percent: percent("maxEjectionPercent")?,
        min_health_percent: percent("minHealthPercent")?,
    };
    for (key, d) in [
        ("interval", od.interval),
        ("baseEjectionTime", od.base_ejection_time),
    ] {
        if d.is_some_and(|d| d < Duration::from_millis(1)) {
            return Err(node.required(key)?.err("must be at least 1ms"));
        }
    }
    Ok(od)
}

/// A non-negative 32-bit integer.
fn count(node: &Node<'_>, key: &str) -> FieldResult<Option<u32>> {
    match node.get(key)? {
        None => Ok(None),
        Some(n) => {
            let v = n.int()?;
            u32::try_from(v)
                .map(Some)
                .map_err(|_| n.err(format!("{v} is out of range 0-4294967295")))
        }
    }
}

/// A limit, at least 1.
fn positive(node: &Node<'_>, key: &str) -> FieldResult<Option<u32>> {
    let v = count(node, key)?;
    if v == Some(0) {
        return Err(node.required(key)?.err("must be at least 1"));
    }
    Ok(v)
}

fn duration(node: &Node<'_>) -> FieldResult<Duration> {
    let s = node.str()?;
    parse_duration(s).map_err(|e| node.err(format!("invalid duration: {e}")))
}
