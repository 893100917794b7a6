//! What every service binary shares: logging and OpenTelemetry export ([`telemetry`]), trace
//! context across gRPC hops ([`trace_context`]), Prometheus metrics ([`metrics`]), and serving
//! gRPC with health, reflection, a shutdown signal and a drain deadline ([`serve`]), TLS and
//! bearer-token scopes on the server ([`security`], [`auth`]) and the client ([`client`]), a
//! health probe built into each binary ([`probe`]), how libtorch's OpenMP threads wait
//! ([`openmp`]) and how malloc keeps large blocks ([`allocator`]).

pub mod allocator;
pub mod auth;
pub mod client;
pub mod deadline;
pub mod metrics;
pub mod openmp;
pub mod probe;
pub mod security;
pub mod serve;
pub mod telemetry;
pub mod trace_context;

pub use client::{AuthChannel, ClientSecurity, ClientSecurityConfig};
pub use security::ServerSecurityArgs;
pub use serve::{
    router_with_health_and_reflection, serve, serve_with_drain_deadline, shutdown_signal, Health,
    ServiceRouter,
};
pub use telemetry::{init, LogFormat, TelemetryArgs, TelemetryGuard};
