//! How a client reaches a service here: TLS for `https://` addresses (the system's roots, or a
//! given CA, and a client certificate for mutual TLS) and a bearer token on every call.

use std::fmt;
use std::path::PathBuf;

use anyhow::Context;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::security::read_pem;

/// Where a client's credentials come from (flags or environment, each binary names its own).
#[derive(Debug, Clone, Default)]
pub struct ClientSecurityConfig {
    /// PEM CA certificates to verify the server with; unset: the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for servers that ask for one.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Name the server's certificate must carry, when not the address's host.
    pub tls_domain: Option<String>,
    /// A file holding the bearer token (first line).
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (from an environment variable; flags would show it in `ps`).
    pub token: Option<String>,
}

/// Adds `authorization: Bearer <token>` to every call; marked sensitive, so HTTP/2 never
/// indexes it and Debug never prints it.
#[derive(Clone, Default)]
pub struct BearerToken(Option<AsciiMetadataValue>);

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(None)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the bearer token.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// TLS settings and token for the channels a process opens; cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct ClientSecurity {
    tls: Option<ClientTlsConfig>,
    token: BearerToken,
}

impl ClientSecurity {
    pub fn new(config: &ClientSecurityConfig) -> anyhow::Result<Self> {
        let token = match (&config.token, &config.token_file) {
            (Some(token), _) => Some(token.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let token = match token {
            Some(token) => {
                anyhow::ensure!(!token.is_empty(), "the bearer token is empty");
                let mut value: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                        anyhow::anyhow!("the bearer token has characters HTTP headers cannot carry")
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let wants_tls = config.tls_ca.is_some()
            || config.tls_cert.is_some()
            || config.tls_key.is_some()
            || config.tls_domain.is_some();
        let tls = if wants_tls {
            let mut tls = ClientTlsConfig::new();
            tls = match &config.tls_ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(read_pem(ca, "TLS CA")?)),
                None => tls.with_native_roots(),
            };
            match (&config.tls_cert, &config.tls_key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(
                        read_pem(cert, "TLS client certificate")?,
                        read_pem(key, "TLS client key")?,
                    ));
                }
                (None, None) => {}
                _ => anyhow::bail!("a TLS client certificate and its key go together"),
            }
            if let Some(domain) = &config.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            Some(tls)
        } else {
            None
        };
        Ok(Self {
            tls,
            token: BearerToken(token),
        })
    }

    /// An endpoint for `url`: `https://` ones get TLS (the configured CA, or the system's
    /// roots when none was given).
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("{url:?} is not a valid URL"))?;
        if endpoint.uri().scheme_str() != Some("https") {
            return Ok(endpoint);
        }
        let tls = self
            .tls
            .clone()
            .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
        endpoint
            .tls_config(tls)
            .with_context(|| format!("TLS settings for {url}"))
    }

    /// `channel` with the token on every call.
    pub fn authorize(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.token.clone())
    }

    /// Connects to `url` now.
    pub async fn connect(&self, url: &str) -> anyhow::Result<AuthChannel> {
        let channel = self
            .endpoint(url)?
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(self.authorize(channel))
    }
}
