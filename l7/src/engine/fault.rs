//! Phase 5, fault: a VirtualService `fault` delay (flag `DI` on the response), then maybe an
//! abort (`FI`, body `fault filter abort`; a gRPC status as HTTP 200 + `grpc-status`),
//! decided by [`mesh_model::resilience::fault`].

use std::time::Duration;

use http::StatusCode;
use mesh_model::model::{AbortStatus, Fault};
use mesh_model::resilience;

use super::reply::Shape;
use super::LocalReply;
use crate::telemetry::ResponseFlag;

/// The body of a fault-injected abort (Envoy's).
pub const FAULT_ABORT_BODY: &str = "fault filter abort";

/// The phase: sleeps the injected delay, if any; `Ok(true)` when it did, `Err` for an
/// injected abort.
pub async fn run(fault: Option<&Fault>) -> Result<bool, LocalReply> {
    let Some(f) = fault else {
        return Ok(false);
    };
    let (delay, abort) = decide(
        f,
        rand::random::<f64>() * 100.0,
        rand::random::<f64>() * 100.0,
    );
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    match abort {
        Some(reply) => Err(reply),
        None => Ok(delay.is_some()),
    }
}

/// The delay and the abort reply `f` gives a request with these rolls (0..100).
fn decide(f: &Fault, delay_roll: f64, abort_roll: f64) -> (Option<Duration>, Option<LocalReply>) {
    let decision = resilience::fault(f, delay_roll, abort_roll);
    (decision.delay, decision.abort.map(abort_reply))
}

/// A fault abort: the HTTP status (gRPC-shaped for a gRPC client, as any local reply), or
/// for a gRPC status HTTP 200 with `grpc-status`.
fn abort_reply(abort: AbortStatus) -> LocalReply {
    let reason = "fault injected: abort";
    match abort {
        AbortStatus::Http(code) => LocalReply::new(
            StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            FAULT_ABORT_BODY,
            Some(ResponseFlag::FaultInjected),
            reason,
        ),
        AbortStatus::Grpc(code) => LocalReply {
            shape: Shape::Grpc(code),
            ..LocalReply::new(
                StatusCode::OK,
                FAULT_ABORT_BODY,
                Some(ResponseFlag::FaultInjected),
                reason,
            )
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{body_of, model, request_context};
    use crate::telemetry::HttpMetrics;

    const FAULTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: app}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /grpc}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: web}}]
  - fault:
      delay: {fixedDelay: 2s, percentage: {value: 50}}
      abort: {httpStatus: 418, percentage: {value: 10}}
    route: [{destination: {host: web}}]
"#;

    fn faults() -> Vec<Fault> {
        let m = model(&[FAULTS]);
        let vs = m.virtual_services.first().expect("one VirtualService");
        vs.rules
            .iter()
            .map(|r| r.fault.clone().expect("a fault"))
            .collect()
    }

    #[test]
    fn delays_and_aborts_follow_their_percentages() {
        let f = faults();
        let http = &f[1];
        let (delay, abort) = decide(http, 49.0, 9.0);
        assert_eq!(delay, Some(Duration::from_secs(2)));
        let abort = abort.expect("aborted");
        assert_eq!(abort.status, 418);
        assert_eq!(abort.flag, Some(ResponseFlag::FaultInjected));
        assert_eq!(abort.body, FAULT_ABORT_BODY.as_bytes());
        let (delay, abort) = decide(http, 51.0, 11.0);
        assert_eq!((delay, abort), (None, None));
    }

    #[tokio::test]
    async fn fault_aborts_answer_the_http_or_grpc_status() {
        let (_registry, metrics) = HttpMetrics::new();
        let rsp = abort_reply(AbortStatus::Http(418)).render(request_context(false), &metrics);
        assert_eq!(rsp.status(), 418);
        assert_eq!(body_of(rsp).await, FAULT_ABORT_BODY);

        let (_, grpc) = decide(&faults()[0], 100.0, 0.0);
        let rsp = grpc
            .expect("aborted")
            .render(request_context(false), &metrics);
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()["content-type"], "application/grpc");
        assert_eq!(rsp.headers()["grpc-message"], FAULT_ABORT_BODY);
    }

    #[tokio::test]
    async fn the_phase_reports_a_delay_and_returns_an_abort() {
        use mesh_model::model::{FaultAbort, FaultDelay};
        assert_eq!(run(None).await, Ok(false));
        let delay = Fault {
            delay: Some(FaultDelay {
                fixed_delay: Duration::from_millis(1),
                percent: 100.0,
            }),
            abort: None,
        };
        assert_eq!(run(Some(&delay)).await, Ok(true));
        let abort = Fault {
            delay: None,
            abort: Some(FaultAbort {
                status: AbortStatus::Http(503),
                percent: 100.0,
            }),
        };
        let reply = run(Some(&abort)).await.expect_err("aborted");
        assert_eq!(reply.status, 503);
    }
}
