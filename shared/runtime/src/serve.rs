//! Running a gRPC server the way every service here does: grpc.health.v1 and reflection
//! beside the service, TLS and bearer tokens when configured, stopped by a signal, with a
//! deadline on draining.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};

use crate::auth::{AccessPolicy, AuthLayer, Authenticator};
use crate::security::ServerSecurityArgs;

/// The router every service serves: its calls pass the [`AuthLayer`] first.
pub type ServiceRouter = Router<Stack<AuthLayer, Identity>>;

/// What grpc.health.v1 reports for one service (probes, `service_healthy` in compose, load
/// balancers): serving from the start; the service says when it is not.
#[derive(Clone)]
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
    service: &'static str,
}

impl Health {
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.reporter.set_service_status(self.service, status).await;
    }

    /// `shutdown`, after which the service reports NOT_SERVING while it drains, so probes
    /// and balancers stop sending it new work.
    pub fn not_serving_after(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let health = self.clone();
        async move {
            shutdown.await;
            health.set_serving(false).await;
        }
    }
}

/// A server with grpc.health.v1 (reporting `S` as serving, until the returned [`Health`] says
/// otherwise) and reflection (v1 and v1alpha) over the asr.v1 and health descriptors, serving
/// TLS and checking tokens against `policy` as `security` says; add the service itself to it.
pub async fn router_with_health_and_reflection<S: NamedService>(
    security: &ServerSecurityArgs,
    policy: AccessPolicy,
) -> anyhow::Result<(ServiceRouter, Health)> {
    let mut builder = Server::builder();
    if let Some(tls) = security.tls()? {
        builder = builder.tls_config(tls)?;
        tracing::info!(mutual = security.tls_client_ca.is_some(), "serving TLS");
    }
    let authenticator = security
        .tokens()?
        .map(|tokens| Authenticator::new(tokens, policy));
    match &authenticator {
        Some(authenticator) => tracing::info!(?authenticator, "bearer tokens required"),
        None => tracing::warn!("no --auth-tokens: every caller may use every method"),
    }
    let mut builder = builder.layer(AuthLayer::new(authenticator));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(S::NAME, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(asr_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1alpha too: grpcurl speaks both, but grpcio-reflection's client and older tools only it.
    let router = builder
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    let health = Health {
        reporter: health_reporter,
        service: S::NAME,
    };
    Ok((router, health))
}

/// Serves `router` on `listener` until `shutdown` completes, then drains for at most `drain`.
pub async fn serve(
    router: ServiceRouter,
    listener: TcpListener,
    drain: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_drain_deadline(shutdown, drain, |signal| {
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
    })
    .await
}

/// Runs a server until it stops by itself or, once `shutdown` has fired, for at most `grace`:
/// `serve` gets the signal to hand to tonic's `serve_with_shutdown`, which stops accepting and
/// waits for open connections; clients that keep theirs open must not hold a stopping service
/// past its orchestrator's grace period.
pub async fn serve_with_drain_deadline<F, E>(
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    serve: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
) -> anyhow::Result<()>
where
    F: Future<Output = Result<(), E>>,
    E: Into<anyhow::Error>,
{
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel();
    let signal = Box::pin(async move {
        shutdown.await;
        let _ = fired_tx.send(());
    });
    let server = serve(signal);
    tokio::pin!(server);
    let deadline = async {
        match fired_rx.await {
            Ok(()) => tokio::time::sleep(grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = &mut server => result.map_err(Into::into),
        () = deadline => {
            tracing::warn!(grace_seconds = grace.as_secs_f64(), "drain deadline passed; closing the remaining connections");
            Ok(())
        }
    }
}

/// Completes on Ctrl-C or SIGTERM, the signals a terminal and an orchestrator send.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested; finishing in-flight requests");
}
