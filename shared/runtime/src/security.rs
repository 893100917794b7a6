//! A server's TLS and authentication settings, the same flags on every service.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::auth::TokenTable;

#[derive(Debug, Clone, Default, Args)]
pub struct ServerSecurityArgs {
    /// PEM certificate chain to serve TLS with (needs --tls-key). Unset: plaintext HTTP/2.
    #[arg(long, env = "ASR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ASR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate signed by one of them
    /// (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "ASR_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Token file: one "principal scopes token" line per caller, scopes from transcribe,
    /// train and admin, the token in clear or as sha256:<hex>. Unset: no authentication.
    #[arg(long, env = "ASR_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
}

pub(crate) fn read_pem(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

impl ServerSecurityArgs {
    /// The TLS configuration the flags ask for, if any.
    pub fn tls(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            anyhow::ensure!(
                self.tls_cert.is_none() && self.tls_key.is_none() && self.tls_client_ca.is_none(),
                "--tls-cert and --tls-key go together (and --tls-client-ca needs them)"
            );
            return Ok(None);
        };
        let identity = Identity::from_pem(
            read_pem(cert, "TLS certificate")?,
            read_pem(key, "TLS key")?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem(ca, "client CA")?));
        }
        Ok(Some(config))
    }

    /// The tokens the flags name, if any.
    pub fn tokens(&self) -> anyhow::Result<Option<TokenTable>> {
        self.auth_tokens
            .as_deref()
            .map(|path| {
                TokenTable::load(path).with_context(|| format!("--auth-tokens {}", path.display()))
            })
            .transpose()
    }
}
