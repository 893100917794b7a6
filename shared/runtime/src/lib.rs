//! What every service binary shares: logging and OpenTelemetry export ([`telemetry`]), trace
//! context across gRPC hops ([`trace_context`]), Prometheus metrics ([`metrics`]), and serving
//! gRPC with health, reflection, a shutdown signal and a drain deadline ([`serve`]).

pub mod metrics;
pub mod serve;
pub mod telemetry;
pub mod trace_context;

pub use serve::{
    router_with_health_and_reflection, serve, serve_with_drain_deadline, shutdown_signal,
};
pub use telemetry::{init, LogFormat, TelemetryArgs, TelemetryGuard};
