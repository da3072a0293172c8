//! The embedded certificate authority: issues each workload on this node an ECDSA P-256 leaf
//! whose only URI SAN is its SPIFFE ID.
//!
//! The signing key comes from one of three places:
//! - a plug-in CA in the layout of Istio's `cacerts` secret (`ca-cert.pem`, `ca-key.pem`,
//!   `root-cert.pem`, `cert-chain.pem`), possibly an intermediate under an offline root;
//! - a self-signed root generated on the first start and persisted next to its key
//!   (`root-cert.pem`, `root-key.pem`, mode 0600), so restarts and sibling node agents sharing
//!   the directory agree on one root;
//! - memory only ([`Ca::ephemeral`], for tests and benchmarks).
//!
//! Workload keys are generated here and handed out in memory; they never touch disk. Only this
//! module and [`crate::certs`] ever hold private keys.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use crate::csr::Csr;
use mesh_model::identity::Identity;

/// Trust domain used when none is configured (as in Istio).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Workload certificate lifetime used when none is configured (as in Istio).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Lifetime of a generated self-signed root: ten years, like Istio's self-signed CA.
pub const GENERATED_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Plug-in CA files (Istio's `cacerts` secret).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Key of a generated root. It also carries the root certificate, so that the file is the single
/// commit point when two processes create the root at once.
pub const ROOT_KEY_FILE: &str = "root-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("plug-in ca in {dir}: {reason}")]
    PlugIn { dir: PathBuf, reason: String },
    #[error("generate {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("trust root certificate: {0}")]
    Root(rustls::Error),
    #[error("issue certificate for {id}: trust domain is not {trust_domain}")]
    ForeignTrustDomain { id: Identity, trust_domain: String },
    #[error("issue certificate for {id}: {reason}")]
    Validity { id: Identity, reason: String },
    #[error("issue certificate for {id}: {source}")]
    Sign { id: Identity, source: rcgen::Error },
    #[error("load the key issued for {id}: {source}")]
    Key {
        id: Identity,
        source: Box<rustls::Error>,
    },
    #[error("certificate for {id} not issued yet: {reason}")]
    Pending { id: Identity, reason: String },
    #[error("check the ca by verifying a probe certificate: {0}")]
    SelfCheck(webpki::Error),
}

/// Where the signing key of a [`Ca`] came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaOrigin {
    PlugIn(PathBuf),
    Generated(PathBuf),
    Ephemeral,
}

/// The embedded certificate authority.
pub struct Ca {
    trust_domain: String,
    origin: CaOrigin,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after the leaf: the signing certificate and its intermediates, never a
    /// trusted root (peers have those already).
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    root_store: Arc<RootCertStore>,
    /// Leaves never outlive the certificate that signs them.
    signer_not_after: SystemTime,
}

/// A certificate signed for a key the CA never saw (from a CSR).
#[derive(Debug)]
pub struct Signed {
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Lower-case hex.
    pub serial: String,
}

/// A freshly issued workload certificate and its key (in memory only).
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Lower-case hex.
    pub serial: String,
}

// === impl Ca ===

impl Ca {
    /// Plug-in CA if `dir/ca-cert.pem` and `dir/ca-key.pem` exist (with `root-cert.pem`,
    /// `cert-chain.pem`); otherwise load `dir/root-cert.pem` + `dir/root-key.pem` generated on an
    /// earlier start, or generate and persist them.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        match (
            dir.join(CA_CERT_FILE).exists(),
            dir.join(CA_KEY_FILE).exists(),
        ) {
            (true, true) => Self::load_plug_in(dir, trust_domain),
            (false, false) => Self::load_or_generate_root(dir, trust_domain),
            // Half a plug-in CA is a mistake; silently minting a new root instead would split
            // the mesh.
            _ => Err(CaError::PlugIn {
                dir: dir.to_path_buf(),
                reason: format!("{CA_CERT_FILE} and {CA_KEY_FILE} must both be present"),
            }),
        }
    }

    /// An in-memory CA with a fresh self-signed root (tests, benchmarks).
    pub fn ephemeral(trust_domain: &str) -> Result<Ca, CaError> {
        let (cert, key) = generate_root(trust_domain)?;
        Self::from_parts(
            trust_domain,
            CaOrigin::Ephemeral,
            cert.clone(),
            key,
            Vec::new(),
            vec![cert],
        )
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn origin(&self) -> &CaOrigin {
        &self.origin
    }

    /// Every trusted root (DER).
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    /// The trusted roots as rustls trust anchors, parsed once.
    pub fn root_store(&self) -> Arc<RootCertStore> {
        self.root_store.clone()
    }

    /// Issues a leaf for `id` valid from now (rounded down to the second, the resolution of
    /// X.509 times) for `ttl`, or until the signing certificate expires if that is sooner.
    pub fn issue(&self, id: &Identity, ttl: Duration) -> Result<WorkloadCert, CaError> {
        let invalid = |reason: &str| CaError::Validity {
            id: id.clone(),
            reason: reason.to_string(),
        };
        let now = SystemTime::now();
        let not_before = floor_to_second(now).ok_or_else(|| invalid("clock before 1970"))?;
        let not_after = not_before
            .checked_add(ttl)
            .ok_or_else(|| invalid("ttl out of range"))?
            .min(self.signer_not_after);
        if not_after <= now {
            return Err(invalid("the signing certificate has expired"));
        }
        self.issue_with_validity(id, not_before, not_after)
    }

    /// For tests: explicit validity window (expired / not-yet-valid certificates).
    pub fn issue_with_validity(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CaError> {
        if id.trust_domain != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        self.sign_leaf(id, not_before, not_after)
    }

    fn sign_leaf(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CaError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Sign {
                id: id.clone(),
                source,
            })?;
        let signed = self.sign_for(id, not_before, not_after, &key)?;
        Ok(WorkloadCert {
            identity: id.clone(),
            chain: signed.chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: signed.not_before,
            not_after: signed.not_after,
            serial: signed.serial,
        })
    }

    /// Signs the public key of `csr` as `id`'s leaf, valid from now for `ttl` (or until the
    /// signing certificate expires, if sooner). The CSR must name `id` as its one URI SAN:
    /// what the CA signs is exactly what the caller asked for and was authorized to hold.
    pub fn sign_csr(&self, csr: &Csr, id: &Identity, ttl: Duration) -> Result<Signed, CaError> {
        let invalid = |reason: String| CaError::Validity {
            id: id.clone(),
            reason,
        };
        if id.trust_domain != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if csr.uri_sans() != [id.uri()] {
            return Err(invalid(format!(
                "the csr names {:?}, not only {}",
                csr.uri_sans(),
                id.uri()
            )));
        }
        let now = SystemTime::now();
        let not_before = floor_to_second(now).ok_or_else(|| invalid("clock before 1970".into()))?;
        let not_after = not_before
            .checked_add(ttl)
            .ok_or_else(|| invalid("ttl out of range".into()))?
            .min(self.signer_not_after);
        if not_after <= now {
            return Err(invalid("the signing certificate has expired".into()));
        }
        self.sign_for(id, not_before, not_after, csr.public_key())
    }

    /// The leaf for `id` (no subject, one critical URI SAN, like Istio's) over `public_key`,
    /// followed by this CA's intermediates.
    fn sign_for(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
        public_key: &impl PublicKeyData,
    ) -> Result<Signed, CaError> {
        let invalid = |reason: &str| CaError::Validity {
            id: id.clone(),
            reason: reason.to_string(),
        };
        let sign = |source| CaError::Sign {
            id: id.clone(),
            source,
        };
        // An `Identity` built by hand could hold characters that would not survive the round
        // trip through the SAN (a `/` in a namespace); refuse it rather than mint a certificate
        // that names someone else.
        let uri = id.uri();
        if uri.parse::<Identity>().as_ref() != Ok(id) {
            return Err(invalid("not a valid spiffe identity"));
        }
        if not_after <= not_before {
            return Err(invalid("not_after is not after not_before"));
        }
        let not_before = floor_to_second(not_before).ok_or_else(|| invalid("time before 1970"))?;
        let not_after = floor_to_second(not_after).ok_or_else(|| invalid("time before 1970"))?;

        let (serial, serial_hex) = random_serial();
        let mut params = CertificateParams::default();
        // Like Istio: no subject, so the SAN extension is critical and carries the identity.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(uri).map_err(sign)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial);
        params.not_before = to_asn1_time(not_before).ok_or_else(|| invalid("time out of range"))?;
        params.not_after = to_asn1_time(not_after).ok_or_else(|| invalid("time out of range"))?;
        let cert = params.signed_by(public_key, &self.issuer).map_err(sign)?;

        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        Ok(Signed {
            chain,
            not_before,
            not_after,
            serial: serial_hex,
        })
    }

    /// A TLS server certificate for the CA's own gRPC endpoint: the DNS names clients dial
    /// (`istiod.istio-system.svc`, ...), signed by this CA so every agent already trusts it.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let generate = |source| CaError::Generate {
            what: "ca serving certificate",
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let now = SystemTime::now();
        let bad_time = || generate(rcgen::Error::Time);
        let not_before = floor_to_second(now).ok_or_else(bad_time)?;
        let not_after = not_before
            .checked_add(ttl)
            .ok_or_else(bad_time)?
            .min(self.signer_not_after);
        let (serial, _) = random_serial();
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(generate)?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial);
        params.not_before = to_asn1_time(not_before).ok_or_else(bad_time)?;
        params.not_after = to_asn1_time(not_after).ok_or_else(bad_time)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok((
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// Test hook: sign arbitrary leaf parameters (two SANs, CA:TRUE, missing EKU, ...) with
    /// this CA's key, to prove that verification refuses them.
    #[cfg(test)]
    pub(crate) fn sign_params_for_test(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Vec<CertificateDer<'static>> {
        let cert = params
            .signed_by(key, &self.issuer)
            .expect("sign test params");
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        chain
    }

    /// Test hook: a leaf for another trust domain from this CA's own key.
    #[cfg(test)]
    pub(crate) fn issue_any_trust_domain_for_test(
        &self,
        id: &Identity,
        ttl: Duration,
    ) -> WorkloadCert {
        let now = SystemTime::now();
        self.sign_leaf(id, now, now + ttl)
            .expect("issue test certificate")
    }

    fn load_plug_in(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        let plug_in = |reason: String| CaError::PlugIn {
            dir: dir.to_path_buf(),
            reason,
        };
        let ca_cert_path = dir.join(CA_CERT_FILE);
        let signer = read_certs(&ca_cert_path)?
            .into_iter()
            .next()
            .ok_or_else(|| plug_in(format!("{CA_CERT_FILE} holds no certificate")))?;
        let key = read_key(&dir.join(CA_KEY_FILE))?;
        let roots = read_certs(&dir.join(ROOT_CERT_FILE))?;
        if roots.is_empty() {
            return Err(plug_in(format!("{ROOT_CERT_FILE} holds no certificate")));
        }
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let listed = if chain_path.exists() {
            read_certs(&chain_path)?
        } else {
            Vec::new()
        };
        let intermediates = intermediates(&signer, &listed, &roots);
        Self::from_parts(
            trust_domain,
            CaOrigin::PlugIn(dir.to_path_buf()),
            signer,
            key,
            intermediates,
            roots,
        )
        .map_err(|e| match e {
            e @ (CaError::Read { .. } | CaError::Parse { .. }) => e,
            other => plug_in(other.to_string()),
        })
    }

    /// Loads the generated root, or creates it. Creation is race-free: the key (with the
    /// certificate appended) is written to a private temporary file and hard-linked to its final
    /// name, which fails if another process got there first; the loser then loads the winner's.
    fn load_or_generate_root(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let key_path = dir.join(ROOT_KEY_FILE);
        if !key_path.exists() {
            let (cert, key) = generate_root(trust_domain)?;
            let contents = format!("{}{}", key.serialize_pem(), certs_to_pem(&[cert]));
            // Losing the race is fine: the winner's root is loaded below.
            write_no_replace(&key_path, contents.as_bytes(), 0o600)?;
        }
        let (signer, key) = load_generated(dir, &key_path)?;
        let root_path = dir.join(ROOT_CERT_FILE);
        let mut roots = vec![signer.clone()];
        if root_path.exists() {
            // Extra roots an operator appended (root rotation) are trusted too.
            for extra in read_certs(&root_path)? {
                if !roots.contains(&extra) {
                    roots.push(extra);
                }
            }
        } else {
            write_replace(&root_path, certs_to_pem(&roots).as_bytes(), 0o644)?;
        }
        Self::from_parts(
            trust_domain,
            CaOrigin::Generated(dir.to_path_buf()),
            signer,
            key,
            Vec::new(),
            roots,
        )
    }

    /// Checks that the pieces fit together and builds the CA: the key belongs to the signing
    /// certificate, every root is a usable trust anchor, and a probe leaf verifies against the
    /// roots (so a mismatched `cacerts` fails at startup, not at the first handshake).
    fn from_parts(
        trust_domain: &str,
        origin: CaOrigin,
        signer: CertificateDer<'static>,
        key: KeyPair,
        intermediates: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Ca, CaError> {
        let signer_path = || match &origin {
            CaOrigin::PlugIn(dir) => dir.join(CA_CERT_FILE),
            CaOrigin::Generated(dir) => dir.join(ROOT_KEY_FILE),
            CaOrigin::Ephemeral => PathBuf::from("<memory>"),
        };
        let parse = |reason: String| CaError::Parse {
            path: signer_path(),
            reason,
        };
        let (_, x509) = x509_parser::parse_x509_certificate(&signer)
            .map_err(|e| parse(format!("signing certificate: {e}")))?;
        if x509
            .tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .as_ref()
            != key.public_key_raw()
        {
            return Err(parse(
                "the private key does not belong to the signing certificate".into(),
            ));
        }
        if !x509.is_ca() {
            return Err(parse("the signing certificate is not a ca".into()));
        }
        let signer_not_after = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(x509.validity().not_after.timestamp())
                    .map_err(|_| parse("signing certificate expires before 1970".into()))?,
            );
        let issuer = Issuer::from_ca_cert_der(&signer, key)
            .map_err(|e| parse(format!("signing certificate: {e}")))?;

        let mut root_store = RootCertStore::empty();
        for root in &roots {
            root_store.add(root.clone()).map_err(CaError::Root)?;
        }
        let ca = Ca {
            trust_domain: trust_domain.to_string(),
            origin,
            issuer,
            intermediates,
            roots,
            root_store: Arc::new(root_store),
            signer_not_after,
        };
        ca.self_check()?;
        Ok(ca)
    }

    fn self_check(&self) -> Result<(), CaError> {
        let probe = Identity::new(&self.trust_domain, "istio-system", "ca-self-check");
        let cert = self.issue(&probe, Duration::from_secs(60))?;
        let Some((leaf, intermediates)) = cert.chain.split_first() else {
            return Ok(());
        };
        let leaf = webpki::EndEntityCert::try_from(leaf).map_err(CaError::SelfCheck)?;
        leaf.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &self.root_store.roots,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(CaError::SelfCheck)?;
        Ok(())
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the signing key.
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("origin", &self.origin)
            .field("roots", &self.roots.len())
            .field("intermediates", &self.intermediates.len())
            .finish_non_exhaustive()
    }
}

/// PEM text of DER certificates, one block each.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref()))
        .collect();
    pem::encode_many_config(
        &blocks,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

// === helpers ===

fn generate_root(trust_domain: &str) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    let generate = |what| move |source| CaError::Generate { what, source };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("root key"))?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let (serial, serial_hex) = random_serial();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    // A distinct name per generated root: a peer from an unrelated root is then reported as
    // an unknown issuer, not as a bad signature from a namesake.
    dn.push(
        DnType::CommonName,
        format!("mesh root ca {}", &serial_hex[..8]),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(serial);
    let bad_time = || CaError::Generate {
        what: "root validity",
        source: rcgen::Error::Time,
    };
    let not_before = floor_to_second(now).ok_or_else(bad_time)?;
    params.not_before = to_asn1_time(not_before).ok_or_else(bad_time)?;
    params.not_after = not_before
        .checked_add(GENERATED_ROOT_TTL)
        .and_then(to_asn1_time)
        .ok_or_else(bad_time)?;
    let cert = params
        .self_signed(&key)
        .map_err(generate("root certificate"))?;
    Ok((cert.der().clone(), key))
}

/// Certificates sent after a leaf: the signing certificate then those listed in
/// `cert-chain.pem`, without duplicates and without trusted roots. Istio's `cert-chain.pem`
/// usually ends with the root; sending it would only waste bytes in every handshake.
fn intermediates(
    signer: &CertificateDer<'static>,
    listed: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    let mut out: Vec<CertificateDer<'static>> = Vec::new();
    for cert in std::iter::once(signer).chain(listed) {
        if !roots.contains(cert) && !out.contains(cert) {
            out.push(cert.clone());
        }
    }
    out
}

/// The generated root: the key from `root-key.pem` and the certificate for that key, found in
/// the same file (written together) or, for a key file holding only the key, in
/// `root-cert.pem`.
fn load_generated(
    dir: &Path,
    key_path: &Path,
) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    let key = read_key(key_path)?;
    let mut candidates = read_certs(key_path)?;
    let root_path = dir.join(ROOT_CERT_FILE);
    if root_path.exists() {
        candidates.extend(read_certs(&root_path)?);
    }
    let cert = candidates
        .into_iter()
        .find(|c| {
            x509_parser::parse_x509_certificate(c).is_ok_and(|(_, x)| {
                x.tbs_certificate
                    .subject_pki
                    .subject_public_key
                    .data
                    .as_ref()
                    == key.public_key_raw()
            })
        })
        .ok_or_else(|| CaError::Parse {
            path: key_path.to_path_buf(),
            reason: "no certificate for this key here or in root-cert.pem".into(),
        })?;
    Ok((cert, key))
}

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bytes = read_file(path)?;
    rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Parse {
            path: path.to_path_buf(),
            reason: format!("certificates: {e}"),
        })
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let parse = |reason: String| CaError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = read_file(path)?;
    let key = rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| parse(format!("private key: {e}")))?
        .ok_or_else(|| parse("no private key".into()))?;
    let pkcs8 = der::to_pkcs8(&key).map_err(parse)?;
    KeyPair::try_from(pkcs8.as_slice()).map_err(|e| parse(format!("private key: {e}")))
}

/// Creates `path` with `contents` unless it exists (then returns `Ok(false)`), never exposing a
/// partly written file: write a private temporary, then hard-link it into place.
fn write_no_replace(path: &Path, contents: &[u8], mode: u32) -> Result<bool, CaError> {
    let temp = TempFile::create(path, contents, mode)?;
    match fs::hard_link(&temp.0, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(CaError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Atomically replaces `path` with `contents` (temporary file, then rename).
fn write_replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let temp = TempFile::create(path, contents, mode)?;
    fs::rename(&temp.0, path).map_err(|source| CaError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// A temporary file next to its destination, removed on drop (after a rename, removal just
/// finds nothing).
struct TempFile(PathBuf);

impl TempFile {
    fn create(dest: &Path, contents: &[u8], mode: u32) -> Result<TempFile, CaError> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dest.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        let write = |source| CaError::Write {
            path: path.clone(),
            source,
        };
        // `mode` applies at creation, so the key is never readable by others, not even briefly.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(write)?;
        let temp = TempFile(path.clone());
        file.write_all(contents).map_err(write)?;
        file.sync_all().map_err(write)?;
        Ok(temp)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn floor_to_second(t: SystemTime) -> Option<SystemTime> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn to_asn1_time(t: SystemTime) -> Option<time::OffsetDateTime> {
    let secs = i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()?;
    time::OffsetDateTime::from_unix_timestamp(secs).ok()
}

/// A random positive 128-bit serial and its hex form. The top byte is kept in 0x40..=0x7f so
/// the DER integer needs neither a sign byte nor trimming and the hex matches the certificate.
fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

/// Just enough DER to turn the key formats found in `cacerts` secrets into PKCS#8: ring (our
/// signing backend) loads only PKCS#8, while older openssl writes PKCS#1 (`RSA PRIVATE KEY`)
/// and SEC1 (`EC PRIVATE KEY`).
mod der {
    use rustls_pki_types::PrivateKeyDer;

    const SEQUENCE: u8 = 0x30;
    const OCTET_STRING: u8 = 0x04;
    const OID: u8 = 0x06;
    const CONTEXT_0: u8 = 0xa0;
    const VERSION_0: &[u8] = &[0x02, 0x01, 0x00];
    /// rsaEncryption (1.2.840.113549.1.1.1) with NULL parameters.
    const RSA_ALGORITHM: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    /// id-ecPublicKey (1.2.840.10045.2.1).
    const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

    pub(super) fn to_pkcs8(key: &PrivateKeyDer<'_>) -> Result<Vec<u8>, String> {
        match key {
            PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
            PrivateKeyDer::Pkcs1(k) => Ok(private_key_info(RSA_ALGORITHM, k.secret_pkcs1_der())),
            PrivateKeyDer::Sec1(k) => {
                let sec1 = k.secret_sec1_der();
                let curve = sec1_curve(sec1)
                    .ok_or("ec private key without a named curve (sec1 [0] parameters)")?;
                Ok(private_key_info(&[EC_PUBLIC_KEY, curve].concat(), sec1))
            }
            _ => Err("unsupported private key format".into()),
        }
    }

    fn private_key_info(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
        tlv(
            SEQUENCE,
            &[
                VERSION_0,
                &tlv(SEQUENCE, algorithm),
                &tlv(OCTET_STRING, key),
            ]
            .concat(),
        )
    }

    /// The curve OID (whole TLV) in a SEC1 `ECPrivateKey`'s `[0] parameters`.
    fn sec1_curve(sec1: &[u8]) -> Option<&[u8]> {
        let (tag, body, _) = read_tlv(sec1)?;
        if tag != SEQUENCE {
            return None;
        }
        let mut rest = body;
        while !rest.is_empty() {
            let (tag, value, next) = read_tlv(rest)?;
            if tag == CONTEXT_0 {
                let (inner_tag, _, after) = read_tlv(value)?;
                return (inner_tag == OID && after.is_empty()).then_some(value);
            }
            rest = next;
        }
        None
    }

    pub(super) fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = value.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(value);
        out
    }

    /// One DER element: (tag, value, rest). Single-byte tags only, which is all these
    /// structures use.
    pub(super) fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > std::mem::size_of::<usize>() || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Barrier;

    use rcgen::CertifiedIssuer;
    use rustls_pki_types::PrivateSec1KeyDer;
    use x509_parser::prelude::{parse_x509_certificate, GeneralName};

    use super::*;

    fn web() -> Identity {
        Identity::new("cluster.local", "default", "web")
    }

    #[test]
    fn a_csr_is_signed_for_its_one_identity_and_the_chain_verifies() {
        let ca = Ca::ephemeral("cluster.local").unwrap();
        let (pem, _key) = crate::csr::generate(&web()).unwrap();
        let csr = Csr::parse_pem(&pem).unwrap();
        let signed = ca
            .sign_csr(&csr, &web(), Duration::from_secs(3600))
            .unwrap();
        assert!(verifies(&signed.chain, &ca.roots()));
        let (_, leaf) = parse_x509_certificate(&signed.chain[0]).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect();
        assert_eq!(sans, [format!("{:?}", GeneralName::URI(&web().uri()))]);
        let lifetime = signed.not_after.duration_since(signed.not_before).unwrap();
        assert_eq!(lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn a_csr_for_another_identity_or_trust_domain_is_not_signed() {
        let ca = Ca::ephemeral("cluster.local").unwrap();
        let (pem, _key) = crate::csr::generate(&web()).unwrap();
        let csr = Csr::parse_pem(&pem).unwrap();
        let admin = Identity::new("cluster.local", "default", "admin");
        assert!(matches!(
            ca.sign_csr(&csr, &admin, Duration::from_secs(60)),
            Err(CaError::Validity { .. })
        ));
        let foreign = Identity::new("evil.example", "default", "web");
        let (pem, _key) = crate::csr::generate(&foreign).unwrap();
        let csr = Csr::parse_pem(&pem).unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &foreign, Duration::from_secs(60)),
            Err(CaError::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn the_serving_certificate_names_the_dns_names_asked_for() {
        let ca = Ca::ephemeral("cluster.local").unwrap();
        let names = vec!["istiod.istio-system.svc".to_string()];
        let (chain, _key) = ca.issue_server(&names, Duration::from_secs(3600)).unwrap();
        let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san
            .value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::DNSName("istiod.istio-system.svc"))));
    }

    /// Verifies a leaf chain against `roots` the way peers will (webpki, client usage).
    fn verifies(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) -> bool {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
        leaf.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &store.roots,
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .is_ok()
    }

    #[test]
    fn generated_root_is_persisted_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(
            first.origin(),
            &CaOrigin::Generated(dir.path().to_path_buf())
        );
        let second = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(first.roots(), second.roots());
        assert_eq!(first.roots().len(), 1);

        let on_disk = read_certs(&dir.path().join(ROOT_CERT_FILE)).unwrap();
        assert_eq!(on_disk, first.roots());
        let mode = fs::metadata(dir.path().join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "root key must be private");

        // A leaf from the reloaded CA verifies against the first one's roots.
        let leaf = second.issue(&web(), Duration::from_secs(3600)).unwrap();
        assert!(verifies(&leaf.chain, &first.roots()));
        // No temporary files left behind.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [ROOT_CERT_FILE, ROOT_KEY_FILE]);
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_root() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let barrier = Barrier::new(2);
            let roots: Vec<Vec<CertificateDer<'static>>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            Ca::load_or_create(dir.path(), "cluster.local")
                                .unwrap()
                                .roots()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(roots[0], roots[1]);
            let reloaded = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
            assert_eq!(reloaded.roots(), roots[0]);
        }
    }

    /// A root and an intermediate made with rcgen, written in Istio's `cacerts` layout.
    struct PlugIn {
        dir: tempfile::TempDir,
        root: CertificateDer<'static>,
        intermediate: CertificateDer<'static>,
    }

    fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::hours(1);
        params.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(365);
        params
    }

    fn plug_in(
        key_pem: impl FnOnce(&KeyPair) -> String,
        extra_roots: &[CertificateDer<'_>],
    ) -> PlugIn {
        let root = CertifiedIssuer::self_signed(
            ca_params("offline root"),
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        )
        .unwrap();
        let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let inter_pem = key_pem(&inter_key);
        let inter = CertifiedIssuer::signed_by(ca_params("cluster intermediate"), inter_key, &root)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut all_roots = vec![root.der().clone()];
        all_roots.extend(extra_roots.iter().map(|r| r.clone().into_owned()));
        fs::write(dir.path().join(CA_CERT_FILE), inter.pem()).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), inter_pem).unwrap();
        fs::write(dir.path().join(ROOT_CERT_FILE), certs_to_pem(&all_roots)).unwrap();
        // Istio's cert-chain.pem: the CA certificate followed by the root.
        fs::write(
            dir.path().join(CERT_CHAIN_FILE),
            format!("{}{}", inter.pem(), root.pem()),
        )
        .unwrap();
        PlugIn {
            dir,
            root: root.der().clone(),
            intermediate: inter.der().clone(),
        }
    }

    #[test]
    fn plug_in_ca_with_an_rsa_intermediate_in_pkcs1_signs_csrs() {
        // An RSA 2048 key as older openssl writes it (`RSA PRIVATE KEY`, PKCS#1).
        let pkcs1 = include_bytes!("../../model/src/jwt/testdata/rsa2048.der");
        let pkcs8 = der::to_pkcs8(&PrivateKeyDer::Pkcs1(pkcs1.to_vec().into())).unwrap();
        let inter_key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let root = CertifiedIssuer::self_signed(
            ca_params("offline root"),
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        )
        .unwrap();
        let inter =
            CertifiedIssuer::signed_by(ca_params("rsa intermediate"), inter_key, &root).unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CA_CERT_FILE), inter.pem()).unwrap();
        let pem = pem::encode(&pem::Pem::new("RSA PRIVATE KEY", pkcs1.to_vec()));
        fs::write(dir.path().join(CA_KEY_FILE), pem).unwrap();
        fs::write(dir.path().join(ROOT_CERT_FILE), root.pem()).unwrap();
        fs::write(
            dir.path().join(CERT_CHAIN_FILE),
            format!("{}{}", inter.pem(), root.pem()),
        )
        .unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        let (csr, _key) = crate::csr::generate(&web()).unwrap();
        let csr = Csr::parse_pem(&csr).unwrap();
        let signed = ca.sign_csr(&csr, &web(), Duration::from_secs(600)).unwrap();
        assert_eq!(signed.chain.len(), 2, "leaf and the rsa intermediate");
        assert!(verifies(&signed.chain, &ca.roots()));
    }

    #[test]
    fn plug_in_ca_with_intermediate_issues_verifiable_chains() {
        let p = plug_in(|k| k.serialize_pem(), &[]);
        let ca = Ca::load_or_create(p.dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.origin(), &CaOrigin::PlugIn(p.dir.path().to_path_buf()));
        assert_eq!(ca.roots(), vec![p.root.clone()]);
        let leaf = ca.issue(&web(), Duration::from_secs(3600)).unwrap();
        // Leaf then intermediate; the root is not sent.
        assert_eq!(leaf.chain.len(), 2);
        assert_eq!(leaf.chain[1], p.intermediate);
        assert!(verifies(&leaf.chain, &ca.roots()));
        assert!(
            !verifies(&leaf.chain[..1], &ca.roots()),
            "needs the intermediate"
        );
        // Nothing was written into the plug-in directory.
        assert!(!p.dir.path().join(ROOT_KEY_FILE).exists());
    }

    #[test]
    fn plug_in_ca_key_in_sec1_form_is_accepted() {
        // openssl's `EC PRIVATE KEY`: rebuild it from the PKCS#8 that rcgen gives us.
        let p = plug_in(
            |k| {
                let sec1 = pkcs8_to_sec1(&k.serialize_der());
                ::pem::encode(&::pem::Pem::new("EC PRIVATE KEY", sec1))
            },
            &[],
        );
        let ca = Ca::load_or_create(p.dir.path(), "cluster.local").unwrap();
        let leaf = ca.issue(&web(), Duration::from_secs(3600)).unwrap();
        assert!(verifies(&leaf.chain, &ca.roots()));
    }

    /// PKCS#8 { version, algorithm { ecPublicKey, curve }, OCTET STRING { ECPrivateKey } } to an
    /// `ECPrivateKey` with the curve in `[0] parameters`, as openssl writes it.
    fn pkcs8_to_sec1(pkcs8: &[u8]) -> Vec<u8> {
        let (_, info, _) = der::read_tlv(pkcs8).unwrap();
        let (_, _version, rest) = der::read_tlv(info).unwrap();
        let (_, algorithm, rest) = der::read_tlv(rest).unwrap();
        let (_, _ec_public_key, curve) = der::read_tlv(algorithm).unwrap();
        let (_, inner, _) = der::read_tlv(rest).unwrap();
        let (_, ec_key, _) = der::read_tlv(inner).unwrap();
        let (v, rest) = split_tlv(ec_key);
        let (private, public) = split_tlv(rest);
        let sec1 = [v, private, &der::tlv(0xa0, curve), public].concat();
        let _ = PrivateSec1KeyDer::from(sec1.as_slice());
        der::tlv(0x30, &sec1)
    }

    fn split_tlv(input: &[u8]) -> (&[u8], &[u8]) {
        let (_, _, rest) = der::read_tlv(input).unwrap();
        input.split_at(input.len() - rest.len())
    }

    #[test]
    fn root_file_with_two_roots_trusts_both() {
        let other = Ca::ephemeral("cluster.local").unwrap();
        let p = plug_in(|k| k.serialize_pem(), &other.roots());
        let ca = Ca::load_or_create(p.dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.roots().len(), 2);
        // Leaves from the old root (the other CA) and the new one both verify.
        let from_new = ca.issue(&web(), Duration::from_secs(3600)).unwrap();
        let from_old = other.issue(&web(), Duration::from_secs(3600)).unwrap();
        assert!(verifies(&from_new.chain, &ca.roots()));
        assert!(verifies(&from_old.chain, &ca.roots()));
        assert_eq!(ca.root_store().roots.len(), 2);
    }

    #[test]
    fn plug_in_ca_with_mismatched_key_fails_at_load() {
        let p = plug_in(|_| KeyPair::generate().unwrap().serialize_pem(), &[]);
        let err = Ca::load_or_create(p.dir.path(), "cluster.local").unwrap_err();
        assert!(
            err.to_string().contains("does not belong"),
            "unexpected error: {err}"
        );
    }

    #[test]
    fn half_a_plug_in_ca_fails_at_load() {
        let p = plug_in(|k| k.serialize_pem(), &[]);
        fs::remove_file(p.dir.path().join(CA_KEY_FILE)).unwrap();
        let err = Ca::load_or_create(p.dir.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("both"), "unexpected error: {err}");
        assert!(
            !p.dir.path().join(ROOT_KEY_FILE).exists(),
            "no root generated"
        );
    }

    #[test]
    fn plug_in_ca_whose_root_does_not_match_fails_at_load() {
        let p = plug_in(|k| k.serialize_pem(), &[]);
        let stranger = Ca::ephemeral("cluster.local").unwrap();
        fs::write(
            p.dir.path().join(ROOT_CERT_FILE),
            certs_to_pem(&stranger.roots()),
        )
        .unwrap();
        let err = Ca::load_or_create(p.dir.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("probe"), "unexpected error: {err}");
    }

    #[test]
    fn leaf_has_one_uri_san_p256_both_ekus_and_the_requested_lifetime() {
        let ca = Ca::ephemeral("cluster.local").unwrap();
        let ttl = Duration::from_secs(24 * 3600);
        let leaf = ca.issue(&web(), ttl).unwrap();
        assert_eq!(leaf.identity, web());
        assert_eq!(leaf.chain.len(), 1, "self-signed root: no intermediates");
        assert_eq!(leaf.not_after.duration_since(leaf.not_before).unwrap(), ttl);
        assert!(matches!(leaf.key, PrivateKeyDer::Pkcs8(_)));

        let (_, x) = parse_x509_certificate(&leaf.chain[0]).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "empty subject: the SAN must be critical");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
        );
        assert_eq!(
            x.public_key()
                .algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        assert!(!x.is_ca());
        assert!(
            x.basic_constraints().unwrap().is_some(),
            "explicit CA:FALSE"
        );
        assert_eq!(x.raw_serial_as_string().replace(':', ""), leaf.serial);
        let not_before = x.validity().not_before.timestamp();
        let not_after = x.validity().not_after.timestamp();
        assert_eq!(not_after - not_before, ttl.as_secs() as i64);
        assert_eq!(
            UNIX_EPOCH + Duration::from_secs(not_after as u64),
            leaf.not_after
        );

        let again = ca.issue(&web(), ttl).unwrap();
        assert_ne!(again.serial, leaf.serial, "serials are random");
    }

    #[test]
    fn refuses_what_it_must_not_sign() {
        let ca = Ca::ephemeral("cluster.local").unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let check = |id: Identity, not_before: SystemTime, not_after: SystemTime, want: &str| {
            let err = ca
                .issue_with_validity(&id, not_before, not_after)
                .unwrap_err();
            assert!(err.to_string().contains(want), "{id}: {err}");
        };
        check(
            Identity::new("evil.local", "default", "web"),
            now,
            now + hour,
            "trust domain",
        );
        check(
            Identity::new("cluster.local", "a/ns/b", "web"),
            now,
            now + hour,
            "not a valid spiffe identity",
        );
        check(web(), now, now - hour, "not after");
        let err = ca.issue(&web(), Duration::MAX).unwrap_err();
        assert!(err.to_string().contains("ttl"), "{err}");
    }

    #[test]
    fn der_reader_refuses_truncated_input() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x05, 0x00],
            &[0x30, 0x81],
            &[0x30, 0x80],
        ] {
            assert!(der::read_tlv(bad).is_none(), "{bad:?}");
        }
        let long = der::tlv(0x04, &[7; 300]);
        let (tag, value, rest) = der::read_tlv(&long).unwrap();
        assert_eq!((tag, value.len(), rest.len()), (0x04, 300, 0));
    }
}
