//! Property tests of path normalisation (RELIABILITY 21): whatever a client sends, the one
//! normalised path is canonical, and policy and routing see the same thing.

use proptest::prelude::*;

use super::*;
use crate::policy::l7::path_matches;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(1024)
}

/// Path segments of unreserved and a few other characters (no `/`, `\`, `%`, `?`, `#`).
fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._~!$&'(),;=:@é-]{1,8}".prop_filter("not a dot segment", |s| s != "." && s != "..")
}

/// One character of a canonical segment written the way an attacker might: itself, or (when
/// unreserved) percent-encoded in either case.
fn obfuscate_char(c: char, how: u8) -> String {
    let unreserved = c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~');
    match how % 3 {
        1 if unreserved => format!("%{:02X}", c as u8),
        2 if unreserved => format!("%{:02x}", c as u8),
        _ => c.to_string(),
    }
}

/// `segments` written with every trick normalisation undoes: encoded unreserved characters,
/// `\` for `/`, repeated slashes, `.` segments and `x/..` detours.
fn obfuscate(segments: &[String], tricks: &[u8]) -> String {
    let mut t = tricks.iter().copied().cycle();
    let mut out = String::new();
    for seg in segments {
        match t.next().unwrap_or(0) % 6 {
            0 => out.push('/'),
            1 => out.push('\\'),
            2 => out.push_str("//"),
            3 => out.push_str("/./"),
            4 => out.push_str("/detour/../"),
            _ => out.push_str("/%2e/"),
        }
        for c in seg.chars() {
            out.push_str(&obfuscate_char(c, t.next().unwrap_or(0)));
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

proptest! {
    #![proptest_config(config())]

    /// Any target: no panic; what comes out is canonical and normalising it again changes
    /// nothing.
    #[test]
    fn normalize_is_canonical_and_idempotent(raw in "[/\\\\.a%2eEfF0?#]{0,24}|\\PC{0,40}") {
        let Ok(n) = normalize_path(&raw) else { return Ok(()) };
        let p = &n.path;
        prop_assert!(p.starts_with('/'), "{p:?}");
        prop_assert!(!p.contains("//"), "{p:?}");
        prop_assert!(!p.contains('\\'), "{p:?}");
        prop_assert!(!p.contains('?') && !p.contains('#'), "{p:?}");
        let lower = p.to_ascii_lowercase();
        prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%00"), "{p:?}");
        prop_assert!(p.split('/').all(|s| s != "." && s != ".."), "{p:?}");
        let again = normalize_path(p).map_err(|e| TestCaseError::fail(format!("{p:?}: {e}")))?;
        prop_assert_eq!(&again.path, p);
        prop_assert_eq!(again.query, None);
        // The query is passed on untouched.
        let before_fragment = raw.split('#').next().unwrap_or_default();
        prop_assert_eq!(n.query.as_deref(), before_fragment.split_once('?').map(|(_, q)| q));
    }

    /// An obfuscated spelling of a path normalises to that path, so an `/admin` policy and an
    /// `/admin` route both see it, and agree.
    #[test]
    fn policy_and_route_agree_on_obfuscated_paths(
        segments in proptest::collection::vec(segment(), 0..5),
        tricks in proptest::collection::vec(any::<u8>(), 1..32),
        protected in 0usize..3,
    ) {
        let canonical = format!("/{}", segments.join("/"));
        let raw = obfuscate(&segments, &tricks);
        let n = normalize_path(&raw).map_err(|e| TestCaseError::fail(format!("{raw:?}: {e}")))?;
        prop_assert_eq!(&n.path, &canonical, "{:?}", raw);
        // A protected prefix of the canonical path: what a policy and a route would name.
        let prefix = format!("/{}", segments[..protected.min(segments.len())].join("/"));
        let policy = path_matches(&prefix, &n.path)
            || path_matches(&format!("{}/*", prefix.trim_end_matches('/')), &n.path);
        prop_assert_eq!(prefix_matches(&prefix, &n.path), policy, "prefix {:?} path {:?}", prefix, n.path);
        prop_assert!(policy);
        prop_assert_eq!(path_matches(&canonical, &n.path), n.path == canonical);
    }

    /// Lenient decoding (query parameters) never panics and is the identity on text
    /// without `%`.
    #[test]
    fn percent_decode_never_panics(s in "\\PC{0,40}|[%0-9a-fA-F]{0,12}") {
        let d = percent_decode(&s);
        if !s.contains('%') {
            prop_assert_eq!(d, s);
        }
    }

    /// Any authority: no panic, and the host part is a prefix of the input.
    #[test]
    fn host_without_port_is_a_prefix(a in "\\PC{0,40}|\\[[0-9a-f:]{0,10}\\](:[0-9]{0,6})?") {
        prop_assert!(a.starts_with(host_without_port(&a)));
    }
}
