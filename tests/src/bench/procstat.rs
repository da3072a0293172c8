//! CPU time, resident memory and open files of a proxy, read from `/proc`.
//!
//! A proxy is a process group (every process the harness starts leads a group of its own), so
//! a multi-process proxy (nginx's master and workers) is counted whole. CPU is `utime + stime`
//! of the live members (all their threads); resident memory is the sum of their `VmRSS`, which
//! counts pages shared between nginx's master and workers more than once (noted in the report).

use std::path::Path;

use anyhow::{Context, Result};

/// A snapshot of one process group.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU seconds used so far by the live members.
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    /// Open file descriptors (sockets included).
    pub fds: usize,
    pub processes: usize,
}

/// The fields of `/proc/<pid>/stat` we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    pgrp: i64,
    /// Clock ticks.
    utime: u64,
    stime: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
    Some(Stat {
        pgrp: fields.get(2)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    crate::sys::parse_vm_rss_kib(status).map(|kib| kib * 1024)
}

/// Clock ticks per second for `/proc/<pid>/stat` times.
fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        // Linux has reported 100 to user space for decades.
        _ => 100.0,
    }
}

/// The current usage of process group `pgid`. Members come and go while we scan; one that
/// vanished is simply not counted.
pub fn group_usage(pgid: u32) -> Result<Usage> {
    let ticks = ticks_per_second();
    let entries = std::fs::read_dir("/proc").context("read /proc")?;
    let mut usage = Usage::default();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = Path::new("/proc").join(pid.to_string());
        let Some(stat) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        else {
            continue;
        };
        if stat.pgrp != i64::from(pgid) {
            continue;
        }
        usage.processes += 1;
        usage.cpu_seconds += (stat.utime + stat.stime) as f64 / ticks;
        usage.rss_bytes += std::fs::read_to_string(dir.join("status"))
            .ok()
            .and_then(|s| parse_vm_rss(&s))
            .unwrap_or(0);
        usage.fds += std::fs::read_dir(dir.join("fd"))
            .map(|d| d.count())
            .unwrap_or(0);
    }
    if usage.processes == 0 {
        anyhow::bail!("process group {pgid} has no live process");
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_end_of_the_command_name() {
        let line = "4242 (zt (worker) 1) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 123456789 2048 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                pgrp: 4242,
                utime: 250,
                stime: 75
            })
        );
        assert_eq!(parse_stat("4242 (short) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn resident_memory_comes_from_vm_rss() {
        let status = "Name:\tztunnel\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthread\n"), None);
    }

    #[test]
    fn our_own_group_is_visible() {
        // The test runner leads no group of its own, but its group has at least itself.
        let pgid = nix::unistd::getpgrp().as_raw().unsigned_abs();
        let usage = group_usage(pgid).expect("own group");
        assert!(usage.processes >= 1);
        assert!(usage.rss_bytes > 0);
        assert!(usage.fds > 0);
    }
}
