//! Taking the mesh off a node: `ztunnel --release-all`, and the last step of an agent run
//! with `--release-on-exit`.
//!
//! An agent that stops leaves its pods captured on purpose (the next agent adopts the
//! capture; meanwhile the pods fail closed). For an uninstall that would black-hole them, so
//! this removes, in the network namespace of every pod of the node the config names, whatever
//! either backend installs (the eBPF backend's policy-routing rules and table, the nftables
//! table and rule, the IPv6 block) and the eBPF pins of those pods (with no agent holding the
//! link, the `sk_lookup` program detaches with its pin). Both backends are cleaned whatever
//! `--redirect` says: an uninstall must not depend on knowing what an earlier agent used.
//! Every step is idempotent, so running it twice, or after an agent released on exit, is
//! harmless.
//!
//! Scope: only this node's pods (`spec.nodeName`), from the same config source the agent
//! reads, so other nodes sharing a bpffs or a machine (the e2e harness) are never touched.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_model::model::{Model, NamespacedName};
use mesh_shell::source::{Installed, Source};
use mesh_telemetry::Metrics;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigSource, Redirect};
use crate::netns::Netns;
use crate::netns_source::PodNetnsSource;
use crate::podns::PodNetnsFinder;
use crate::redirect;

/// How long `--release-all` waits for the API server's first complete model.
const FIRST_MODEL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a release removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Pods of the node whose namespace held redirection state.
    pub pods: usize,
    /// eBPF pin directories removed.
    pub pins: usize,
}

/// `ztunnel --release-all`: reads the config once, releases every pod of the node, logs
/// what it did.
pub async fn release_all(cfg: &Config) -> anyhow::Result<Released> {
    let model = first_model(cfg).await?;
    let pods = pod_netns(cfg)?;
    let released = release_node(cfg, &model, &pods).await;
    tracing::info!(
        node = %cfg.node_name,
        pods = released.pods,
        pins = released.pins,
        "released every pod's capture on the node"
    );
    Ok(released)
}

/// How pods' namespaces are found, as the agent finds them.
pub(crate) fn pod_netns(cfg: &Config) -> anyhow::Result<PodNetnsSource> {
    let home = Arc::new(Netns::current().context("open the agent's own netns")?);
    Ok(match cfg.config_source {
        _ if cfg.redirect == Redirect::Loopback => PodNetnsSource::Agent(home),
        ConfigSource::Dir => PodNetnsSource::Named(Arc::new(cfg.clone())),
        ConfigSource::Kube => PodNetnsSource::ByIp(Arc::new(
            PodNetnsFinder::new(home).context("set up the pod netns finder")?,
        )),
    })
}

/// The config source's current model: a directory's at once, the API server's once every
/// kind has been listed.
async fn first_model(cfg: &Config) -> anyhow::Result<Arc<Model>> {
    let source = Source::open(cfg.config_source, cfg.config_dir.as_deref())
        .await
        .context("set up the config source")?;
    let metrics = Metrics::new();
    if let Some(model) = source.initial(&metrics) {
        return Ok(Arc::new(model));
    }
    if cfg.config_source == ConfigSource::Dir {
        anyhow::bail!("the config directory holds no valid config: the node's pods are unknown");
    }
    let (installed, mut changed) = Installed::new(None, metrics, |_| {});
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    source.run(
        cfg.config_poll,
        installed.clone(),
        mesh_kube::Options::default(),
        stop,
    );
    tokio::time::timeout(FIRST_MODEL_TIMEOUT, changed.changed())
        .await
        .context("no model from the api server in time")?
        .context("the config source stopped")?;
    Ok(installed.model.load_full())
}

/// Releases every pod of the node in `model` (see the module docs); blocking work runs off
/// the runtime's workers.
pub(crate) async fn release_node(
    cfg: &Config,
    model: &Model,
    pod_netns: &PodNetnsSource,
) -> Released {
    let mut netns = Vec::new();
    let mut keys = Vec::new();
    for pod in model
        .pods_on_node(&cfg.node_name)
        .filter(|p| !p.host_network)
    {
        let key = NamespacedName::new(&pod.namespace, &pod.name);
        match pod_netns.open(pod) {
            // The agent's own namespace (`--redirect loopback`) holds nothing to release.
            Ok(ns) if !ns.is_own() => netns.push((key.clone(), ns)),
            Ok(_) => {}
            Err(e) => tracing::debug!(pod = %key, error = %e, "no netns to release"),
        }
        keys.push(key);
    }
    let bpf_fs = cfg.bpf_fs.clone();
    let work = move || {
        let mut released = Released::default();
        for (key, ns) in &netns {
            if release_netns(ns.path()) {
                tracing::info!(pod = %key, "capture released");
                released.pods += 1;
            }
        }
        for dir in redirect::ebpf::remove_pins_of(&bpf_fs, &keys) {
            tracing::info!(dir = %dir.display(), "capture pins removed");
            released.pins += 1;
        }
        released
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(released) => released,
        Err(e) => {
            tracing::error!(error = %e, "releasing the node's pods failed");
            Released::default()
        }
    }
}

/// Removes both backends' redirection from one namespace; says whether there was any.
fn release_netns(netns: &Path) -> bool {
    let had = redirect::has_leftovers(netns);
    if let Err(e) = redirect::ebpf::remove(netns) {
        tracing::warn!(netns = %netns.display(), error = %e, "remove eBPF routing");
    }
    if let Err(e) = redirect::nft::remove(netns) {
        tracing::warn!(netns = %netns.display(), error = %e, "remove nftables redirection");
    }
    had
}
