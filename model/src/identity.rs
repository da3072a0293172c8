//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsed once at the edge (certificate SAN, YAML), then passed around as a typed value.

use std::fmt;
use std::str::FromStr;

/// A workload identity as Istio defines it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("spiffe id {0:?}: missing spiffe:// scheme")]
    Scheme(String),
    #[error("spiffe id {0:?}: expected spiffe://<td>/ns/<ns>/sa/<sa>")]
    Shape(String),
    #[error("spiffe id {0:?}: invalid character")]
    Character(String),
}

pub const SPIFFE_SCHEME: &str = "spiffe://";

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The form used in AuthorizationPolicy `principals`: no `spiffe://` prefix.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// The full SPIFFE URI, as carried in a certificate's URI SAN.
    pub fn uri(&self) -> String {
        format!("{SPIFFE_SCHEME}{}", self.principal())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                if ![td, ns, sa].iter().all(|p| valid_segment(p)) {
                    return Err(IdentityError::Character(s.to_string()));
                }
                Ok(Identity::new(*td, *ns, *sa))
            }
            _ => Err(IdentityError::Shape(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/web");
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in [
            "cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/def\0ault/sa/web",
            "spiffe://cluster.local/xx/default/sa/web",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
