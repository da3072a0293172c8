//! The node agent as a client of the CA service, in process: agents hold a node token and
//! no signing key; the CA (`control`) issues each pod's identity only to the agent of the
//! pod's node. A stolen token of another node gets nothing for this node's pods, and those
//! pods fail closed with the CA's reason visible.

mod support;

use anyhow::{ensure, Result};
use e2e::{Mesh, Pod};
use support::agents::{roundtrip, Cluster, EVENTUALLY};

const APP: u16 = 8080;

fn two_nodes(name: &str) -> e2e::MeshBuilder {
    Mesh::two_nodes(name).pod(Pod::echo_server("server", "n2"))
}

/// Polls `check` until it holds or [`EVENTUALLY`] passes.
async fn eventually<F, Fut>(mut check: F) -> Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = std::time::Instant::now() + EVENTUALLY;
    loop {
        if check().await? {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_their_identities_from_the_ca_service_and_talk_over_hbone() -> Result<()> {
    let mesh = Cluster::start_with_ca(two_nodes("ca-ok"), |node| node.to_string()).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let mut conn = mesh
        .connect("default/client", mesh.addr("default/server", APP)?)
        .await?;
    let payload = b"certificates from the ca service".repeat(10);
    ensure!(roundtrip(&mut conn, &payload).await? == payload);

    // The CA issued each identity to the agent of its pod's node, and nothing else.
    let ca = mesh.ca_dump().await?;
    let issued: Vec<(String, String)> = ca["issued"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["identity"].as_str().unwrap_or("").to_string(),
                        i["caller"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        issued.contains(&(
            "spiffe://cluster.local/ns/default/sa/client".into(),
            "istio-system/ztunnel @n1".into()
        )),
        "{issued:?}"
    );
    ensure!(
        issued.contains(&(
            "spiffe://cluster.local/ns/default/sa/server".into(),
            "istio-system/ztunnel @n2".into()
        )),
        "{issued:?}"
    );
    // The agents hold no CA: their dump says where certificates come from.
    let dump = mesh.config_dump("n1").await?;
    ensure!(dump["config"]["ca_dir"].is_null(), "{}", dump["config"]);
    ensure!(
        dump["config"]["ca_address"].is_string(),
        "{}",
        dump["config"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_token_of_another_node_gets_nothing_and_the_pods_fail_closed() -> Result<()> {
    // n1's agent holds n2's token.
    let mesh = Cluster::start_with_ca(two_nodes("ca-stolen"), |_| "n2".to_string()).await?;
    let _app = mesh.echo("default/server", APP).await?;

    // The client pod (on n1) waits for its certificate, with the CA's reason in the dump.
    let pending = eventually(|| async {
        let dump = mesh.config_dump("n1").await?;
        let states: Vec<String> = dump["workloads"]
            .as_array()
            .map(|w| {
                w.iter()
                    .map(|p| p["state"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        Ok(states.iter().any(|s| s.contains("no_such_pod_on_node")))
    })
    .await?;
    ensure!(pending, "{}", mesh.config_dump("n1").await?["workloads"]);
    ensure!(
        !mesh.is_ready("n1").await?,
        "n1 is not ready without its pods' certificates"
    );

    // Its traffic fails closed: refused before any tunnel, flagged TLS.
    let conn = mesh
        .connect("default/client", mesh.addr("default/server", APP)?)
        .await;
    if let Ok(mut conn) = conn {
        let back = roundtrip(&mut conn, b"hello").await.unwrap_or_default();
        ensure!(
            back.is_empty(),
            "a pod without a certificate reached the server"
        );
    }
    let n = mesh.refused("n1", "source", "TLS", 1.0).await?;
    ensure!(n == 1.0, "{n} refusals flagged TLS on n1");

    // The CA counted what it refused.
    let ca = mesh.ca_dump().await?;
    let issued_to_n1 = ca["issued"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["identity"].as_str().unwrap_or("").ends_with("/sa/client"))
                .count()
        })
        .unwrap_or(0);
    ensure!(
        issued_to_n1 == 0,
        "the client's identity was issued: {}",
        ca["issued"]
    );
    Ok(())
}
