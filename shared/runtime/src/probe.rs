//! `<service> healthcheck`: a gRPC health probe built into each service binary, so container
//! images need no separate client (grpc_health_probe, grpcurl) for Docker's HEALTHCHECK or a
//! compose `service_healthy` condition. Exit status 0 when the service answers SERVING.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::client::{ClientSecurity, ClientSecurityConfig};

/// The subcommand each service binary takes beside serving.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ServiceCommand {
    /// Ask a running service's gRPC health (default: the one on --listen) and exit 0 if it is
    /// SERVING: for container health checks.
    Healthcheck(HealthcheckArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HealthcheckArgs {
    /// The service to ask; default: this binary's listen address (a wildcard host asked on
    /// loopback), plain HTTP/2.
    #[arg(long)]
    pub url: Option<String>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
    /// For a service serving TLS (`https://` URLs): PEM CA to verify it with.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key, for a service that requires mutual TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name the service's certificate carries, when not the URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
}

/// The URL to probe a service listening on `listen` (`HOST:PORT`): a wildcard host becomes
/// loopback; port 0 (an ephemeral port only the service knows) cannot be probed.
pub fn url_for_listen_address(listen: &str) -> anyhow::Result<String> {
    let address: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?} is not HOST:PORT; pass --url"))?;
    anyhow::ensure!(
        address.port() != 0,
        "listen address {listen} has port 0, unknown from outside; pass --url"
    );
    let host = match address.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    Ok(format!("http://{host}:{}", address.port()))
}

/// Asks `service`'s health at the probe's URL (or `listen`'s); prints the outcome on stderr.
pub fn run(service: &str, listen: &str, args: &HealthcheckArgs) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the probe's runtime")
        .and_then(|runtime| runtime.block_on(check(service, listen, args)));
    match outcome {
        Ok(ServingStatus::Serving) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{service}: {status:?}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("{service}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn check(
    service: &str,
    listen: &str,
    args: &HealthcheckArgs,
) -> anyhow::Result<ServingStatus> {
    let url = match &args.url {
        Some(url) => url.clone(),
        None => url_for_listen_address(listen)?,
    };
    let security = ClientSecurity::new(&ClientSecurityConfig {
        tls_ca: args.tls_ca.clone(),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        tls_domain: args.tls_domain.clone(),
        ..Default::default()
    })?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let probe = async {
        let channel = security
            .endpoint(&url)?
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .with_context(|| format!("health check at {url}"))?;
        Ok::<_, anyhow::Error>(response.into_inner().status())
    };
    tokio::time::timeout(timeout, probe)
        .await
        .with_context(|| format!("no answer from {url} within {} ms", args.timeout_ms))?
}

#[cfg(test)]
mod tests {
    use super::url_for_listen_address;

    #[test]
    fn wildcard_hosts_are_probed_on_loopback() {
        let url = |listen| url_for_listen_address(listen).expect(listen);
        assert_eq!(url("0.0.0.0:50052"), "http://127.0.0.1:50052");
        assert_eq!(url("[::]:50051"), "http://[::1]:50051");
        assert_eq!(url("10.1.2.3:9"), "http://10.1.2.3:9");
        assert_eq!(url("[fe80::1]:9"), "http://[fe80::1]:9");
        assert!(url_for_listen_address("127.0.0.1:0").is_err());
        assert!(url_for_listen_address("localhost:50051").is_err());
    }
}
