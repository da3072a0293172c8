//! The CA in process for tests: a temp CA directory and config (two pods on two nodes), the
//! app on loopback, tokens minted with its key, and the mesh's own CA client.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use control::app::Addrs;
use control::config::Args;
use control::token::{TokenAuthority, TokenClaims};
use mesh_model::identity::Identity;
use mesh_pki::ca_client::{CaClient, CaClientConfig};
use mesh_shell::admin::Control;
use mesh_shell::process::AppHandle;
use rustls::RootCertStore;

pub const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo, uid: u-web-1}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.0.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: demo, uid: u-db-1}
spec: {nodeName: n2, serviceAccountName: db}
status: {podIP: 10.0.2.10}
"#;

pub const SERVER_NAME: &str = "istiod.istio-system.svc";

pub struct Ca {
    pub dir: tempfile::TempDir,
    pub app: AppHandle<Addrs>,
    pub roots: Arc<RootCertStore>,
    pub tokens: TokenAuthority,
}

impl Ca {
    pub async fn start(extra: &[&str]) -> Ca {
        Self::start_in(tempfile::tempdir().unwrap(), extra).await
    }

    /// Starts the CA on an existing directory (a restart keeps its root and token key).
    pub async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Ca {
        let cfg = dir.path().join("config");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(cfg.join("pods.yaml"), PODS).unwrap();
        let ca_dir = dir.path().join("ca");
        let mut argv: Vec<String> = [
            "control",
            "--ca-dir",
            &ca_dir.display().to_string(),
            "--config-dir",
            &cfg.display().to_string(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if extra.contains(&"--grpc-addr") {
            // The caller's address replaces the default `127.0.0.1:0`.
            let at = argv.iter().position(|a| a == "--grpc-addr").unwrap();
            argv.drain(at..at + 2);
        }
        argv.extend(extra.iter().map(|s| s.to_string()));
        let args = Args::try_parse_from(argv).unwrap();
        let app = control::app::start(args, Control::default()).await.unwrap();
        let ca = mesh_pki::ca::Ca::load_or_create(&ca_dir, "cluster.local").unwrap();
        let tokens = TokenAuthority::load_or_create(&ca_dir).unwrap();
        Ca {
            roots: ca.root_store(),
            dir,
            app,
            tokens,
        }
    }

    pub fn mint(&self, ns: &str, sa: &str, node: Option<&str>, audience: &str) -> String {
        self.tokens
            .mint(&TokenClaims {
                namespace: ns.into(),
                service_account: sa.into(),
                node: node.map(str::to_string),
                pod: None,
                audience: audience.into(),
                ttl: Duration::from_secs(600),
            })
            .unwrap()
    }

    pub fn token(&self, ns: &str, sa: &str, node: Option<&str>) -> PathBuf {
        self.token_file(&self.mint(ns, sa, node, "istio-ca"))
    }

    pub fn token_file(&self, token: &str) -> PathBuf {
        let file = tempfile::NamedTempFile::new_in(self.dir.path()).unwrap();
        std::fs::write(file.path(), token).unwrap();
        file.into_temp_path().keep().unwrap()
    }

    pub fn client(&self, token: &Path) -> CaClient {
        CaClient::new(CaClientConfig {
            address: format!("https://127.0.0.1:{}", self.app.addrs.grpc.port()),
            server_name: Some(SERVER_NAME.into()),
            roots: self.roots.clone(),
            token_path: token.to_path_buf(),
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    pub async fn admin(&self, path: &str) -> String {
        let addr = self.app.addrs.endpoints.admin;
        let out = tokio::process::Command::new("curl")
            .args(["-sf", &format!("http://{addr}{path}")])
            .output()
            .await
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }
}

pub fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}
