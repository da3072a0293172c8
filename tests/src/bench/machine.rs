//! What machine and which commit a run measured: the report's header.

use std::path::Path;
use std::process::Command;

/// "<cpu model>, <n> CPUs, <mem> GiB RAM, Linux <release>, <os>", from `/proc` and
/// `/etc/os-release`; unknown parts are left out.
pub fn describe() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    describe_from(&cpuinfo, &meminfo, release.trim(), &os, cpus)
}

fn describe_from(cpuinfo: &str, meminfo: &str, release: &str, os: &str, cpus: usize) -> String {
    let mut parts = Vec::new();
    if let Some(model) = field(cpuinfo, "model name") {
        parts.push(model.to_owned());
    }
    if cpus > 0 {
        parts.push(format!("{cpus} CPUs available to the run"));
    }
    if let Some(kib) = field(meminfo, "MemTotal").and_then(|v| {
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse::<f64>().ok())
    }) {
        parts.push(format!("{:.1} GiB RAM", kib / 1024.0 / 1024.0));
    }
    if !release.is_empty() {
        parts.push(format!("Linux {release}"));
    }
    if let Some(name) = os
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"'))
    {
        parts.push(name.to_owned());
    }
    if parts.is_empty() {
        "unknown machine".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The value of the first `key : value` line.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// `git rev-parse --short=12 HEAD`, `-dirty` when the tree has changes, or "unknown".
pub fn commit(repo: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        None => "unknown".to_owned(),
        Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{head}-dirty"),
            _ => head,
        },
    }
}

/// The first line a tool prints for `--version` (or `-v`), e.g. `iperf 3.12`.
pub fn tool_version(program: &str, flag: &str) -> Option<String> {
    let out = Command::new(program).arg(flag).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_is_described_from_proc() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n\
                       processor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        let meminfo = "MemTotal:       24683520 kB\nMemFree:  1 kB\n";
        let os = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            describe_from(cpuinfo, meminfo, "6.1.0", os, 2),
            "AMD EPYC 7B13, 2 CPUs available to the run, 23.5 GiB RAM, Linux 6.1.0, \
             Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(describe_from("", "", "", "", 0), "unknown machine");
    }
}
