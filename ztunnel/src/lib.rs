//! The ztunnel node agent: one process per node serving every enrolled pod on it.
//!
//! Data path modules are ordered like the traffic: [`redirect`] (capture rules in the pod's
//! namespace) → [`proxy`] (listeners and the HBONE client/server) → [`conns`] (open connections,
//! re-checked on policy change); [`dns`] the pods' captured DNS. Control: [`app`] wires [`config`], the model watcher,
//! [`workloads`] (which pods we serve) and [`admin`] (what the agent plugs into
//! `mesh_shell`'s endpoints: its config dump, readiness and the node [`dashboard`]).
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod conns;
pub mod dashboard;
pub mod dns;
pub mod netns;
pub mod netns_source;
pub mod podns;
pub mod proxy;
pub mod redirect;
pub mod socket;
pub mod uninstall;
pub mod workloads;
