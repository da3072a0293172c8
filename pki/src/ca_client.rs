//! The CA's client: asks a mesh CA (ours, `control`, or Istio's istiod) to sign a CSR for
//! one identity over `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! The channel is TLS 1.3 with ALPN `h2`, trusting only the roots given (the mesh root the
//! CA's serving certificate chains to); the caller authenticates with a service-account token
//! read from a file on every request (projected tokens are rotated on disk). A node agent
//! names the pod identity it wants in `ImpersonatedIdentity`, as Istio's ztunnel does. The
//! key is generated here and never leaves the process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::{IstioCertificateRequest, IMPERSONATED_IDENTITY};
use crate::tls::PerRoots;
use mesh_model::identity::Identity;

/// Bound on one request (connect + TLS + token check + signing).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("ca address {0:?}: {1}")]
    Address(String, String),
    #[error("read the token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("make a csr: {0}")]
    Csr(String),
    /// The CA answered with an error (its message names the reason).
    #[error("the ca refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the ca's answer is unusable: {0}")]
    Response(String),
}

impl CaClientError {
    /// Refusals that will not change by asking again soon (the caller is not authorized,
    /// its request is wrong); everything else (CA down, overloaded) is worth a retry.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            CaClientError::Refused {
                code: tonic::Code::PermissionDenied | tonic::Code::InvalidArgument,
                ..
            }
        )
    }

    /// A short stable name (metric label, `/config_dump`).
    pub fn reason(&self) -> String {
        match self {
            CaClientError::Address(..) => "ca_address".into(),
            CaClientError::Token { .. } => "token_unreadable".into(),
            CaClientError::Csr(_) => "csr".into(),
            // The CA's message starts with its reason (`no_such_pod_on_node: ...`).
            CaClientError::Refused { code, message } => match message.split_once(':') {
                Some((reason, _)) if !reason.contains(' ') && !reason.is_empty() => {
                    reason.to_string()
                }
                _ => format!("{code:?}").to_lowercase(),
            },
            CaClientError::Response(_) => "bad_response".into(),
        }
    }
}

/// Where the CA is and how to talk to it.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `https://host:port` (Istio's `CA_ADDRESS`, e.g. `https://istiod.istio-system.svc:15012`).
    pub address: String,
    /// Name to verify the serving certificate against; default: the address's host.
    pub server_name: Option<String>,
    /// Roots the CA's serving certificate must chain to.
    pub roots: Arc<RootCertStore>,
    /// A service-account token with audience `istio-ca`, read on every request.
    pub token_path: PathBuf,
    pub timeout: Duration,
}

/// A certificate the CA signed, with its key (in memory only) and the roots it sent.
#[derive(Debug)]
pub struct Fetched {
    pub identity: Identity,
    /// Leaf first, then intermediates (no roots).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The self-signed certificates at the end of the CA's answer: the trust bundle.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Lower-case hex.
    pub serial: String,
}

/// A client for one CA. Cheap to clone; connects lazily and reconnects as needed.
#[derive(Clone)]
pub struct CaClient {
    cfg: CaClientConfig,
    client: IstioCertificateServiceClient<Channel>,
    /// What the CA's serving certificate must chain to: the configured roots, then the trust
    /// bundle as learned ([`CaClient::trust`]), so the CA can move to a new root.
    roots: Arc<ArcSwap<RootCertStore>>,
}

/// Verifies the CA's serving certificate against the roots in force at each handshake.
struct CurrentRoots {
    roots: Arc<ArcSwap<RootCertStore>>,
    current: PerRoots<WebPkiServerVerifier>,
}

impl std::fmt::Debug for CurrentRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentRoots").finish_non_exhaustive()
    }
}

fn webpki_server_verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<WebPkiServerVerifier>, rustls::client::VerifierBuilderError> {
    WebPkiServerVerifier::builder_with_provider(roots, crate::tls::provider()).build()
}

impl CurrentRoots {
    fn inner(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.current
            .get(self.roots.load_full(), webpki_server_verifier)
    }
}

impl ServerCertVerifier for CurrentRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner()?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("address", &self.cfg.address)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    pub fn new(cfg: CaClientConfig) -> Result<CaClient, CaClientError> {
        let bad = |reason: String| CaClientError::Address(cfg.address.clone(), reason);
        let uri: Uri = cfg.address.parse().map_err(|e| bad(format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https".into()));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let name = cfg.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| bad(format!("server name {name:?}: {e}")))?;
        let roots = Arc::new(ArcSwap::new(cfg.roots.clone()));
        let first =
            webpki_server_verifier(cfg.roots.clone()).map_err(|e| bad(format!("roots: {e}")))?;
        let verifier = CurrentRoots {
            roots: roots.clone(),
            current: PerRoots::new("ca server verifier", cfg.roots.clone(), first),
        };
        let mut tls = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let connector = TlsConnector::from(Arc::new(tls));
        let endpoint = Endpoint::from(uri)
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let host = host.clone();
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }));
        Ok(CaClient {
            cfg,
            client: IstioCertificateServiceClient::new(channel),
            roots,
        })
    }

    /// Trusts `roots` for the CA's own certificate from now on (the trust bundle learned
    /// from the CA's answers, which include a root it is moving to).
    pub fn trust(&self, roots: Arc<RootCertStore>) {
        self.roots.store(roots);
    }

    pub fn address(&self) -> &str {
        &self.cfg.address
    }

    /// Asks for a certificate for `id`, lasting `ttl` (the CA may cap it). `impersonate`:
    /// name `id` in `ImpersonatedIdentity` (a node agent asking for a pod's identity).
    pub async fn fetch(
        &self,
        id: &Identity,
        impersonate: bool,
        ttl: Duration,
    ) -> Result<Fetched, CaClientError> {
        let token = std::fs::read_to_string(&self.cfg.token_path).map_err(|source| {
            CaClientError::Token {
                path: self.cfg.token_path.clone(),
                source,
            }
        })?;
        let (csr, key) = crate::csr::generate(id).map_err(|e| CaClientError::Csr(e.to_string()))?;
        let metadata = impersonate.then(|| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.uri())),
                },
            )]
            .into_iter()
            .collect(),
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        let bearer = format!("Bearer {}", token.trim());
        req.metadata_mut().insert(
            "authorization",
            bearer
                .parse()
                .map_err(|_| CaClientError::Csr("the token is not a valid header value".into()))?,
        );
        let resp = self
            .client
            .clone()
            .create_certificate(req)
            .await
            .map_err(|s| CaClientError::Refused {
                code: s.code(),
                message: s.message().chars().take(300).collect(),
            })?
            .into_inner();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        parse_answer(id, &resp.cert_chain, key)
    }
}

/// Splits the CA's answer: leaf, intermediates, then the self-signed roots; checks that the
/// leaf is for `id` and for our key's use.
fn parse_answer(
    id: &Identity,
    pems: &[String],
    key: PrivateKeyDer<'static>,
) -> Result<Fetched, CaClientError> {
    let bad = |m: String| CaClientError::Response(m);
    let mut certs = Vec::new();
    for text in pems {
        for block in pem::parse_many(text).map_err(|e| bad(e.to_string()))? {
            if block.tag() == "CERTIFICATE" {
                certs.push(CertificateDer::from(block.into_contents()));
            }
        }
    }
    let (leaf, rest) = certs
        .split_first()
        .ok_or_else(|| bad("no certificate".into()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(format!("leaf: {e}")))?;
    let got = crate::tls::identity_from_cert(leaf).map_err(|e| bad(format!("leaf: {e}")))?;
    if got != *id {
        return Err(bad(format!("the leaf names {got}, not {id}")));
    }
    let time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let not_before = time(parsed.validity().not_before.timestamp());
    let not_after = time(parsed.validity().not_after.timestamp());
    let serial = parsed
        .raw_serial_as_string()
        .replace(':', "")
        .to_lowercase();
    let self_signed = |c: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(c)
            .is_ok_and(|(_, x)| x.subject().as_raw() == x.issuer().as_raw())
    };
    let split = rest.iter().position(self_signed).unwrap_or(rest.len());
    let (intermediates, roots) = rest.split_at(split);
    let mut chain = vec![leaf.clone()];
    chain.extend(intermediates.iter().cloned());
    Ok(Fetched {
        identity: id.clone(),
        chain,
        key,
        roots: roots.to_vec(),
        not_before,
        not_after,
        serial,
    })
}
