//! Retries, faults and mirrors as decisions: pure functions over the route's policy and the
//! outcome of an attempt, randomness passed in as rolls, so each decision is table-tested
//! (the waypoint only does the IO).
//!
//! - [`should_retry`]: whether an attempt's outcome is retriable under a `retryOn` list
//!   (Envoy's semantics: `5xx` = any 5xx, a reset, a connect failure or a per-try timeout;
//!   `gateway-error` = 502/503/504 or the same failures; `reset` = no response, including a
//!   per-try timeout; `connect-failure`; `retriable-4xx` = 409; `refused-stream`; listed
//!   status codes; gRPC statuses from the response's `grpc-status` header).
//! - [`may_replay`]: whether the request may be sent again after that outcome. Unlike
//!   Envoy, which replays any buffered request, a request with a method that is not
//!   idempotent (POST, PATCH, CONNECT or unknown) is sent again only when the upstream cannot
//!   have acted on it (no connection, a refused stream) or when the response's gRPC status
//!   is one the route's `retryOn` names (every gRPC call is a POST; naming its status is the
//!   route's statement that the call is safe to repeat). A 503 to a POST reaches the client.
//! - [`backoff`]: Envoy's exponential backoff with full jitter, 25 ms base, capped at 250 ms.
//! - [`fault`]: whether a request is delayed and/or aborted (VirtualService `fault`).
//! - [`selected`]: whether a percentage-based action (mirror, fault) applies to a roll.
//! - [`shadow_authority`]: the `Host`/`:authority` of a mirrored request (`-shadow`
//!   appended to the host, before any port, as Envoy does).

use std::time::Duration;

use crate::model::{AbortStatus, Fault, RetryOn};

/// Base interval of the retry backoff.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Largest retry backoff.
pub const BACKOFF_CAP: Duration = Duration::from_millis(250);

/// What one attempt at one endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// No connection to the endpoint (nothing sent).
    ConnectFailure,
    /// The upstream refused the HTTP/2 stream (nothing processed).
    RefusedStream,
    /// The connection or stream broke before response headers.
    Reset,
    /// The per-try timeout expired before response headers.
    Timeout,
    /// Response headers arrived.
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
}

impl AttemptOutcome {
    /// A short name for logs and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            AttemptOutcome::ConnectFailure => "connect-failure",
            AttemptOutcome::RefusedStream => "refused-stream",
            AttemptOutcome::Reset => "reset",
            AttemptOutcome::Timeout => "per-try-timeout",
            AttemptOutcome::Response { .. } => "response",
        }
    }

    /// Whether this is a success from the endpoint's point of view (a response below 500).
    pub fn is_success(&self) -> bool {
        matches!(self, AttemptOutcome::Response { status, .. } if *status < 500)
    }
}

/// Whether `outcome` may be retried under `on` (see the module docs).
pub fn should_retry(on: &RetryOn, outcome: &AttemptOutcome) -> bool {
    let failure_class = on.five_xx || on.gateway_error;
    match *outcome {
        AttemptOutcome::ConnectFailure => on.connect_failure || failure_class,
        AttemptOutcome::RefusedStream => on.refused_stream || failure_class || on.reset,
        AttemptOutcome::Reset | AttemptOutcome::Timeout => failure_class || on.reset,
        AttemptOutcome::Response {
            status,
            grpc_status,
        } => {
            (on.five_xx && (500..600).contains(&status))
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_4xx && status == 409)
                || on.status_codes.contains(&status)
                || grpc_status.is_some_and(|g| on.grpc_statuses.contains(&g))
        }
    }
}

/// Whether a request with `method` may be sent again after `outcome` (see the module docs);
/// [`should_retry`] decides whether it is worth it.
pub fn may_replay(method: &http::Method, outcome: &AttemptOutcome, on: &RetryOn) -> bool {
    use http::Method;
    let idempotent = [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method);
    idempotent
        || match *outcome {
            AttemptOutcome::ConnectFailure | AttemptOutcome::RefusedStream => true,
            AttemptOutcome::Reset | AttemptOutcome::Timeout => false,
            AttemptOutcome::Response { grpc_status, .. } => {
                grpc_status.is_some_and(|g| on.grpc_statuses.contains(&g))
            }
        }
}

/// The wait before retry number `retry` (1 = the first retry): uniformly in
/// `[0, min(base * (2^retry - 1), cap))`, `roll` in `[0, 1)`.
pub fn backoff(retry: u32, roll: f64) -> Duration {
    let factor = (1u64 << retry.clamp(1, 16)) - 1;
    let ceiling = BACKOFF_BASE.saturating_mul(factor as u32).min(BACKOFF_CAP);
    ceiling.mul_f64(roll.clamp(0.0, 1.0))
}

/// Whether an action applied to `percent` (0-100) of requests takes this one; `roll` in
/// `[0, 100)`.
pub fn selected(percent: f64, roll: f64) -> bool {
    roll < percent
}

/// What [`fault`] decided for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultDecision {
    pub delay: Option<Duration>,
    pub abort: Option<AbortStatus>,
}

/// The fault for one request: the delay and the abort are decided independently, with
/// their own rolls in `[0, 100)`.
pub fn fault(f: &Fault, delay_roll: f64, abort_roll: f64) -> FaultDecision {
    FaultDecision {
        delay: f
            .delay
            .as_ref()
            .filter(|d| selected(d.percent, delay_roll))
            .map(|d| d.fixed_delay),
        abort: f
            .abort
            .as_ref()
            .filter(|a| selected(a.percent, abort_roll))
            .map(|a| a.status),
    }
}

/// `host-shadow[:port]` for `host[:port]` (IPv6 literals keep their brackets).
pub fn shadow_authority(authority: &str) -> String {
    let host = crate::route::host_without_port(authority);
    let port = &authority[host.len()..];
    format!("{host}-shadow{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_requests_are_replayed_after_the_upstream_may_have_acted() {
        use http::Method;
        let on = on("5xx,reset,unavailable");
        let r503 = AttemptOutcome::Response {
            status: 503,
            grpc_status: None,
        };
        let grpc_unavailable = AttemptOutcome::Response {
            status: 200,
            grpc_status: Some(14),
        };
        let grpc_internal = AttemptOutcome::Response {
            status: 200,
            grpc_status: Some(13),
        };
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            for o in [r503, AttemptOutcome::Reset, AttemptOutcome::Timeout] {
                assert!(may_replay(&m, &o, &on), "{m} after {o:?}");
            }
        }
        let custom = Method::from_bytes(b"PURGE").expect("a token");
        for m in [Method::POST, Method::PATCH, custom] {
            for o in [
                AttemptOutcome::ConnectFailure,
                AttemptOutcome::RefusedStream,
            ] {
                assert!(may_replay(&m, &o, &on), "{m}: nothing reached the upstream");
            }
            for o in [
                r503,
                AttemptOutcome::Reset,
                AttemptOutcome::Timeout,
                grpc_internal,
            ] {
                assert!(
                    !may_replay(&m, &o, &on),
                    "{m} after {o:?} may have been acted on"
                );
            }
            assert!(
                may_replay(&m, &grpc_unavailable, &on),
                "{m}: a named gRPC status"
            );
        }
    }
    use crate::model::{FaultAbort, FaultDelay, RetryPolicy};

    fn on(list: &str) -> RetryOn {
        let mut o = RetryOn::default();
        for item in list.split(',').filter(|s| !s.is_empty()) {
            match item {
                "5xx" => o.five_xx = true,
                "gateway-error" => o.gateway_error = true,
                "reset" => o.reset = true,
                "connect-failure" => o.connect_failure = true,
                "retriable-4xx" => o.retriable_4xx = true,
                "refused-stream" => o.refused_stream = true,
                "unavailable" => o.grpc_statuses.push(14),
                code => o.status_codes.push(code.parse().expect("code")),
            }
        }
        o
    }

    fn rsp(status: u16) -> AttemptOutcome {
        AttemptOutcome::Response {
            status,
            grpc_status: None,
        }
    }

    #[test]
    fn retry_on_conditions_follow_envoy() {
        use AttemptOutcome::*;
        let grpc14 = Response {
            status: 200,
            grpc_status: Some(14),
        };
        // (retryOn, outcome, retried)
        let table: &[(&str, AttemptOutcome, bool)] = &[
            ("5xx", rsp(500), true),
            ("5xx", rsp(503), true),
            ("5xx", rsp(404), false),
            ("5xx", ConnectFailure, true),
            ("5xx", Reset, true),
            ("5xx", Timeout, true),
            ("gateway-error", rsp(500), false),
            ("gateway-error", rsp(502), true),
            ("gateway-error", rsp(504), true),
            ("gateway-error", Timeout, true),
            ("reset", Reset, true),
            ("reset", Timeout, true),
            ("reset", rsp(503), false),
            ("reset", ConnectFailure, false),
            ("connect-failure", ConnectFailure, true),
            ("connect-failure", Reset, false),
            ("connect-failure", Timeout, false),
            ("retriable-4xx", rsp(409), true),
            ("retriable-4xx", rsp(429), false),
            ("refused-stream", RefusedStream, true),
            ("refused-stream", Reset, false),
            ("429,503", rsp(429), true),
            ("429,503", rsp(503), true),
            ("429,503", rsp(500), false),
            ("unavailable", grpc14, true),
            ("unavailable", rsp(200), false),
            ("", rsp(503), false),
            ("", ConnectFailure, false),
        ];
        for (list, outcome, want) in table {
            assert_eq!(
                should_retry(&on(list), outcome),
                *want,
                "{list:?} {outcome:?}"
            );
        }
    }

    #[test]
    fn the_default_policy_retries_503_and_connect_failures_but_not_timeouts() {
        let d = RetryPolicy::default();
        assert_eq!(d.attempts, 2);
        assert!(should_retry(&d.retry_on, &rsp(503)));
        assert!(should_retry(&d.retry_on, &AttemptOutcome::ConnectFailure));
        assert!(should_retry(&d.retry_on, &AttemptOutcome::RefusedStream));
        assert!(!should_retry(&d.retry_on, &rsp(500)));
        assert!(!should_retry(&d.retry_on, &AttemptOutcome::Timeout));
        assert!(!should_retry(&d.retry_on, &AttemptOutcome::Reset));
        let cancelled = AttemptOutcome::Response {
            status: 200,
            grpc_status: Some(1),
        };
        assert!(should_retry(&d.retry_on, &cancelled));
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_up_to_the_cap() {
        let ms = |d: Duration| d.as_millis();
        // (retry, roll, expected ms)
        for (retry, roll, want) in [
            (1, 0.0, 0),
            (1, 0.999, 24),
            (1, 0.5, 12),
            (2, 0.999, 74),
            (3, 0.999, 174),
            (4, 0.999, 249),
            (30, 0.999, 249),
            (2, 0.5, 37),
        ] {
            assert_eq!(ms(backoff(retry, roll)), want, "retry {retry} roll {roll}");
        }
    }

    #[test]
    fn faults_apply_to_their_percentage_independently() {
        let f = Fault {
            delay: Some(FaultDelay {
                fixed_delay: Duration::from_millis(300),
                percent: 50.0,
            }),
            abort: Some(FaultAbort {
                status: AbortStatus::Http(503),
                percent: 10.0,
            }),
        };
        let d = Some(Duration::from_millis(300));
        let a = Some(AbortStatus::Http(503));
        for (dr, ar, want) in [
            (0.0, 0.0, (d, a)),
            (49.9, 9.9, (d, a)),
            (50.0, 9.9, (None, a)),
            (10.0, 10.0, (d, None)),
            (99.9, 99.9, (None, None)),
        ] {
            let got = fault(&f, dr, ar);
            assert_eq!((got.delay, got.abort), want, "rolls {dr} {ar}");
        }
        let none = Fault::default();
        assert_eq!(fault(&none, 0.0, 0.0), FaultDecision::default());
        assert!(!selected(0.0, 0.0));
        assert!(selected(100.0, 99.999));
    }

    #[test]
    fn mirrored_requests_go_to_the_shadow_host() {
        for (authority, want) in [
            ("echo", "echo-shadow"),
            ("echo:8080", "echo-shadow:8080"),
            (
                "echo.default.svc.cluster.local",
                "echo.default.svc.cluster.local-shadow",
            ),
            ("10.0.0.1:80", "10.0.0.1-shadow:80"),
            ("[::1]:80", "[::1]-shadow:80"),
        ] {
            assert_eq!(shadow_authority(authority), want);
        }
    }
}
