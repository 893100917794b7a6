//! How the CLI reaches the services: the TLS and token flags, given once before the verb, and
//! the channels every verb opens with them.

use std::path::PathBuf;
use std::sync::OnceLock;

use asr_runtime::{AuthChannel, ClientSecurity, ClientSecurityConfig};
use clap::Args;

#[derive(Args, Debug, Clone, Default)]
pub struct ConnectionArgs {
    /// PEM CA certificates to verify https:// services with; unset: the system's roots.
    #[arg(long, global = true, env = "ASR_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for services that ask for one (mutual TLS).
    #[arg(long, global = true, env = "ASR_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, global = true, env = "ASR_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Name the services' certificates carry, when not the host in their addresses.
    #[arg(long, global = true, env = "ASR_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// File holding the bearer token sent to the services (or the token itself in
    /// ASR_TOKEN).
    #[arg(long, global = true, env = "ASR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

static SECURITY: OnceLock<ClientSecurity> = OnceLock::new();

/// Reads the credentials once, before any verb runs.
pub fn init(args: &ConnectionArgs) -> anyhow::Result<()> {
    let security = ClientSecurity::new(&ClientSecurityConfig {
        tls_ca: args.tls_ca.clone(),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        tls_domain: args.tls_domain.clone(),
        token_file: args.token_file.clone(),
        token: std::env::var("ASR_TOKEN").ok().filter(|t| !t.is_empty()),
    })?;
    let _ = SECURITY.set(security);
    Ok(())
}

pub fn security() -> ClientSecurity {
    SECURITY.get().cloned().unwrap_or_default()
}

/// A connected channel to `url` with the CLI's TLS settings and token.
pub async fn connect(url: &str) -> anyhow::Result<AuthChannel> {
    security().connect(url).await
}
