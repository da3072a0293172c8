//! The record of a running `cargo xtask up`: its process, and once the mesh exists, the
//! namespace prefix and work directory. `up` claims the file atomically (so two `up`s cannot
//! both run) and removes it when it exits; `down` reads it to find what to tear down after a
//! crash; `clean` reads it to leave a live mesh alone.
//!
//! The file is a few `key=value` lines, e.g.
//!
//! ```text
//! pid=4242
//! start_time=1234567
//! prefix=mt1a2b3c-
//! work_dir=/tmp/e2e-mt1a2b3c-Ab12Cd
//! source=/home/me/ambient/examples/local-mesh
//! ```

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the state lives: `/run` is cleared at boot, exactly like the namespaces it lists.
pub const STATE_DIR: &str = "/run/ambient-local-mesh";
const STATE_FILE: &str = "state";

/// Which `up` process runs which mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub pid: u32,
    /// The process's start time (clock ticks after boot, `/proc/<pid>/stat` field 22), so a
    /// recycled pid is never mistaken for the `up` that wrote the file.
    pub start_time: u64,
    /// The mesh's namespace prefix, once the mesh exists.
    pub prefix: Option<String>,
    /// The mesh's work directory (config, CA, logs), once it exists.
    pub work_dir: Option<PathBuf>,
    /// The YAML directory it was built from (which `waypoint apply` edits by default).
    pub source: Option<PathBuf>,
}

/// What [`StateFile::claim`] found.
#[derive(Debug)]
pub enum Claim {
    /// The file is ours; it is removed when this drops.
    Claimed(StateFile),
    /// Another `up` wrote it (`None`: the file exists but cannot be read as a state).
    Taken(Option<State>),
}

/// The state file of this process.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    state: State,
}

// === impl State ===

impl State {
    /// The state of the calling process, with no mesh yet.
    pub fn of_this_process() -> Result<Self> {
        let pid = std::process::id();
        let start_time =
            start_time(pid).context("read this process's start time from /proc/self/stat")?;
        Ok(State {
            pid,
            start_time,
            prefix: None,
            work_dir: None,
            source: None,
        })
    }

    pub fn render(&self) -> String {
        let mut out = format!("pid={}\nstart_time={}\n", self.pid, self.start_time);
        if let Some(prefix) = &self.prefix {
            out.push_str(&format!("prefix={prefix}\n"));
        }
        if let Some(dir) = &self.work_dir {
            out.push_str(&format!("work_dir={}\n", dir.display()));
        }
        if let Some(dir) = &self.source {
            out.push_str(&format!("source={}\n", dir.display()));
        }
        out
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut pid = None;
        let mut start = None;
        let mut prefix = None;
        let mut work_dir = None;
        let mut source = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, value) = line
                .split_once('=')
                .with_context(|| format!("state line {line:?}: expected key=value"))?;
            match key {
                "pid" => pid = Some(value.parse::<u32>().context("state pid")?),
                "start_time" => start = Some(value.parse::<u64>().context("state start_time")?),
                "prefix" => prefix = Some(value.to_owned()),
                "work_dir" => work_dir = Some(PathBuf::from(value)),
                "source" => source = Some(PathBuf::from(value)),
                // Written by a newer xtask: not needed to tear down.
                _ => {}
            }
        }
        let (Some(pid), Some(start_time)) = (pid, start) else {
            bail!("state without pid and start_time");
        };
        Ok(State {
            pid,
            start_time,
            prefix,
            work_dir,
            source,
        })
    }

    /// Whether the `up` process that wrote this state still runs.
    pub fn is_running(&self) -> bool {
        start_time(self.pid).is_some_and(|t| t == self.start_time)
    }
}

/// Field 22 of `/proc/<pid>/stat`; `None` when the process is gone or a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields are counted
    // from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The state file's path in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// The recorded state, if any. An unreadable file is an error naming it.
pub fn read(dir: &Path) -> Result<Option<State>> {
    let file = path(dir);
    match std::fs::read_to_string(&file) {
        Ok(text) => State::parse(&text)
            .map(Some)
            .with_context(|| format!("parse {}", file.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", file.display())),
    }
}

/// Removes the state file if it still records `state` (a new `up` may have claimed it since
/// it was read).
pub fn remove_if(dir: &Path, state: &State) -> Result<bool> {
    let file = path(dir);
    let current = std::fs::read_to_string(&file)
        .ok()
        .and_then(|text| State::parse(&text).ok());
    let stale_or_same = current
        .as_ref()
        .is_none_or(|c| c.pid == state.pid && c.start_time == state.start_time);
    if !stale_or_same {
        return Ok(false);
    }
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("remove {}", file.display())),
    }
}

/// Writes `text` to `dir/name` through a temporary file: readers see the old content or the
/// new, never half.
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    Ok(tmp)
}

// === impl StateFile ===

impl StateFile {
    /// Records `state` in `dir` unless a state file already exists there.
    pub fn claim(dir: &Path, state: State) -> Result<Claim> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let file = path(dir);
        let tmp = write_atomic(dir, STATE_FILE, &state.render())?;
        // A hard link fails if the name exists, and when it succeeds the file already has its
        // whole content: claiming is one atomic step.
        let linked = std::fs::hard_link(&tmp, &file);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Claim::Claimed(StateFile {
                dir: dir.to_owned(),
                state,
            })),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                Ok(Claim::Taken(read(dir).ok().flatten()))
            }
            Err(e) => Err(e).with_context(|| format!("create {}", file.display())),
        }
    }

    /// Records the mesh this process now runs, and the YAML directory it came from.
    pub fn record_mesh(&mut self, prefix: &str, work_dir: &Path, source: &Path) -> Result<()> {
        self.state.prefix = Some(prefix.to_owned());
        self.state.work_dir = Some(work_dir.to_owned());
        self.state.source = Some(source.to_owned());
        let file = path(&self.dir);
        let tmp = write_atomic(&self.dir, STATE_FILE, &self.state.render())?;
        std::fs::rename(&tmp, &file).with_context(|| format!("rename to {}", file.display()))
    }

    pub fn path(&self) -> PathBuf {
        path(&self.dir)
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        if let Err(e) = remove_if(&self.dir, &self.state) {
            eprintln!("xtask: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Removes the scratch directory however the test ends.
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_state_round_trips_through_its_text() {
        let state = State {
            pid: 42,
            start_time: 7,
            prefix: Some("mt1a2b3c-".into()),
            work_dir: Some("/tmp/e2e-mt1a2b3c-x".into()),
            source: Some("/src/examples/local-mesh".into()),
        };
        assert_eq!(State::parse(&state.render()).expect("parses"), state);
        let bare = State {
            prefix: None,
            work_dir: None,
            ..state
        };
        assert_eq!(State::parse(&bare.render()).expect("parses"), bare);
        assert!(State::parse("pid=1\n").is_err());
        assert!(State::parse("pid=x\nstart_time=1\n").is_err());
        assert!(State::parse("garbage").is_err());
    }

    #[test]
    fn this_process_is_running_and_a_recycled_pid_is_not_it() {
        let me = State::of_this_process().expect("own state");
        assert!(me.is_running());
        let recycled = State {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!recycled.is_running());
    }

    #[test]
    fn only_one_claim_wins_and_the_winner_removes_the_file_on_drop() {
        let dir = scratch_dir("claim");
        let _cleanup = Cleanup(dir.clone());
        let me = State::of_this_process().expect("own state");
        let Claim::Claimed(mut file) = StateFile::claim(&dir, me.clone()).expect("claim") else {
            panic!("an empty directory must be claimable");
        };
        file.record_mesh(
            "mt000001-",
            Path::new("/tmp/e2e-mt000001-x"),
            Path::new("/src/examples/local-mesh"),
        )
        .expect("record");
        match StateFile::claim(&dir, me.clone()).expect("second claim") {
            Claim::Taken(Some(found)) => {
                assert_eq!(found.prefix.as_deref(), Some("mt000001-"));
                assert_eq!(
                    found.source.as_deref(),
                    Some(Path::new("/src/examples/local-mesh")),
                    "`waypoint apply` finds the running mesh's source"
                );
                assert!(found.is_running());
            }
            other => panic!("second claim must find the first: {other:?}"),
        }
        drop(file);
        assert_eq!(read(&dir).expect("read"), None);
    }

    #[test]
    fn remove_if_leaves_a_newer_claim_alone() {
        let dir = scratch_dir("remove-if");
        let _cleanup = Cleanup(dir.clone());
        std::fs::create_dir_all(&dir).expect("mkdir");
        let old = State {
            pid: 1,
            start_time: 1,
            prefix: None,
            work_dir: None,
            source: None,
        };
        let new = State {
            pid: 2,
            ..old.clone()
        };
        std::fs::write(path(&dir), new.render()).expect("write");
        assert!(!remove_if(&dir, &old).expect("remove_if"));
        assert!(remove_if(&dir, &new).expect("remove_if"));
        assert!(!path(&dir).exists());
    }
}
