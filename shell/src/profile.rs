//! `GET /debug/pprof/profile?seconds=N` on the admin listener: a CPU profile of the whole
//! process, in the pprof protobuf format (`go tool pprof`, `pprof -http`, speedscope).
//!
//! - Sampling is pprof-rs's (`SIGPROF` at [`FREQUENCY_HZ`] per CPU-second, stacks unwound
//!   in the handler), started for the request and stopped after it: nothing runs and nothing
//!   is counted while no profile is being taken.
//! - `seconds` defaults to [`DEFAULT_SECONDS`], at most [`MAX_SECONDS`]; anything else is
//!   `400`. One profile at a time (the sampler is process-wide): a request while one is
//!   being taken is `409 Conflict`.
//! - The profile is encoded here ([`encode`]) with the workspace's `prost`, rather than by
//!   pprof-rs's own codecs: those bring a second prost and a build-time code generator,
//!   and its flamegraph output is under CDDL-1.0, which `deny.toml` does not allow.
//!
//! Each sample is one stack of one thread: values `samples/count` and `cpu/nanoseconds`,
//! a `thread` label, locations leaf first (inlined functions as extra lines, innermost
//! first), as the format's `profile.proto` defines them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use prost::Message;

use crate::admin::{reply, Body};

/// Where the endpoint is served (admin listener only).
pub const PATH: &str = "/debug/pprof/profile";
/// Samples per second of CPU time; not a divisor of common timer rates, so that periodic
/// work is not sampled in lockstep.
pub const FREQUENCY_HZ: i32 = 99;
pub const DEFAULT_SECONDS: u64 = 10;
pub const MAX_SECONDS: u64 = 60;
/// `Content-Type` of the profile (as Go's `net/http/pprof`).
pub const CONTENT_TYPE: &str = "application/octet-stream";

/// Libraries whose frames are not unwound from the signal handler (pprof-rs's advice:
/// unwinding through them can deadlock or crash).
const BLOCKLIST: [&str; 4] = ["libc", "libgcc", "pthread", "vdso"];

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("start the cpu profiler: {0}")]
    Start(pprof::Error),
    #[error("build the cpu profile report: {0}")]
    Report(pprof::Error),
    #[error("cpu profile task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The one profile being taken; dropping it lets the next one start.
#[derive(Debug)]
pub struct Busy(());

static PROFILING: AtomicBool = AtomicBool::new(false);

impl Busy {
    /// Whether a profile is being taken now.
    pub fn in_progress() -> bool {
        PROFILING.load(Ordering::Acquire)
    }

    /// `None` while another profile is being taken.
    pub fn try_take() -> Option<Busy> {
        PROFILING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Busy(()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::Release);
    }
}

/// `seconds` from the query: the default when absent, `Err` when not 1..=[`MAX_SECONDS`].
pub fn parse_seconds(query: Option<&str>) -> Result<Duration, String> {
    let value = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("seconds="));
    let Some(value) = value else {
        return Ok(Duration::from_secs(DEFAULT_SECONDS));
    };
    match value.parse::<u64>() {
        Ok(n) if (1..=MAX_SECONDS).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "seconds must be a whole number from 1 to {MAX_SECONDS}, not {value:?}"
        )),
    }
}

/// Answers `GET /debug/pprof/profile?<query>`: samples for the requested time (on a blocking
/// thread: the sampler's guard and report are not `Send`), then the encoded profile.
pub async fn serve(query: Option<String>) -> http::Response<Body> {
    let duration = match parse_seconds(query.as_deref()) {
        Ok(d) => d,
        Err(e) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    };
    let Some(busy) = Busy::try_take() else {
        return reply(
            StatusCode::CONFLICT,
            "text/plain",
            "a cpu profile is already being taken; retry when it is done\n",
        );
    };
    tracing::info!(seconds = duration.as_secs(), "cpu profile started");
    let taken = tokio::task::spawn_blocking(move || {
        let _busy = busy;
        take(duration)
    })
    .await
    .map_err(ProfileError::from)
    .and_then(|r| r);
    match taken {
        Ok(profile) => {
            tracing::info!(bytes = profile.len(), "cpu profile done");
            let mut rsp = reply(StatusCode::OK, CONTENT_TYPE, profile);
            rsp.headers_mut().insert(
                http::header::CONTENT_DISPOSITION,
                http::HeaderValue::from_static("attachment; filename=\"profile.pb\""),
            );
            rsp
        }
        Err(e) => {
            tracing::warn!(error = %e, "cpu profile failed");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            )
        }
    }
}

/// Samples the process for `duration` (blocking the calling thread) and encodes the result.
fn take(duration: Duration) -> Result<Vec<u8>, ProfileError> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY_HZ)
        .blocklist(&BLOCKLIST)
        .build()
        .map_err(ProfileError::Start)?;
    std::thread::sleep(duration);
    let report = guard.report().build().map_err(ProfileError::Report)?;
    drop(guard);
    let stacks: Vec<Stack> = report
        .data
        .iter()
        .map(|(frames, &count)| Stack {
            thread: frames.thread_name_or_id(),
            frames: frames
                .frames
                .iter()
                .map(|symbols| {
                    symbols
                        .iter()
                        .map(|s| Frame {
                            function: s.name(),
                            file: s.filename().into_owned(),
                            line: i64::from(s.lineno()),
                        })
                        .collect()
                })
                .collect(),
            count: i64::try_from(count).unwrap_or(0),
        })
        .collect();
    let timing = Timing {
        frequency_hz: report.timing.frequency,
        start: report.timing.start_time,
        duration: report.timing.duration,
    };
    Ok(encode(&stacks, &timing).encode_to_vec())
}

// === the profile, as sampled ===

/// One sampled stack of one thread and how many times it was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    pub thread: String,
    /// Leaf first; each frame is its symbols, innermost inlined function first.
    pub frames: Vec<Vec<Frame>>,
    pub count: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: i64,
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub frequency_hz: i32,
    pub start: SystemTime,
    pub duration: Duration,
}

// === the pprof format (profile.proto, package perftools.profiles) ===

/// The messages of `profile.proto` this endpoint writes, with the format's field numbers.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        /// Index 0 is always "".
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        /// Index into the string table.
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        /// One per `sample_type`.
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        /// Non-zero.
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// Inlined functions first, the caller they were inlined into last.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        /// Non-zero.
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

/// The pprof profile of `stacks`: functions, locations and strings each written once.
pub fn encode(stacks: &[Stack], timing: &Timing) -> proto::Profile {
    let mut b = Builder::default();
    b.string(""); // index 0, as the format requires
    let period = 1_000_000_000 / i64::from(timing.frequency_hz.max(1));
    let sample_type = vec![
        b.value_type("samples", "count"),
        b.value_type("cpu", "nanoseconds"),
    ];
    let period_type = Some(b.value_type("cpu", "nanoseconds"));
    let thread_key = b.string("thread");
    let mut samples = Vec::with_capacity(stacks.len());
    for stack in stacks {
        let location_id = stack.frames.iter().map(|f| b.location(f)).collect();
        samples.push(proto::Sample {
            location_id,
            value: vec![stack.count, stack.count.saturating_mul(period)],
            label: vec![proto::Label {
                key: thread_key,
                str: b.string(&stack.thread),
            }],
        });
    }
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    proto::Profile {
        sample_type,
        sample: samples,
        location: b.locations,
        function: b.functions,
        string_table: b.strings,
        time_nanos: timing
            .start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(nanos)
            .unwrap_or(0),
        duration_nanos: nanos(timing.duration),
        period_type,
        period,
    }
}

#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_index: HashMap<String, i64>,
    functions: Vec<proto::Function>,
    function_index: HashMap<(i64, i64), u64>,
    locations: Vec<proto::Location>,
    location_index: HashMap<Vec<(u64, i64)>, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.string_index.get(s) {
            return i;
        }
        let i = i64::try_from(self.strings.len()).unwrap_or(i64::MAX);
        self.strings.push(s.to_owned());
        self.string_index.insert(s.to_owned(), i);
        i
    }

    fn value_type(&mut self, ty: &str, unit: &str) -> proto::ValueType {
        proto::ValueType {
            r#type: self.string(ty),
            unit: self.string(unit),
        }
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (self.string(name), self.string(file));
        if let Some(&id) = self.function_index.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        self.functions.push(proto::Function {
            id,
            name: key.0,
            system_name: key.0,
            filename: key.1,
        });
        self.function_index.insert(key, id);
        id
    }

    /// One location per distinct frame (the same functions at the same lines).
    fn location(&mut self, frame: &[Frame]) -> u64 {
        let lines: Vec<(u64, i64)> = frame
            .iter()
            .map(|f| (self.function(&f.function, &f.file), f.line))
            .collect();
        if let Some(&id) = self.location_index.get(&lines) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        self.locations.push(proto::Location {
            id,
            line: lines
                .iter()
                .map(|&(function_id, line)| proto::Line { function_id, line })
                .collect(),
        });
        self.location_index.insert(lines, id);
        id
    }
}

/// What a pprof reader checks of a profile: the string table starts with "", every index
/// and id resolves, values match the sample types. `Err` names the first problem.
pub fn check_well_formed(p: &proto::Profile) -> Result<(), String> {
    let string = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| p.string_table.get(i))
            .ok_or_else(|| format!("string index {i} out of range"))
    };
    if p.string_table.first().map(String::as_str) != Some("") {
        return Err("string_table[0] must be \"\"".into());
    }
    for vt in p.sample_type.iter().chain(&p.period_type) {
        string(vt.r#type)?;
        string(vt.unit)?;
    }
    let functions: HashMap<u64, &proto::Function> = p.function.iter().map(|f| (f.id, f)).collect();
    for f in &p.function {
        if f.id == 0 {
            return Err("function id 0".into());
        }
        string(f.name)?;
        string(f.system_name)?;
        string(f.filename)?;
    }
    let locations: HashMap<u64, &proto::Location> = p.location.iter().map(|l| (l.id, l)).collect();
    for l in &p.location {
        if l.id == 0 {
            return Err("location id 0".into());
        }
        if let Some(line) = l
            .line
            .iter()
            .find(|x| !functions.contains_key(&x.function_id))
        {
            return Err(format!(
                "location {} names no function {}",
                l.id, line.function_id
            ));
        }
    }
    for s in &p.sample {
        if s.value.len() != p.sample_type.len() {
            return Err(format!("a sample has {} values", s.value.len()));
        }
        if let Some(id) = s.location_id.iter().find(|id| !locations.contains_key(id)) {
            return Err(format!("a sample names no location {id}"));
        }
        for label in &s.label {
            string(label.key)?;
            string(label.str)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, line: i64) -> Vec<Frame> {
        vec![Frame {
            function: function.into(),
            file: "src/lib.rs".into(),
            line,
        }]
    }

    #[test]
    fn seconds_default_and_bounds() {
        let check = |q: Option<&str>, want: Result<u64, ()>| {
            let got = parse_seconds(q).map(|d| d.as_secs()).map_err(|_| ());
            assert_eq!(got, want, "query {q:?}");
        };
        check(None, Ok(DEFAULT_SECONDS));
        check(Some("debug=1"), Ok(DEFAULT_SECONDS));
        check(Some("seconds=1"), Ok(1));
        check(Some("x=y&seconds=60"), Ok(60));
        check(Some("seconds=0"), Err(()));
        check(Some("seconds=61"), Err(()));
        check(Some("seconds=1.5"), Err(()));
        check(Some("seconds="), Err(()));
    }

    #[test]
    fn stacks_encode_to_a_well_formed_profile_sharing_functions_and_locations() {
        let inlined = vec![
            Frame {
                function: "inner".into(),
                file: "src/a.rs".into(),
                line: 3,
            },
            Frame {
                function: "outer".into(),
                file: "src/a.rs".into(),
                line: 9,
            },
        ];
        let stacks = vec![
            Stack {
                thread: "tokio-runtime-worker".into(),
                frames: vec![frame("leaf", 10), inlined.clone(), frame("main", 1)],
                count: 5,
            },
            Stack {
                thread: "main".into(),
                frames: vec![frame("leaf", 11), inlined, frame("main", 1)],
                count: 2,
            },
        ];
        let timing = Timing {
            frequency_hz: 100,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(1),
        };
        let bytes = encode(&stacks, &timing).encode_to_vec();
        let p = proto::Profile::decode(bytes.as_slice()).expect("decodes");
        check_well_formed(&p).expect("well formed");

        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(p.period, 10_000_000);
        assert_eq!(p.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(p.duration_nanos, 1_000_000_000);
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|v| (s(v.r#type), s(v.unit)))
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        assert_eq!(p.sample[0].value, [5, 50_000_000]);
        assert_eq!(s(p.sample[1].label[0].str), "main");
        // leaf@10, leaf@11, inner+outer, main: four locations; leaf, inner, outer, main:
        // four functions.
        assert_eq!(p.location.len(), 4);
        assert_eq!(p.function.len(), 4);
        assert_eq!(p.sample[0].location_id[1..], p.sample[1].location_id[1..]);
        let names = |loc: u64| -> Vec<&str> {
            p.location[loc as usize - 1]
                .line
                .iter()
                .map(|l| s(p.function[l.function_id as usize - 1].name))
                .collect()
        };
        assert_eq!(names(p.sample[0].location_id[0]), ["leaf"]);
        assert_eq!(names(p.sample[0].location_id[1]), ["inner", "outer"]);
    }

    #[test]
    fn malformed_profiles_are_named() {
        let ok = encode(
            &[Stack {
                thread: "t".into(),
                frames: vec![frame("f", 1)],
                count: 1,
            }],
            &Timing {
                frequency_hz: FREQUENCY_HZ,
                start: SystemTime::now(),
                duration: Duration::from_secs(1),
            },
        );
        check_well_formed(&ok).expect("well formed");
        let mut bad = ok.clone();
        bad.string_table[0] = "x".into();
        assert!(check_well_formed(&bad).is_err());
        let mut bad = ok.clone();
        bad.sample[0].location_id.push(99);
        assert!(check_well_formed(&bad).is_err());
        let mut bad = ok;
        bad.location[0].line[0].function_id = 42;
        assert!(check_well_formed(&bad).is_err());
    }
}
