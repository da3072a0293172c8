//! HTTP/1.1 protocol upgrades (`Connection: upgrade` + `Upgrade: websocket`, or any other
//! protocol) passed through the waypoint, as Envoy's `upgrade_configs` do for Istio.
//!
//! The request goes through every phase like any other (authentication, authorization,
//! routing, endpoint choice), only with its `Upgrade` and `Connection: upgrade` kept and over an
//! HTTP/1.1 upstream connection (an upgrade cannot be carried by HTTP/2 without RFC 8441). When
//! the upstream answers `101 Switching Protocols`, the waypoint answers `101` too and from then
//! on splices the two upgraded byte streams until either side closes; any other answer is
//! passed on as a normal response and nothing is spliced. The upstream connection is never
//! pooled again after an upgrade (hyper hands it over).

use http::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::Instrument;

/// The `Upgrade` value when `headers` ask for a protocol switch: HTTP/1.1 only, `Upgrade`
/// present and `Connection` naming `upgrade`.
pub fn requested(headers: &HeaderMap, downstream_h2: bool) -> Option<HeaderValue> {
    if downstream_h2 {
        return None;
    }
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let upgrade = headers.get(header::UPGRADE)?;
    (connection_upgrade && !upgrade.is_empty()).then(|| upgrade.clone())
}

/// Puts back the two hop-by-hop headers an upgrade needs (after they were stripped).
pub fn restore(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// Splices the downstream and upstream connections once both have been handed over, until
/// either side closes. Runs in its own task.
pub fn splice(downstream: OnUpgrade, upstream: OnUpgrade, what: String) {
    let span = tracing::debug_span!("upgraded", %what);
    tokio::spawn(
        async move {
            let (down, up) = match tokio::try_join!(downstream, upstream) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade was not completed");
                    return;
                }
            };
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((to_up, to_down)) => {
                    tracing::debug!(to_up, to_down, "upgraded connection closed")
                }
                Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
            }
        }
        .instrument(span),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::headers;

    #[test]
    fn only_an_http1_request_naming_upgrade_in_connection_asks_for_one() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert_eq!(
            requested(&headers(&ws), false),
            Some(HeaderValue::from_static("websocket"))
        );
        // HTTP/2 has no Upgrade (RFC 9113 §8.6).
        assert_eq!(requested(&headers(&ws), true), None);
        // `Upgrade` without `Connection: upgrade` is only an advertisement.
        assert_eq!(
            requested(&headers(&[("upgrade", "websocket")]), false),
            None
        );
        assert_eq!(
            requested(&headers(&[("connection", "upgrade")]), false),
            None
        );
        assert_eq!(
            requested(
                &headers(&[("connection", "upgrade"), ("upgrade", "")]),
                false
            ),
            None
        );
    }

    #[test]
    fn restoring_sets_both_headers_once() {
        let mut h = headers(&[("x-a", "1")]);
        restore(&mut h, HeaderValue::from_static("websocket"));
        restore(&mut h, HeaderValue::from_static("websocket"));
        assert_eq!(h.get_all(header::UPGRADE).iter().count(), 1);
        assert_eq!(
            h.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }
}
