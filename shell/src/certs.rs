//! A process's certificates, from where its flags say ([`CaArgs`]): the CA service (no key
//! here; the normal case) or a CA directory signing in this process.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_pki::ca::Ca;
use mesh_pki::ca_client::{CaClient, CaClientConfig, DEFAULT_REQUEST_TIMEOUT};
use mesh_pki::certs::CertManager;
use rustls_pki_types::CertificateDer;

use crate::config::CaArgs;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("load the CA from {dir}: {source}")]
    Ca {
        dir: String,
        source: Box<mesh_pki::ca::CaError>,
    },
    #[error("read the CA roots {path}: {reason}")]
    Roots { path: String, reason: String },
    #[error("the CA service: {0}")]
    Client(#[from] Box<mesh_pki::ca_client::CaClientError>),
    #[error("certificates need --ca-address or --ca-dir")]
    Unconfigured,
}

/// The certificate manager `ca` describes. `impersonate`: a node agent, asking for its
/// pods' identities (Istio's `ImpersonatedIdentity`); a waypoint asks for its own.
pub fn open(
    ca: &CaArgs,
    trust_domain: &str,
    ttl: Duration,
    impersonate: bool,
) -> Result<Arc<CertManager>, CertsError> {
    if let Some(dir) = &ca.ca_dir {
        let signer = Ca::load_or_create(dir, trust_domain).map_err(|source| CertsError::Ca {
            dir: dir.display().to_string(),
            source: Box::new(source),
        })?;
        return Ok(CertManager::new(Arc::new(signer), ttl));
    }
    let (Some(address), Some(root_file)) = (&ca.ca_address, &ca.ca_root_file) else {
        return Err(CertsError::Unconfigured);
    };
    let roots = read_roots(root_file)?;
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(CertsError::Roots {
            path: root_file.display().to_string(),
            reason: "no usable certificate".into(),
        });
    }
    let client = CaClient::new(CaClientConfig {
        address: address.clone(),
        server_name: ca.ca_server_name.clone(),
        roots: Arc::new(store),
        token_path: ca.ca_token_file.clone(),
        timeout: DEFAULT_REQUEST_TIMEOUT,
    })
    .map_err(Box::new)?;
    Ok(CertManager::remote(
        client,
        trust_domain,
        ttl,
        impersonate,
        roots,
    ))
}

fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertsError> {
    let bad = |reason: String| CertsError::Roots {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let blocks = pem::parse_many(&text).map_err(|e| bad(e.to_string()))?;
    let roots: Vec<CertificateDer<'static>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if roots.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(roots)
}
