//! Logging: tracing to stderr (text or JSON lines), filtered by `RUST_LOG` (default `info`),
//! with the filter replaceable at runtime through the admin endpoint `/logging`.

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// The filter when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    #[error("reload log filter: {0}")]
    Reload(String),
}

/// Changes the active filter.
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
}

impl LogHandle {
    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let f = EnvFilter::try_new(filter).map_err(|e| LogError::Filter {
            filter: filter.to_string(),
            reason: e.to_string(),
        })?;
        self.handle
            .reload(f)
            .map_err(|e| LogError::Reload(e.to_string()))?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = filter.to_string();
        tracing::info!(filter, "log filter changed");
        Ok(())
    }

    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Installs the global subscriber (startup only: a second call in one process panics, as
/// `tracing_subscriber`'s `init` does).
pub fn init(format: LogFormat) -> LogHandle {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_string());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Colour only for a person at a terminal; log files and collectors get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    LogHandle {
        handle,
        current: Arc::new(Mutex::new(initial)),
    }
}
