//! Bearer-token authentication with scopes, enforced in front of every gRPC service.
//!
//! A token file names who may call (`principal`), what they may do (scopes) and the token, in
//! clear or as its SHA-256 so the file need not hold secrets:
//!
//! ```text
//! # principal   scopes              token
//! ops           transcribe,train,admin  sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
//! kiosk         transcribe          kiosk-secret-token
//! ```
//!
//! Each service states the scope each of its methods needs ([`AccessPolicy`]); health and
//! reflection stay open, as orchestrators and grpcurl probe them without credentials. A call
//! without a valid token gets UNAUTHENTICATED, one whose token lacks the scope
//! PERMISSION_DENIED. Tokens are compared as digests in constant time and never logged: only
//! the principal's name is, and the handlers find it in the request's extensions.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Transcribe and feature extraction.
    Transcribe,
    /// Datasets (ingest, list, delete) and training jobs.
    Train,
    /// Adapter administration: load, unload, delete, merge.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Transcribe, Scope::Train, Scope::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Transcribe => "transcribe",
            Scope::Train => "train",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.name() == text)
            .ok_or_else(|| format!("unknown scope {text:?} (transcribe, train or admin)"))
    }
}

/// What calling one method takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// No credentials (health checks, reflection).
    Public,
    /// Any valid token (service facts such as GetInfo).
    Authenticated,
    Scope(Scope),
}

/// The requirement of every method of one service, by gRPC path
/// (`/asr.v1.ModelService/Transcribe`). Paths it does not list need [`Scope::Admin`]: a method
/// added without a policy is closed, not open.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    methods: HashMap<String, Requirement>,
}

impl AccessPolicy {
    /// `service` is the full service name (`asr.v1.ModelService`), `methods` its method names.
    pub fn new(service: &str, methods: &[(&str, Requirement)]) -> Self {
        let methods = methods
            .iter()
            .map(|(method, requirement)| (format!("/{service}/{method}"), *requirement))
            .collect();
        Self { methods }
    }

    /// What calling `path` takes.
    pub fn requirement(&self, path: &str) -> Requirement {
        if path.starts_with("/grpc.health.v1.Health/")
            || path.starts_with("/grpc.reflection.v1.ServerReflection/")
            || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
        {
            return Requirement::Public;
        }
        self.methods
            .get(path)
            .copied()
            .unwrap_or(Requirement::Scope(Scope::Admin))
    }

    /// The methods of `service` in the asr.v1 descriptors that this policy does not list (a
    /// test checks there are none).
    pub fn unlisted_methods(&self, service: &str) -> Vec<String> {
        use prost::Message;
        let Ok(set) = prost_types::FileDescriptorSet::decode(asr_proto::FILE_DESCRIPTOR_SET) else {
            return vec!["<the asr.v1 descriptor set does not decode>".into()];
        };
        let Some((package, name)) = service.rsplit_once('.') else {
            return vec![format!("<{service} is not a full service name>")];
        };
        let paths: Vec<String> = set
            .file
            .iter()
            .filter(|file| file.package() == package)
            .flat_map(|file| &file.service)
            .filter(|found| found.name() == name)
            .flat_map(|found| &found.method)
            .map(|method| format!("/{service}/{}", method.name()))
            .collect();
        if paths.is_empty() {
            return vec![format!(
                "<{service} has no methods in the asr.v1 descriptors>"
            )];
        }
        paths
            .into_iter()
            .filter(|path| !self.methods.contains_key(path))
            .collect()
    }
}

/// Who made a call: put in the request's extensions when a token authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub Arc<str>);

/// A token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("the token file holds no tokens")]
    Empty,
}

struct TokenEntry {
    principal: Arc<str>,
    digest: [u8; 32],
    scopes: BTreeSet<Scope>,
}

/// The tokens a service accepts.
pub struct TokenTable {
    entries: Vec<TokenEntry>,
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let principals: Vec<&str> = self.entries.iter().map(|e| &*e.principal).collect();
        f.debug_struct("TokenTable")
            .field("principals", &principals)
            .finish()
    }
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenTable {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        text.parse()
    }

    /// The entry whose token is `token`. Every entry is compared, in constant time, so the
    /// time taken says nothing about which (if any) matched.
    fn authenticate(&self, token: &str) -> Option<&TokenEntry> {
        let digest = sha256(token);
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        found
    }
}

impl FromStr for TokenTable {
    type Err = TokenFileError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut entries = Vec::new();
        let mut principals = BTreeSet::new();
        for (index, line) in text.lines().enumerate() {
            let line_error = |reason: String| TokenFileError::Line {
                line: index + 1,
                reason,
            };
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [principal, scopes, token] = fields[..] else {
                return Err(line_error(
                    "expected three fields: principal, scopes (comma-separated), token".into(),
                ));
            };
            let scopes = scopes
                .split(',')
                .map(Scope::from_str)
                .collect::<Result<BTreeSet<_>, _>>()
                .map_err(line_error)?;
            let digest = match token.strip_prefix("sha256:") {
                Some(hex_digest) => hex::decode(hex_digest)
                    .ok()
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                    .ok_or_else(|| line_error("sha256: wants 64 hex digits".into()))?,
                None if token.len() < 16 => {
                    return Err(line_error(format!(
                        "the token of {principal:?} is shorter than 16 characters"
                    )))
                }
                None => sha256(token),
            };
            if !principals.insert(principal.to_string()) {
                return Err(line_error(format!("principal {principal:?} appears twice")));
            }
            if entries
                .iter()
                .any(|entry: &TokenEntry| entry.digest == digest)
            {
                return Err(line_error(format!(
                    "the token of {principal:?} is also another principal's"
                )));
            }
            entries.push(TokenEntry {
                principal: principal.into(),
                digest,
                scopes,
            });
        }
        if entries.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(Self { entries })
    }
}

/// Checks calls against a token table and a service's policy.
#[derive(Debug)]
pub struct Authenticator {
    tokens: TokenTable,
    policy: AccessPolicy,
}

impl Authenticator {
    pub fn new(tokens: TokenTable, policy: AccessPolicy) -> Self {
        Self { tokens, policy }
    }

    /// The caller of `path` with these headers, or the status refusing the call.
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Principal>, Status> {
        let requirement = self.policy.requirement(path);
        if requirement == Requirement::Public {
            return Ok(None);
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "this service requires a bearer token (metadata \"authorization: Bearer <token>\")",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata is not \"Bearer <token>\"")
            })?;
        let entry = self
            .tokens
            .authenticate(token)
            .ok_or_else(|| Status::unauthenticated("the bearer token is not valid"))?;
        if let Requirement::Scope(scope) = requirement {
            if !entry.scopes.contains(&scope) {
                tracing::warn!(principal = %entry.principal, %scope, path, "call refused: scope missing");
                return Err(Status::permission_denied(format!(
                    "principal {:?} lacks the scope \"{scope}\" that {path} needs",
                    entry.principal
                )));
            }
        }
        Ok(Some(Principal(entry.principal.clone())))
    }
}

/// The tower layer a server puts in front of its services; without an authenticator every
/// call passes.
#[derive(Clone, Default)]
pub struct AuthLayer {
    authenticator: Option<Arc<Authenticator>>,
}

impl AuthLayer {
    pub fn new(authenticator: Option<Authenticator>) -> Self {
        Self {
            authenticator: authenticator.map(Arc::new),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Option<Arc<Authenticator>>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(authenticator) = &self.authenticator else {
            return Either::Right(self.inner.call(request));
        };
        match authenticator.check(request.uri().path(), request.headers()) {
            Ok(principal) => {
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                Either::Right(self.inner.call(request))
            }
            Err(status) => Either::Left(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# principal scopes token
ops    transcribe,train,admin  sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
kiosk  transcribe              kiosk-secret-token   # a trailing comment
";

    fn authenticator() -> Authenticator {
        let policy = AccessPolicy::new(
            "asr.v1.ModelService",
            &[
                ("Transcribe", Requirement::Scope(Scope::Transcribe)),
                ("GetModelInfo", Requirement::Authenticated),
                ("DeleteAdapter", Requirement::Scope(Scope::Admin)),
            ],
        );
        Authenticator::new(FILE.parse().unwrap(), policy)
    }

    fn headers(authorization: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, authorization.parse().unwrap());
        headers
    }

    #[test]
    fn scopes_decide_and_health_stays_open() {
        let auth = authenticator();
        let transcribe = "/asr.v1.ModelService/Transcribe";
        let delete = "/asr.v1.ModelService/DeleteAdapter";
        let kiosk = headers("Bearer kiosk-secret-token");
        let ops = headers("bearer password"); // the sha256 above is of "password"
        assert_eq!(
            auth.check(transcribe, &kiosk).unwrap(),
            Some(Principal("kiosk".into()))
        );
        assert_eq!(
            auth.check(delete, &kiosk).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            auth.check(delete, &ops).unwrap(),
            Some(Principal("ops".into()))
        );
        for bad in [
            "Bearer wrong-token-wrong",
            "Basic a2lvc2s=",
            "kiosk-secret-token",
        ] {
            assert_eq!(
                auth.check(transcribe, &headers(bad)).unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{bad}"
            );
        }
        let none = http::HeaderMap::new();
        assert_eq!(
            auth.check(transcribe, &none).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check("/grpc.health.v1.Health/Check", &none).unwrap(),
            None
        );
        // Listed as Authenticated: any valid token, no scope.
        assert!(auth
            .check("/asr.v1.ModelService/GetModelInfo", &kiosk)
            .is_ok());
        // Unlisted methods are closed to all but admins.
        let unlisted = "/asr.v1.ModelService/SomethingNew";
        assert_eq!(
            auth.check(unlisted, &kiosk).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(auth.check(unlisted, &ops).is_ok());
    }

    #[test]
    fn refusals_never_echo_the_token() {
        let auth = authenticator();
        let status = auth
            .check(
                "/asr.v1.ModelService/Transcribe",
                &headers("Bearer not-a-known-token-1234"),
            )
            .unwrap_err();
        assert!(!status.message().contains("not-a-known-token-1234"));
        assert!(!format!("{:?}", auth.tokens).contains("kiosk-secret-token"));
    }

    #[test]
    fn bad_token_files_name_the_line() {
        for (text, wanted) in [
            ("a transcribe", "line 1"),
            ("a read token-token-token-token", "unknown scope"),
            ("a transcribe short", "shorter than 16"),
            ("a transcribe sha256:abcd", "64 hex digits"),
            (
                "a transcribe token-token-token-1\nb train token-token-token-1",
                "line 2",
            ),
            (
                "a transcribe token-token-token-1\na train token-token-token-2",
                "appears twice",
            ),
            ("# nothing\n", "no tokens"),
        ] {
            let error = text.parse::<TokenTable>().unwrap_err().to_string();
            assert!(error.contains(wanted), "{text:?}: {error}");
        }
    }
}
