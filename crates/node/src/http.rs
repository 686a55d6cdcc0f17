//! The HTTP listener: Prometheus metrics and health probes (the REST API is merged in by `lib.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

/// What the HTTP handlers need.
#[derive(Clone)]
pub struct HttpState {
    pub prometheus: Option<PrometheusHandle>,
    /// True once durable state is recovered and listeners are up; false again on shutdown.
    pub ready: Arc<AtomicBool>,
    /// Samples gauges that are read at scrape time (per-tenant usage).
    pub sample: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Builds the router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .with_state(state)
}

async fn metrics(
    State(s): State<HttpState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    // Sampled at scrape time: live tasks are one per connection plus timers, so a count that
    // grows without connections growing is a leak (e.g. timers piling up under reconnects).
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    metrics::gauge!(crate::metrics::RUNTIME_TASKS).set(tasks as f64);
    if let Some(sample) = &s.sample {
        sample();
    }
    let body = match &s.prometheus {
        Some(h) => h.render(),
        None => String::new(),
    };
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        body,
    )
}

async fn ready(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
