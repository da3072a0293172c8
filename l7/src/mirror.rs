//! Request mirroring (HTTPRoute `RequestMirror`, VirtualService `mirror`/`mirrors`): fire and
//! forget. A copy of the request as it goes upstream (after header modifiers and rewrites)
//! is sent to one endpoint of the mirror Service with `-shadow` appended to its host (as
//! Envoy does); its response is read and discarded. A mirror never delays or fails the real
//! request: it runs in its own task, at most [`MAX_MIRRORS_IN_FLIGHT`] at once (beyond that
//! copies are skipped and counted), and only requests whose body was buffered (small, see
//! [`crate::engine::body::MAX_BUFFERED_BODY`]) are mirrored; others are skipped with a debug log.
//! Every copy is counted in `waypoint_mirror_requests_total{result}` (`sent`, `failed`,
//! `skipped_limit`, `skipped_body`, `no_backend`). The mirror Service's DestinationRule
//! `tls` (`SIMPLE`/`MUTUAL`, port level, no subset) applies to its copies as to requests
//! ([`crate::origin`]); its other parts (balancing, limits) do not.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use mesh_model::model::{effective_policy, ClientTls, Mirror, Model, NamespacedName};
use mesh_model::resilience::shadow_authority;
use tracing::Instrument;

use crate::balance::ConnLimits;
use crate::engine::attempts::{upstream_request, RequestHead};
use crate::protocol::Declared;
use crate::proxy::{upstream_proto, Inputs};
use crate::target::Target;
use crate::upstream::{Endpoint, UpBody, UpstreamProto};

/// Mirrored copies in flight across the waypoint.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;
/// A mirrored exchange is abandoned after this long.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Where one mirror sends its copies.
pub struct MirrorTarget {
    service: NamespacedName,
    host: String,
    proto: UpstreamProto,
    eps: Vec<Endpoint>,
    /// The DestinationRule `tls` the proxy originates to the mirror's endpoints, if any.
    tls: Option<ClientTls>,
}

/// The mirrors of a rule resolved in the current model, with their percentages; `Err` names
/// a mirror with no Service or no ready endpoint. `port` is the request's Service port (for
/// a VirtualService mirror without one); `client_ns` the proxy's namespace (which
/// DestinationRule applies).
pub fn targets(
    model: &Model,
    trust_domain: &str,
    client_ns: &str,
    mirrors: &[Mirror],
    port: u16,
) -> Vec<(Result<MirrorTarget, String>, f64)> {
    mirrors
        .iter()
        .map(|m| {
            let port = m.port.unwrap_or(port);
            let target = Target::Service {
                svc: m.service.clone(),
                port,
            };
            let resolved = target
                .lookup(model, trust_domain)
                .filter(|r| !r.endpoints.is_empty());
            let t = match resolved {
                Some(r) => Ok(MirrorTarget {
                    service: m.service.clone(),
                    host: r.service.map(|s| s.hostname()).unwrap_or_default(),
                    proto: upstream_proto(r.port.map_or(Declared::Unknown, Declared::of), false),
                    tls: r.service.zip(r.port).and_then(|(svc, p)| {
                        let policy = effective_policy(model, client_ns, svc, p.port, None).ok()?;
                        policy.origination().cloned()
                    }),
                    eps: r.endpoints,
                }),
                None => Err(format!("mirror {}:{port} has no ready endpoint", m.service)),
            };
            (t, m.percent)
        })
        .collect()
}

/// Sends one copy in the background (see the module docs); `body` is `None` when the
/// request's body was streamed.
pub fn spawn(
    inputs: &Arc<Inputs>,
    local_ip: IpAddr,
    target: Result<MirrorTarget, String>,
    head: &RequestHead,
    body: Option<UpBody>,
    authority: &str,
    path: &str,
) {
    let metrics = &inputs.http_metrics;
    let target = match target {
        Ok(t) => t,
        Err(reason) => {
            tracing::debug!(%reason, "mirror skipped");
            metrics.mirrored("no_backend");
            return;
        }
    };
    let Some(body) = body else {
        tracing::debug!(mirror = %target.service, "mirror skipped: the request body is streamed");
        metrics.mirrored("skipped_body");
        return;
    };
    let Some(slot) = Slot::acquire(&IN_FLIGHT, MAX_MIRRORS_IN_FLIGHT) else {
        metrics.mirrored("skipped_limit");
        return;
    };
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.headers_mut() = head.headers.clone();
    let shadow = shadow_authority(authority);
    let built = upstream_request(req, &shadow, path, target.proto);
    let inputs = inputs.clone();
    let span = tracing::debug_span!("mirror", service = %target.service);
    tokio::spawn(
        async move {
            let _slot = slot;
            let result = match built {
                Ok(req) => {
                    tokio::time::timeout(MIRROR_TIMEOUT, send(&inputs, local_ip, &target, req))
                        .await
                        .unwrap_or_else(|_| Err("timed out".to_string()))
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(status) => {
                    tracing::debug!(status, "mirror answered");
                    inputs.http_metrics.mirrored("sent");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "mirror failed");
                    inputs.http_metrics.mirrored("failed");
                }
            }
        }
        .instrument(span),
    );
}

/// One of `limit` places in flight; given back when the mirror task ends, however it ends.
struct Slot(&'static AtomicUsize);

impl Slot {
    fn acquire(counter: &'static AtomicUsize, limit: usize) -> Option<Slot> {
        if counter.fetch_add(1, Ordering::AcqRel) >= limit {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(counter))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn send(
    inputs: &Arc<Inputs>,
    local_ip: IpAddr,
    target: &MirrorTarget,
    req: Request<UpBody>,
) -> Result<u16, String> {
    let ep = &target.eps[rand::random::<u32>() as usize % target.eps.len()];
    let origin = match &target.tls {
        None => None,
        Some(tls) => Some(
            inputs
                .upstreams
                .origins
                .get(&inputs.model.load_full(), tls, &target.host)
                .map_err(|e| format!("tls origination settings: {e}"))?,
        ),
    };
    let sender = inputs
        .upstreams
        .checkout_limited(
            ep,
            target.proto,
            local_ip,
            Some(target.host.clone()),
            ConnLimits::default(),
            origin.as_deref(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let rsp = inputs
        .upstreams
        .send(ep, sender, req)
        .await
        .map_err(|e| e.to_string())?;
    let status = rsp.status().as_u16();
    // Read to the end so an HTTP/1.1 connection can go back to the pool.
    rsp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_in_flight_are_bounded_and_slots_come_back() {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let a = Slot::acquire(&COUNTER, 2).expect("first");
        let b = Slot::acquire(&COUNTER, 2).expect("second");
        assert!(Slot::acquire(&COUNTER, 2).is_none(), "over the limit");
        assert_eq!(COUNTER.load(Ordering::Acquire), 2);
        drop(a);
        let c = Slot::acquire(&COUNTER, 2).expect("a slot came back");
        drop((b, c));
        assert_eq!(COUNTER.load(Ordering::Acquire), 0);
    }
}
