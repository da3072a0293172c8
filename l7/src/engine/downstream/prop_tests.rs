//! Property tests of the downstream checks on request heads a client controls: the one
//! authority and the framing checks.

use std::net::IpAddr;

use http::Request;
use proptest::prelude::*;

use super::*;

/// Authority-shaped text: hosts, IPv6 literals, ports, userinfo, and a little of everything.
fn authority_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "([a-zA-Z0-9.-]{0,12}|\\[[0-9a-f:]{0,10}\\])(:[0-9a-z]{0,6})?",
        "[a-z]{0,4}@[a-z.]{0,6}(:[0-9]{0,5})?",
        "[ -~]{0,24}",
    ]
}

fn head(target: &str, hosts: &[String], extra: &[(String, String)]) -> Option<Parts> {
    let mut b = Request::builder().uri(Uri::try_from(target).ok()?);
    for h in hosts {
        b = b.header(header::HOST, HeaderValue::from_str(h).ok()?);
    }
    for (k, v) in extra {
        b = b.header(
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        );
    }
    Some(b.body(()).ok()?.into_parts().0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any target and `Host` headers: no panic; what is accepted is a valid authority
    /// without userinfo and with a readable port, from the target when it names one, and
    /// in HTTP/2 never one that disagrees with `host`.
    #[test]
    fn one_authority_or_a_refusal(
        scheme in prop_oneof![Just(""), Just("http://"), Just("https://")],
        target_auth in authority_text(),
        hosts in proptest::collection::vec(authority_text(), 0..3),
        h2 in any::<bool>(),
    ) {
        let target = if scheme.is_empty() { "/p".to_string() } else { format!("{scheme}{target_auth}/p") };
        let Some(parts) = head(&target, &hosts, &[]) else { return Ok(()) };
        let Ok(Some(a)) = derive_authority(&parts.uri, &parts.headers, h2) else { return Ok(()) };
        prop_assert!(!a.contains('@'), "{a:?}");
        let parsed = Authority::try_from(a.as_str()).map_err(|e| TestCaseError::fail(format!("{a:?}: {e}")))?;
        prop_assert!(parsed.as_str().len() == parsed.host().len() || parsed.port_u16().is_some(), "{a:?}");
        prop_assert!(hosts.len() < 2, "several hosts accepted");
        match parts.uri.authority() {
            Some(t) => {
                prop_assert_eq!(t.as_str(), a.as_str());
                if h2 {
                    if let Some(h) = hosts.first() {
                        prop_assert!(h.eq_ignore_ascii_case(&a), "{h:?} vs {a:?}");
                    }
                }
            }
            None => prop_assert_eq!(hosts.first(), Some(&a)),
        }
    }

    /// Framing: a method that is a case variant of a standard one, a non-digit or repeated
    /// `content-length`, and `transfer-encoding` other than one `chunked` (any in HTTP/2)
    /// are refused; a plain head with a digit length passes.
    #[test]
    fn framing_refusals(
        method in "(?i)(get|post|put|delete|patch|head|options|trace|connect)|[A-Z]{1,8}",
        lengths in proptest::collection::vec("[0-9]{1,4}|[0-9 +-]{0,4}|0x1", 0..3),
        te in proptest::option::of("chunked|Chunked|gzip|chunked, chunked|identity"),
        h2 in any::<bool>(),
    ) {
        let mut extra: Vec<(String, String)> = lengths.iter().map(|l| ("content-length".to_string(), l.clone())).collect();
        if let Some(te) = &te {
            extra.push(("transfer-encoding".to_string(), te.clone()));
        }
        let Some(mut parts) = head("/p", &[], &extra) else { return Ok(()) };
        let Ok(m) = Method::from_bytes(method.as_bytes()) else { return Ok(()) };
        parts.method = m;
        let result = framing_error(&parts, h2);
        let variant = STANDARD_METHODS.iter().any(|s| s.as_str() != method && s.as_str().eq_ignore_ascii_case(&method));
        let bad_length = lengths.len() > 1
            || lengths.first().is_some_and(|l| l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()));
        let bad_te = te.as_ref().is_some_and(|te| h2 || te != "chunked" || !lengths.is_empty());
        prop_assert_eq!(result.is_err(), variant || bad_length || bad_te, "{:?} {:?} {:?} h2={}: {:?}", method, lengths, te, h2, result);
    }

    /// `remote.ip` is the carried source or one of the `x-forwarded-for` entries, never
    /// anything else, and the source when no proxy is trusted.
    #[test]
    fn remote_ip_is_source_or_an_xff_entry(
        xff in proptest::collection::vec("[0-9.:a-f, ]{0,20}|[0-9]{1,3}(\\.[0-9]{1,3}){3}", 0..3),
        trusted in 0u32..4,
    ) {
        let source = IpAddr::from([10, 9, 8, 7]);
        let mut h = HeaderMap::new();
        for v in &xff {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.append(X_FORWARDED_FOR, v);
            }
        }
        let ip = remote_ip(&h, source, trusted);
        if trusted == 0 {
            prop_assert_eq!(ip, source);
        } else if ip != source {
            let entries: Vec<IpAddr> = xff.iter().flat_map(|v| v.split(',')).filter_map(|e| e.trim().parse().ok()).collect();
            prop_assert!(entries.contains(&ip), "{ip} not in {xff:?}");
        }
    }
}
