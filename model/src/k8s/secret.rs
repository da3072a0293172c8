//! Core `v1` `Secret` → a [`TlsSecret`], or the reason it is none.
//!
//! Only Secrets of type `kubernetes.io/tls` become TLS secrets, and only when `tls.crt`
//! holds a PEM `CERTIFICATE` and `tls.key` a PEM private key (`PRIVATE KEY`, `RSA PRIVATE
//! KEY` or `EC PRIVATE KEY`; an encrypted key cannot be used). A Secret that is not one is
//! never refused (Secrets of other types are common and none of the mesh's business): it is
//! kept out, with the reason, for status to report ([`crate::model::Model::secret_problem`]).
//! What Kubernetes itself would refuse is refused here too: `data` that is not a mapping of
//! base64 strings (`stringData` wins over `data` for a key, as the API server merges them).
//! The PEM is checked as PEM only (labels, matching ends, base64 bodies): the gateway that
//! loads it parses the certificates and key.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::yaml::{FieldResult, Node};
use super::Meta;
use crate::model::{TlsSecret, TLS_SECRET_TYPE};

/// The keys of a `kubernetes.io/tls` Secret.
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";

/// `Ok(Ok(secret))` for a usable TLS Secret, `Ok(Err(reason))` for any other Secret, `Err`
/// for a document Kubernetes would refuse.
pub(super) fn secret(obj: &Node<'_>, meta: Meta) -> FieldResult<Result<TlsSecret, String>> {
    let kind = obj.opt_str("type")?.unwrap_or("Opaque");
    if kind != TLS_SECRET_TYPE {
        return Ok(Err(format!("type {kind:?} is not {TLS_SECRET_TYPE}")));
    }
    let cert = match value(obj, CERT_KEY)? {
        Ok(v) => v,
        Err(problem) => return Ok(Err(problem)),
    };
    let key = match value(obj, KEY_KEY)? {
        Ok(v) => v,
        Err(problem) => return Ok(Err(problem)),
    };
    let blocks = pem_blocks(&cert);
    if !blocks
        .iter()
        .any(|b| b.label == "CERTIFICATE" && !b.headers)
    {
        return Ok(Err(format!("{CERT_KEY}: no PEM CERTIFICATE block")));
    }
    let blocks = pem_blocks(&key);
    let keys: Vec<&PemBlock<'_>> = blocks
        .iter()
        .filter(|b| b.label.ends_with("PRIVATE KEY"))
        .collect();
    if keys.is_empty() {
        return Ok(Err(format!("{KEY_KEY}: no PEM PRIVATE KEY block")));
    }
    let usable = |b: &&PemBlock<'_>| {
        !b.headers
            && matches!(
                b.label,
                "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY"
            )
    };
    if !keys.iter().any(usable) {
        return Ok(Err(format!(
            "{KEY_KEY}: encrypted private keys are not supported"
        )));
    }
    Ok(Ok(TlsSecret {
        namespace: meta.namespace,
        name: meta.name,
        cert_chain_pem: cert,
        key_pem: key,
    }))
}

/// The text of `key`: from `stringData`, else decoded from `data`; `Ok(Err)` when it is
/// missing, empty or not text.
fn value(obj: &Node<'_>, key: &str) -> FieldResult<Result<String, String>> {
    if let Some(string_data) = obj.get("stringData")? {
        if let Some(v) = string_data.get(key)? {
            let s = v.str()?;
            if !s.is_empty() {
                return Ok(Ok(s.to_string()));
            }
        }
    }
    let Some(data) = obj.get("data")? else {
        return Ok(Err(format!("{key}: missing")));
    };
    let Some(v) = data.get(key)? else {
        return Ok(Err(format!("{key}: missing")));
    };
    let encoded = v.str()?;
    // Kubernetes reads `data` as standard base64; line breaks are tolerated by `kubectl`
    // output folding, so whitespace is dropped first.
    let compact: String = encoded.split_whitespace().collect();
    let bytes = STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| v.err(format!("invalid base64: {e}")))?;
    if bytes.is_empty() {
        return Ok(Err(format!("{key}: missing")));
    }
    Ok(String::from_utf8(bytes).map_err(|_| format!("{key}: not PEM (not text)")))
}

/// One PEM block: its label, and whether it carries RFC 1421 headers (`Proc-Type`: an
/// encrypted legacy key).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PemBlock<'a> {
    pub label: &'a str,
    pub headers: bool,
}

/// The well-formed PEM blocks of `text`, in order: `-----BEGIN L-----`, a base64 body of at
/// least one byte, `-----END L-----`. Anything else (text around blocks, a block without
/// its end or with a body that does not decode) is skipped.
pub(super) fn pem_blocks(text: &str) -> Vec<PemBlock<'_>> {
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        let mut body = String::new();
        let mut headers = false;
        let mut closed = false;
        for line in lines.by_ref() {
            if let Some(end) = line
                .strip_prefix("-----END ")
                .and_then(|l| l.strip_suffix("-----"))
            {
                closed = end == label;
                break;
            }
            if line.contains(':') {
                headers = true;
            } else {
                body.push_str(line);
            }
        }
        let decodes = matches!(STANDARD.decode(body.as_bytes()), Ok(der) if !der.is_empty());
        if closed && decodes {
            out.push(PemBlock { label, headers });
        }
    }
    out
}
