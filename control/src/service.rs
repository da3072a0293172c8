//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: authenticate the caller,
//! decide which identity it may hold ([`crate::authz`]), check the CSR, sign.
//!
//! Every refusal has a named reason: a metric label (`mesh_ca_requests_refused_total`), a
//! log line with the caller and the identity asked for (never the token), and a gRPC status
//! (`UNAUTHENTICATED`, `PERMISSION_DENIED`, `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`,
//! `UNAVAILABLE`). Bounded: at most [`Limits::max_in_flight`] requests at once, and each
//! caller at most [`Limits::per_caller_burst`] requests, refilled at
//! [`Limits::per_caller_rate`] per second.

// tonic::Status is large, and it is the error type tonic's traits require.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use mesh_model::model::Model;
use mesh_pki::ca::{certs_to_pem, Ca};
use mesh_pki::csr::Csr;
use mesh_pki::proto::istio_certificate_service_server::IstioCertificateService;
use mesh_pki::proto::{IstioCertificateRequest, IstioCertificateResponse, IMPERSONATED_IDENTITY};
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};

use crate::authn::{Authenticator, AuthnError};
use crate::authz::{authorize, Caller, Rules};
use crate::metrics::{CaMetrics, GrantLabels, ReasonLabels, ResultLabels};

/// How many issuances `/config_dump` lists (the latest).
pub const LEDGER_LEN: usize = 256;

/// Lifetimes and load bounds.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Lifetime when the request asks for none.
    pub default_ttl: Duration,
    /// Longest lifetime granted, whatever is asked.
    pub max_ttl: Duration,
    pub max_in_flight: usize,
    pub per_caller_burst: u32,
    pub per_caller_rate: f64,
}

/// The peer address of a gRPC connection (set by the server on each request).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// One certificate the CA signed, for `/config_dump` and the local mesh's report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Issued {
    /// RFC 3339.
    pub at: String,
    pub caller: String,
    pub peer: Option<String>,
    pub identity: String,
    pub grant: &'static str,
    pub serial: String,
    pub not_after: String,
}

/// A refusal, as the caller, the log and the metrics see it.
#[derive(Debug)]
struct Refused {
    code: Code,
    reason: &'static str,
    detail: String,
}

impl Refused {
    fn new(code: Code, reason: &'static str, detail: impl Into<String>) -> Self {
        Refused {
            code,
            reason,
            detail: detail.into(),
        }
    }
}

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct CaService {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<Ca>,
    authn: Authenticator,
    rules: Rules,
    model: Arc<ArcSwap<Model>>,
    /// Set once the config source delivered a first model (until then pods are unknown).
    loaded: Arc<AtomicBool>,
    limits: Limits,
    in_flight: Semaphore,
    buckets: Mutex<HashMap<String, Bucket>>,
    metrics: CaMetrics,
    ledger: Mutex<VecDeque<Issued>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl CaService {
    pub fn new(
        ca: Arc<Ca>,
        authn: Authenticator,
        rules: Rules,
        model: Arc<ArcSwap<Model>>,
        loaded: Arc<AtomicBool>,
        limits: Limits,
        metrics: CaMetrics,
    ) -> Self {
        CaService {
            inner: Arc::new(Inner {
                in_flight: Semaphore::new(limits.max_in_flight),
                ca,
                authn,
                rules,
                model,
                loaded,
                limits,
                buckets: Mutex::new(HashMap::new()),
                metrics,
                ledger: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// The latest issuances, oldest first.
    pub fn ledger(&self) -> Vec<Issued> {
        let ledger = self
            .inner
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ledger.iter().cloned().collect()
    }

    pub fn rules(&self) -> &Rules {
        &self.inner.rules
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    async fn handle(
        &self,
        req: Request<IstioCertificateRequest>,
        peer: Option<SocketAddr>,
        caller_seen: &mut Option<Caller>,
        requested_seen: &mut Option<String>,
    ) -> Result<IstioCertificateResponse, Refused> {
        let inner = &self.inner;
        let _permit = inner.in_flight.try_acquire().map_err(|_| {
            Refused::new(
                Code::ResourceExhausted,
                "overloaded",
                "too many requests in flight",
            )
        })?;
        let token = bearer(req.metadata())?;
        let caller = inner.authn.authenticate(token).await.map_err(|e| match e {
            AuthnError::Unavailable(_) => {
                Refused::new(Code::Unavailable, e.reason(), e.to_string())
            }
            _ => Refused::new(Code::Unauthenticated, e.reason(), e.to_string()),
        })?;
        *caller_seen = Some(caller.clone());
        self.admit(&caller)?;
        let msg = req.into_inner();
        let requested = impersonated(&msg)?;
        *requested_seen = requested.clone();
        if !inner.loaded.load(Ordering::SeqCst) {
            return Err(Refused::new(
                Code::Unavailable,
                "not_ready",
                "no config loaded yet: pods are unknown",
            ));
        }
        let model = inner.model.load();
        let (identity, grant) = authorize(&inner.rules, &caller, requested.as_deref(), &model)
            .map_err(|r| Refused::new(Code::PermissionDenied, r.reason(), r.to_string()))?;
        *requested_seen = Some(identity.uri());
        let csr = Csr::parse_pem(&msg.csr)
            .map_err(|e| Refused::new(Code::InvalidArgument, e.reason(), e.to_string()))?;
        if csr.uri_sans() != [identity.uri()] {
            return Err(Refused::new(
                Code::PermissionDenied,
                "csr_identity",
                format!(
                    "the csr asks for {:?}; only {} is authorized",
                    csr.uri_sans(),
                    identity
                ),
            ));
        }
        let ttl = match u64::try_from(msg.validity_duration) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs).min(inner.limits.max_ttl),
            _ => inner.limits.default_ttl,
        };
        let signed = inner
            .ca
            .sign_csr(&csr, &identity, ttl)
            .map_err(|e| Refused::new(Code::Internal, "sign_failed", e.to_string()))?;
        inner
            .metrics
            .issued
            .get_or_create(&GrantLabels {
                grant: grant.as_str(),
            })
            .inc();
        tracing::info!(caller = %caller.describe(), identity = %identity, grant = grant.as_str(),
            serial = %signed.serial, ?ttl, "issued certificate");
        self.record(Issued {
            at: rfc3339(SystemTime::now()),
            caller: caller.describe(),
            peer: peer.map(|p| p.to_string()),
            identity: identity.uri(),
            grant: grant.as_str(),
            serial: signed.serial.clone(),
            not_after: rfc3339(signed.not_after),
        });
        // Leaf, intermediates, then the trusted roots, the signer's own root last (Istio's
        // clients take the last certificate as the root).
        let mut chain: Vec<String> = signed
            .chain
            .iter()
            .map(|c| certs_to_pem(std::slice::from_ref(c)))
            .collect();
        let roots = inner.ca.roots();
        chain.extend(
            roots
                .iter()
                .rev()
                .map(|r| certs_to_pem(std::slice::from_ref(r))),
        );
        Ok(IstioCertificateResponse { cert_chain: chain })
    }

    /// Per-caller token bucket (keyed by service account and node).
    fn admit(&self, caller: &Caller) -> Result<(), Refused> {
        let limits = &self.inner.limits;
        let mut buckets = self
            .inner
            .buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if buckets.len() > 10_000 {
            // Full buckets carry no state worth keeping.
            let full = Duration::from_secs_f64(
                f64::from(limits.per_caller_burst) / limits.per_caller_rate.max(0.001),
            );
            buckets.retain(|_, b| now.duration_since(b.at) < full);
        }
        let bucket = buckets.entry(caller.describe()).or_insert(Bucket {
            tokens: f64::from(limits.per_caller_burst),
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * limits.per_caller_rate;
        bucket.tokens = (bucket.tokens + refill).min(f64::from(limits.per_caller_burst));
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(Refused::new(
                Code::ResourceExhausted,
                "rate_limited",
                format!("more than {} requests/s", limits.per_caller_rate),
            ));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    fn record(&self, issued: Issued) {
        let mut ledger = self
            .inner
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if ledger.len() == LEDGER_LEN {
            ledger.pop_front();
        }
        ledger.push_back(issued);
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
        let mut caller = None;
        let mut requested = None;
        let result = self.handle(req, peer, &mut caller, &mut requested).await;
        let outcome = if result.is_ok() { "issued" } else { "refused" };
        self.inner
            .metrics
            .duration
            .get_or_create(&ResultLabels { result: outcome })
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(resp) => Ok(Response::new(resp)),
            Err(refused) => {
                self.inner
                    .metrics
                    .refused
                    .get_or_create(&ReasonLabels {
                        reason: refused.reason,
                    })
                    .inc();
                tracing::warn!(
                    reason = refused.reason,
                    caller = caller.as_ref().map(Caller::describe).as_deref().unwrap_or("-"),
                    requested = requested.as_deref().unwrap_or("-"),
                    peer = peer.map(|p| p.to_string()).as_deref().unwrap_or("-"),
                    detail = %refused.detail,
                    "certificate request refused"
                );
                Err(Status::new(
                    refused.code,
                    format!("{}: {}", refused.reason, refused.detail),
                ))
            }
        }
    }
}

/// The bearer token of `authorization`.
fn bearer(md: &tonic::metadata::MetadataMap) -> Result<&str, Refused> {
    let none = || {
        Refused::new(
            Code::Unauthenticated,
            "no_token",
            "no bearer token in authorization",
        )
    };
    let value = md.get("authorization").ok_or_else(none)?;
    let text = value.to_str().map_err(|_| none())?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(none)?
        .trim();
    if token.is_empty() {
        return Err(none());
    }
    Ok(token)
}

/// `metadata["ImpersonatedIdentity"]`: a string, or absent.
fn impersonated(msg: &IstioCertificateRequest) -> Result<Option<String>, Refused> {
    use prost_types::value::Kind;
    let Some(value) = msg
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Kind::StringValue(_)) | Some(Kind::NullValue(_)) | None => Ok(None),
        Some(_) => Err(Refused::new(
            Code::InvalidArgument,
            "bad_impersonation",
            "ImpersonatedIdentity is not a string",
        )),
    }
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
