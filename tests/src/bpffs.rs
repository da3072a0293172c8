//! A bpffs instance per mesh: what `/sys/fs/bpf` is on a node. The eBPF backend pins each
//! pod's capture there so that it outlives an agent restart. Each ztunnel runs under
//! `ip netns exec`, which gives it a private mount namespace with a fresh `/sys`, so a bpffs
//! the agent mounted itself would vanish with it: the harness mounts one in the mesh's work
//! directory before any agent starts (new mount namespaces copy it) and unmounts it when the
//! mesh is dropped, which also releases whatever is still pinned.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sys::tool;

/// A mounted bpffs; dropping it unmounts it (lazily: a dying agent may still hold it).
#[derive(Debug)]
pub(crate) struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    pub(crate) fn mount(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        let out = Command::new(tool("mount", "mount")?)
            .args(["-t", "bpf", "bpf"])
            .arg(path)
            .output()
            .context("run mount -t bpf")?;
        if !out.status.success() {
            bail!(
                "mount bpffs at {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Bpffs {
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.path) {
            eprintln!("e2e: {e:#}");
        }
    }
}

fn unmount(path: &Path) -> Result<()> {
    let out = Command::new(tool("umount", "mount")?)
        .arg("-l")
        .arg(path)
        .output()
        .context("run umount")?;
    if !out.status.success() {
        bail!(
            "unmount bpffs {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// bpffs mount points in this mount namespace whose path has a component starting with
/// `e2e-<prefix>` (the work directory of the mesh with that prefix).
pub(crate) fn mounts_of(prefix: &str) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let head = format!("e2e-{prefix}");
    info.lines()
        .filter_map(|line| {
            // `<id> <parent> <dev> <root> <mount point> <options> ... - <fstype> ...`
            let (fields, tail) = line.split_once(" - ")?;
            let mount_point = fields.split(' ').nth(4)?;
            let fstype = tail.split(' ').next()?;
            let ours = Path::new(mount_point)
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with(&head));
            (fstype == "bpf" && ours).then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Unmounts what a killed run of the mesh with `prefix` left mounted.
pub(crate) fn unmount_stale(prefix: &str) -> Result<Vec<PathBuf>> {
    let stale = mounts_of(prefix);
    for path in &stale {
        unmount(path)?;
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_is_found_by_its_mesh_prefix_only_while_mounted() {
        let dir = tempfile::Builder::new()
            .prefix("e2e-mt0bpf01-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().join("bpffs");
        let fs = Bpffs::mount(&path).expect("mount a bpffs (needs root, as every e2e test)");
        assert_eq!(mounts_of("mt0bpf01-"), vec![path.clone()]);
        assert!(mounts_of("mt0bpf02-").is_empty());
        drop(fs);
        assert!(mounts_of("mt0bpf01-").is_empty());
    }
}
