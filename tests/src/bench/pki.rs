//! Certificates for the haproxy baseline: a throwaway CA and two ECDSA P-256 leaves (the
//! same key type the mesh uses), written as PEM files haproxy reads.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::baselines::TUNNEL_SERVER_NAME;

/// Paths of the files [`write_tunnel_pki`] wrote.
#[derive(Clone, Debug)]
pub struct TunnelFiles {
    pub ca: PathBuf,
    /// Client certificate + key.
    pub client: PathBuf,
    /// Server certificate + key.
    pub server: PathBuf,
}

/// Generates the CA and the two leaves into `dir`: the server leaf names
/// [`TUNNEL_SERVER_NAME`] and `server_ip`; the client leaf is for client authentication.
pub fn write_tunnel_pki(dir: &Path, server_ip: Ipv4Addr) -> Result<TunnelFiles> {
    let ca_key = KeyPair::generate().context("generate the baseline CA key")?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mesh-bench baseline CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-sign the baseline CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose| -> Result<String> {
        let key = KeyPair::generate().with_context(|| format!("generate the {cn} key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("sign the {cn} certificate"))?;
        Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
    };
    let server = leaf(
        TUNNEL_SERVER_NAME,
        vec![
            SanType::DnsName(
                TUNNEL_SERVER_NAME
                    .try_into()
                    .context("tunnel server name")?,
            ),
            SanType::IpAddress(IpAddr::V4(server_ip)),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = leaf(
        "tunnel-client.bench.internal",
        vec![SanType::DnsName(
            "tunnel-client.bench.internal"
                .try_into()
                .context("tunnel client name")?,
        )],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let files = TunnelFiles {
        ca: dir.join("tunnel-ca.pem"),
        client: dir.join("tunnel-client.pem"),
        server: dir.join("tunnel-server.pem"),
    };
    for (path, content) in [
        (&files.ca, ca_cert.pem()),
        (&files.client, client),
        (&files.server, server),
    ] {
        std::fs::write(path, content).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_pki_is_a_ca_and_two_leaves_with_their_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_tunnel_pki(dir.path(), Ipv4Addr::new(10, 255, 0, 2)).expect("pki");
        let read = |p: &Path| std::fs::read_to_string(p).expect("pem");
        let ca = read(&files.ca);
        assert_eq!(ca.matches("BEGIN CERTIFICATE").count(), 1);
        assert!(!ca.contains("PRIVATE KEY"), "the CA key stays in memory");
        for leaf in [read(&files.client), read(&files.server)] {
            assert_eq!(leaf.matches("BEGIN CERTIFICATE").count(), 1);
            assert_eq!(leaf.matches("BEGIN PRIVATE KEY").count(), 1);
        }
    }
}
