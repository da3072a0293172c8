//! Where the model comes from, and the loops that install each good model.
//!
//! A directory is loaded once at startup (a bad one leaves the process not ready), then
//! polled: a valid change replaces the model, an invalid one is rejected with its error
//! logged and counted, and the last good model stays. The API server source
//! (`mesh_kube::watch`) publishes only complete, accepted models; each is installed as a
//! directory reload is.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_model::model::Model;
use mesh_telemetry::Metrics;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigSource;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--config-source dir needs --config-dir")]
    NoDir,
    #[error("set up the kubernetes api client: {0}")]
    Kube(#[from] mesh_kube::KubeError),
}

/// A config source, set up and ready to run. Set up before anything listens, so a missing
/// directory or API server configuration fails startup instead of leaving a process that is
/// never ready.
pub enum Source {
    Dir(PathBuf),
    Kube(mesh_kube::Client),
}

/// The model in force, whether a good one came in, and who hears of each change.
#[derive(Clone)]
pub struct Installed {
    pub model: Arc<ArcSwap<Model>>,
    /// Set once the source had a good model (stored before the flag is set).
    pub loaded: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    changed: Arc<watch::Sender<()>>,
    check: Arc<dyn Fn(&Model) + Send + Sync>,
}

// === impl Source ===

impl Source {
    pub async fn open(kind: ConfigSource, dir: Option<&Path>) -> Result<Self, SourceError> {
        Ok(match kind {
            ConfigSource::Dir => Source::Dir(dir.ok_or(SourceError::NoDir)?.to_path_buf()),
            ConfigSource::Kube => Source::Kube(mesh_kube::client().await?),
        })
    }

    /// For logs: the directory, or the API server.
    pub fn describe(&self) -> String {
        match self {
            Source::Dir(dir) => dir.display().to_string(),
            Source::Kube(_) => "kubernetes api server".to_string(),
        }
    }

    /// The model to start with: a directory's, if valid (counted either way); the API
    /// server's first model comes from [`Source::run`] once every kind was listed.
    pub fn initial(&self, metrics: &Metrics) -> Option<Model> {
        let Source::Dir(dir) = self else {
            return None;
        };
        match mesh_model::k8s::load_dir(dir) {
            Ok(m) => {
                metrics.config_loaded();
                Some(m)
            }
            Err(e) => {
                metrics.config_rejected("local");
                tracing::error!(error = %e, dir = %dir.display(), "config rejected; not ready until a valid config arrives");
                None
            }
        }
    }

    /// Spawns the source's tasks: the directory poll, or the API server watch (with `kube`,
    /// whose `metrics` the shell fills in) and the loop installing its models.
    pub fn run(
        self,
        poll: Duration,
        installed: Installed,
        kube: mesh_kube::Options,
        stop: CancellationToken,
    ) {
        use tracing::info_span;
        match self {
            Source::Dir(dir) => {
                crate::process::spawn(info_span!("config"), watch_dir(dir, poll, installed, stop));
            }
            Source::Kube(client) => {
                let (models_tx, models) = watch::channel(Arc::new(Model::default()));
                let opts = mesh_kube::Options {
                    metrics: Some(installed.metrics.clone()),
                    ..kube
                };
                crate::process::spawn(
                    info_span!("kube"),
                    mesh_kube::watch(client, models_tx, opts, stop.clone()),
                );
                crate::process::spawn(info_span!("config"), follow(models, installed, stop));
            }
        }
    }
}

// === impl Installed ===

impl Installed {
    /// Starts with `initial` (loaded when `Some`). `check` sees every model before it is
    /// installed (to warn about what it lacks); `changed` hears of every installation.
    pub fn new(
        initial: Option<Model>,
        metrics: Arc<Metrics>,
        check: impl Fn(&Model) + Send + Sync + 'static,
    ) -> (Self, watch::Receiver<()>) {
        if let Some(m) = &initial {
            check(m);
        }
        let loaded = initial.is_some();
        let (changed, rx) = watch::channel(());
        let installed = Installed {
            model: Arc::new(ArcSwap::from_pointee(initial.unwrap_or_default())),
            loaded: Arc::new(AtomicBool::new(loaded)),
            metrics,
            changed: Arc::new(changed),
            check: Arc::new(check),
        };
        (installed, rx)
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// Installs `next`; returns whether it was the first good model.
    fn install(&self, next: Arc<Model>) -> bool {
        (self.check)(&next);
        for c in &next.service_entry_conflicts {
            tracing::warn!(
                entry = %c.entry,
                kept = %c.kept,
                address = %c.address,
                port = c.port,
                "ServiceEntry addresses overlap: the first in namespace/name order keeps them"
            );
        }
        self.model.store(next);
        let first = !self.loaded.swap(true, Ordering::SeqCst);
        let _ = self.changed.send(());
        first
    }
}

/// Contents are compared (read and hashed) at least this often, whatever the file stamps say.
const FULL_CHECK_EVERY: u32 = 20;

/// Polls the config directory (see the module docs). Each tick `stat`s the files; only when
/// a stamp changed (or every [`FULL_CHECK_EVERY`] ticks) are they read and hashed, and only
/// when the contents changed is the model rebuilt. Reading, hashing and building run on the
/// blocking pool: at 50,000 pods the files are ~20 MiB and a build takes about a second,
/// which on a runtime thread would stall the connections it serves.
async fn watch_dir(dir: PathBuf, poll: Duration, installed: Installed, stop: CancellationToken) {
    let stamp = |dir: &Path| mesh_model::k8s::dir_stamp(dir).ok();
    let mut last_stamp = stamp(&dir);
    let mut last = blocking(&dir, |d| mesh_model::k8s::dir_fingerprint(d).ok())
        .await
        .flatten();
    let mut tick = tokio::time::interval(poll);
    for ticks in 1u32.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&dir);
        let full_check = ticks % FULL_CHECK_EVERY == 0;
        if now.is_some() && now == last_stamp && installed.is_loaded() && !full_check {
            continue;
        }
        last_stamp = now;
        let fp = match blocking(&dir, mesh_model::k8s::dir_fingerprint).await {
            Some(Ok(fp)) => Some(fp),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "reading config dir failed; keeping the last good config");
                continue;
            }
            None => continue,
        };
        if fp == last && installed.is_loaded() {
            continue;
        }
        last = fp;
        match blocking(&dir, mesh_model::k8s::load_dir).await {
            Some(Ok(m)) => {
                installed.install(Arc::new(m));
                installed.metrics.config_loaded();
                tracing::info!("config reloaded");
            }
            Some(Err(e)) => {
                installed.metrics.config_rejected("local");
                tracing::error!(error = %e, "config rejected; keeping the last good config");
            }
            None => {}
        }
    }
}

/// `f(dir)` on the blocking pool; `None` if it panicked (logged).
async fn blocking<T: Send + 'static>(
    dir: &Path,
    f: impl FnOnce(&Path) -> T + Send + 'static,
) -> Option<T> {
    let dir = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || f(&dir)).await {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "config dir task failed; keeping the last good config");
            None
        }
    }
}

/// Installs every model the API server watch publishes.
async fn follow(
    mut models: watch::Receiver<Arc<Model>>,
    installed: Installed,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = models.changed() => {
                if changed.is_err() {
                    // The watch only ends on shutdown; the last model stays in force.
                    return;
                }
            }
        }
        let next = models.borrow_and_update().clone();
        if installed.install(next) {
            tracing::info!("first model from the api server installed");
        } else {
            tracing::debug!("model from the api server installed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";

    #[tokio::test]
    async fn a_bad_directory_is_not_loaded_until_it_is_fixed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), "kind: [").expect("write");
        let metrics = Metrics::new();
        let source = Source::open(ConfigSource::Dir, Some(dir.path()))
            .await
            .expect("a directory needs no setup");
        let (installed, mut changed) = Installed::new(source.initial(&metrics), metrics, |_| {});
        assert!(!installed.is_loaded());
        let stop = CancellationToken::new();
        source.run(
            Duration::from_millis(10),
            installed.clone(),
            mesh_kube::Options::default(),
            stop.clone(),
        );
        std::fs::write(dir.path().join("a.yaml"), NAMESPACE).expect("write");
        changed.changed().await.expect("installed");
        assert!(installed.is_loaded());
        stop.cancel();
    }

    #[tokio::test]
    async fn the_dir_source_needs_a_directory() {
        assert!(matches!(
            Source::open(ConfigSource::Dir, None).await,
            Err(SourceError::NoDir)
        ));
    }
}
