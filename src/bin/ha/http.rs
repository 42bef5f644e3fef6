//! `--metrics-addr`: `/metrics` (Prometheus text), `/healthz` and `/role` (200 only while
//! ACTIVE and ready, so a load balancer routes to the active alone); on `ha node` also
//! `/status`, the member's Raft state as JSON.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use ha::RoleState;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

/// Produces `/status`'s JSON.
pub type StatusSource =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = serde_json::Value> + Send>> + Send + Sync>;

static STATUS: OnceLock<StatusSource> = OnceLock::new();

/// Serves `/status` from `source` (set once, by `ha node`, before `serve`).
pub fn set_status_source(source: StatusSource) {
    let _ = STATUS.set(source);
}

#[derive(Clone)]
struct Probes {
    metrics: PrometheusHandle,
    role: watch::Receiver<RoleState>,
}

/// Installs the Prometheus recorder and serves the endpoints in the background.
///
/// # Errors
/// The address cannot be bound, or a recorder is already installed.
pub async fn serve(addr: SocketAddr, role: watch::Receiver<RoleState>) -> anyhow::Result<()> {
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
        ])?
        .install_recorder()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/role", get(role_probe))
        .route("/status", get(status))
        .with_state(Probes { metrics, role });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "metrics server stopped");
        }
    });
    Ok(())
}

/// The member's Raft state; 404 where there is no member (`ha run`).
async fn status() -> (StatusCode, String) {
    match STATUS.get() {
        Some(source) => (StatusCode::OK, format!("{}\n", source().await)),
        None => (
            StatusCode::NOT_FOUND,
            "no Raft member in this process\n".to_owned(),
        ),
    }
}

async fn render_metrics(State(probes): State<Probes>) -> String {
    probes.metrics.render()
}

/// 200 while the coordinator loop runs; 503 once it stopped.
async fn healthz(State(probes): State<Probes>) -> (StatusCode, &'static str) {
    match *probes.role.borrow() {
        RoleState::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped\n"),
        _ => (StatusCode::OK, "ok\n"),
    }
}

/// 200 only while ACTIVE and ready; the body is the state either way.
async fn role_probe(State(probes): State<Probes>) -> (StatusCode, String) {
    let state = *probes.role.borrow();
    let status = if state.is_ready_active() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{}\n", state.as_str()))
}
