//! What the external load tools print, read into numbers: `iperf3 -J`, `wrk --latency` and
//! `h2load`.
//! Pure parsers, unit-tested on the tools' real output formats.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::stats::Percentiles;

/// One iperf3 run, as the receiver counted it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IperfRun {
    /// Payload bytes received by the server.
    pub bytes: f64,
    pub bits_per_second: f64,
}

/// Reads `iperf3 -J` output; a run that reports an error (e.g. connection refused) is one.
pub fn parse_iperf3(json: &str) -> Result<IperfRun> {
    let doc: Value = serde_json::from_str(json).context("parse iperf3 -J output")?;
    if let Some(error) = doc.get("error").and_then(Value::as_str) {
        bail!("iperf3: {error}");
    }
    let received = &doc["end"]["sum_received"];
    let bytes = received["bytes"]
        .as_f64()
        .context("iperf3 -J: no end.sum_received.bytes")?;
    let bits_per_second = received["bits_per_second"]
        .as_f64()
        .context("iperf3 -J: no end.sum_received.bits_per_second")?;
    Ok(IperfRun {
        bytes,
        bits_per_second,
    })
}

/// One wrk run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WrkRun {
    pub requests: f64,
    pub requests_per_second: f64,
    /// From `--latency` (microseconds).
    pub latency: Percentiles,
    /// Socket errors plus non-2xx responses: a run with errors measured something else.
    pub errors: u64,
}

/// Reads the text `wrk --latency` prints.
pub fn parse_wrk(text: &str) -> Result<WrkRun> {
    let mut requests = None;
    let mut rps = None;
    let (mut p50, mut p90, mut p99) = (None, None, None);
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => rps = value.parse::<f64>().ok(),
            [count, "requests", "in", ..] => requests = count.parse::<f64>().ok(),
            ["50%", value] => p50 = Some(parse_wrk_duration_us(value)?),
            ["90%", value] => p90 = Some(parse_wrk_duration_us(value)?),
            ["99%", value] => p99 = Some(parse_wrk_duration_us(value)?),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(1),
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    let (Some(requests), Some(requests_per_second)) = (requests, rps) else {
        bail!("wrk output has no request count or rate: {}", text.trim());
    };
    let (Some(p50), Some(p90), Some(p99)) = (p50, p90, p99) else {
        bail!("wrk output has no latency distribution (run it with --latency)");
    };
    Ok(WrkRun {
        requests,
        requests_per_second,
        latency: Percentiles { p50, p90, p99 },
        errors,
    })
}

/// wrk's durations: `62.00us`, `1.07ms`, `2.00s`, `1.50m`.
fn parse_wrk_duration_us(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("wrk duration {text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("wrk duration {text:?}"))?;
    let factor = match unit {
        "ns" => 0.001,
        "us" => 1.0,
        "ms" => 1_000.0,
        "s" => 1_000_000.0,
        "m" => 60_000_000.0,
        "h" => 3_600_000_000.0,
        _ => bail!("wrk duration {text:?}: unknown unit {unit:?}"),
    };
    Ok(value * factor)
}

/// One h2load run that completed every request it finished with a 2xx.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct H2loadRun {
    /// Requests done (in a timed run, those still in flight at the end are not counted).
    pub done: u64,
    pub requests_per_second: f64,
}

/// Reads the text `h2load` prints. It exits 0 even when every request failed, so a run is
/// refused unless it spoke `h2c`, finished requests, and every one of them succeeded with a
/// 2xx (a run with failures measured something else).
pub fn parse_h2load(text: &str) -> Result<H2loadRun> {
    let mut protocol = None;
    let mut rps = None;
    let mut counts: Option<Vec<(String, u64)>> = None;
    let mut non_2xx = 0u64;
    for line in text.lines().map(str::trim) {
        if let Some(p) = line.strip_prefix("Application protocol:") {
            protocol = Some(p.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 2.00s, 250342.50 req/s, 16.47MB/s"
            rps = rest
                .split(", ")
                .find_map(|part| part.strip_suffix(" req/s"))
                .and_then(|v| v.parse::<f64>().ok());
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // "requests: 500 total, 500 started, 500 done, 500 succeeded, 0 failed, ..."
            counts = Some(count_pairs(rest));
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            // "status codes: 500 2xx, 0 3xx, 0 4xx, 0 5xx"
            non_2xx = count_pairs(rest)
                .iter()
                .filter(|(what, _)| what != "2xx")
                .map(|(_, n)| n)
                .sum();
        }
    }
    let (Some(rps), Some(counts)) = (rps, counts) else {
        bail!(
            "h2load output has no request rate or counts: {}",
            text.trim()
        );
    };
    let count = |what: &str| {
        counts
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, n)| *n)
            .with_context(|| format!("h2load output has no {what:?} request count"))
    };
    if protocol.as_deref() != Some("h2c") {
        bail!(
            "h2load did not speak h2c (application protocol {:?})",
            protocol.unwrap_or_default()
        );
    }
    let (done, succeeded) = (count("done")?, count("succeeded")?);
    let (failed, errored, timeout) = (count("failed")?, count("errored")?, count("timeout")?);
    if failed + errored + timeout > 0 || non_2xx > 0 || succeeded < done {
        bail!(
            "h2load: {failed} failed, {errored} errored, {timeout} timed out, {non_2xx} non-2xx \
             of {done} done"
        );
    }
    if done == 0 {
        bail!("h2load finished no request");
    }
    Ok(H2loadRun {
        done,
        requests_per_second: rps,
    })
}

/// `500 total, 0 failed` → [("total", 500), ("failed", 0)]; pairs that do not parse are left out.
fn count_pairs(text: &str) -> Vec<(String, u64)> {
    text.split(',')
        .filter_map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next()?.parse::<u64>().ok()?;
            Some((words.next()?.to_owned(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUTPUT: &str = "Running 1s test @ http://10.244.2.2:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    62.24us   18.12us   1.07ms   96.47%
    Req/Sec    15.44k   439.39    16.04k    72.73%
  Latency Distribution
     50%   59.00us
     75%   62.00us
     90%   68.00us
     99%    1.13ms
  16859 requests in 1.10s, 2.64MB read
Requests/sec:  15326.43
Transfer/sec:      2.40MB
";

    #[test]
    fn a_wrk_run_yields_rate_count_and_percentiles() {
        let run = parse_wrk(WRK_OUTPUT).expect("valid output");
        assert_eq!(run.requests, 16859.0);
        assert_eq!(run.requests_per_second, 15326.43);
        assert_eq!(run.latency.p50, 59.0);
        assert_eq!(run.latency.p90, 68.0);
        assert_eq!(run.latency.p99, 1130.0);
        assert_eq!(run.errors, 0);
    }

    #[test]
    fn wrk_errors_are_counted_and_garbage_is_refused() {
        let with_errors = WRK_OUTPUT.replace(
            "Requests/sec",
            "  Socket errors: connect 2, read 1, write 0, timeout 3\n  \
             Non-2xx or 3xx responses: 4\nRequests/sec",
        );
        assert_eq!(parse_wrk(&with_errors).expect("valid").errors, 10);
        assert!(parse_wrk("unable to connect to 10.244.2.2:8080").is_err());
        let no_latency = WRK_OUTPUT.replace("99%", "98%");
        assert!(parse_wrk(&no_latency).is_err());
    }

    #[test]
    fn wrk_durations_convert_to_microseconds() {
        for (text, us) in [
            ("59.00us", 59.0),
            ("1.50ms", 1500.0),
            ("2.00s", 2_000_000.0),
            ("1.00m", 60_000_000.0),
        ] {
            assert_eq!(parse_wrk_duration_us(text).expect(text), us, "{text}");
        }
        assert!(parse_wrk_duration_us("12").is_err());
        assert!(parse_wrk_duration_us("12parsecs").is_err());
    }

    #[test]
    fn iperf3_json_yields_received_bytes_and_rate() {
        let json = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"bytes":1250000000,"bits_per_second":10000000000.0},
            "sum_received":{"bytes":1240000000,"bits_per_second":9920000000.0}}}"#;
        let run = parse_iperf3(json).expect("valid");
        assert_eq!(run.bytes, 1_240_000_000.0);
        assert_eq!(run.bits_per_second, 9_920_000_000.0);
        let failed =
            r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#;
        let err = parse_iperf3(failed).expect_err("error run");
        assert!(format!("{err}").contains("Connection refused"));
        assert!(parse_iperf3("not json").is_err());
    }

    const H2LOAD_OUTPUT: &str = "starting benchmark...
spawning thread #0: 1 total client(s). Timing-based test with 0.2s of warm-up time and 1s of main duration for measurements.
Warm-up started for thread #0.
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 1.20s, 210054.00 req/s, 13.82MB/s
requests: 210054 total, 210154 started, 210054 done, 210054 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 210054 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 13.82MB (14494170) total, 9.62MB (10082688) headers (space savings 51.02%), 615.39KB (630162) data
                     min         max         mean         sd        +/- sd
time for request:       31us      6.97ms       348us       203us    93.93%
";

    #[test]
    fn an_h2load_run_yields_its_rate() {
        let run = parse_h2load(H2LOAD_OUTPUT).expect("valid output");
        assert_eq!(run.requests_per_second, 210_054.0);
        assert_eq!(run.done, 210_054);
    }

    #[test]
    fn an_h2load_run_with_failures_is_an_error_not_a_number() {
        // What h2load prints (exit status 0) when the server does not speak HTTP/2.
        let refused = H2LOAD_OUTPUT
            .replace("210054.00 req/s", "0.00 req/s")
            .replace(
                "210054 total, 210154 started, 210054 done, 210054 succeeded, 0 failed, 0 errored",
                "5000 total, 100 started, 0 done, 0 succeeded, 5000 failed, 5000 errored",
            );
        let err = parse_h2load(&refused).expect_err("failed run");
        assert!(format!("{err}").contains("5000 failed"), "{err}");
        let not_2xx = H2LOAD_OUTPUT.replace("0 5xx", "7 5xx");
        let err = parse_h2load(&not_2xx).expect_err("5xx");
        assert!(format!("{err}").contains("7 non-2xx"), "{err}");
        let upgraded = H2LOAD_OUTPUT.replace("protocol: h2c", "protocol: http/1.1");
        assert!(parse_h2load(&upgraded).is_err());
        assert!(parse_h2load("connect to 10.96.0.50:8082 failed").is_err());
    }
}
