//! TLS and bearer tokens on both services and on the feature -> model hop, with a CA made here
//! (rcgen) and whisper-base behind them:
//! - the model service serves mutual TLS: plaintext, a client without a certificate and one
//!   with a certificate from another CA are all refused;
//! - scopes: no token or a wrong one is UNAUTHENTICATED, a token without the method's scope
//!   PERMISSION_DENIED, and the right scope passes (health stays open);
//! - a clip goes through both services over TLS with the relay's own token, from a Rust client
//!   and from the `asr` CLI (`--tls-ca`, ASR_TOKEN); a feature service whose token the model
//!   service refuses reports INTERNAL naming its own credentials, not the client's;
//! - no token appears in anything logged meanwhile (every target at debug level).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use asr_proto::v1 as pb;
use asr_runtime::{AuthChannel, ClientSecurity, ClientSecurityConfig, ServerSecurityArgs};
use e2e_support::whisper_base::{model_dir, test_clips};
use e2e_support::{asr_cli, deterministic_decoding, start_feature_service, start_model_service};
use feature_service::FeatureServiceConfig;
use model_service::ModelServiceConfig;
use pb::feature_service_client::FeatureServiceClient;
use pb::model_service_client::ModelServiceClient;
use pb::transcribe_audio_request::Payload;
use pb::transcribe_response::Event;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tonic::Code;

const READER: &str = "reader-token-0123456789";
const TRAINER: &str = "trainer-token-0123456789";
const OPS: &str = "ops-token-0123456789abcdef";
const RELAY: &str = "relay-token-0123456789";
const UNKNOWN: &str = "unknown-token-0123456789";

/// Certificates and keys as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A CA, a server certificate for localhost and 127.0.0.1, a client certificate from the
    /// CA, and a client certificate from another ("rogue") CA.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>,
                    names: &[&str],
                    usage: ExtendedKeyUsagePurpose,
                    file: &str| {
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, names[0]);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, issuer).unwrap();
            write(&format!("{file}.pem"), cert.pem());
            write(&format!("{file}.key"), key.serialize_pem());
        };
        let trusted = ca("asr test CA");
        write("ca.pem", trusted.pem());
        leaf(
            &trusted,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(
            &trusted,
            &["feature-service"],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        let rogue = ca("rogue CA");
        leaf(
            &rogue,
            &["intruder"],
            ExtendedKeyUsagePurpose::ClientAuth,
            "rogue",
        );
        Self { dir }
    }

    fn tokens_file(&self) -> PathBuf {
        let ops_digest: String = {
            use std::fmt::Write as _;
            let digest = <sha2::Sha256 as sha2::Digest>::digest(OPS.as_bytes());
            digest.iter().fold(String::new(), |mut hex, byte| {
                let _ = write!(hex, "{byte:02x}");
                hex
            })
        };
        let path = self.path("tokens");
        std::fs::write(
            &path,
            format!(
                "# principal scopes token\n\
                 reader  transcribe         {READER}\n\
                 trainer train              {TRAINER}\n\
                 ops     transcribe,train,admin sha256:{ops_digest}\n\
                 relay   transcribe,train   {RELAY}\n"
            ),
        )
        .unwrap();
        path
    }

    /// TLS with this CA's server certificate, clients verified against `client_ca` if given.
    fn server(&self, client_ca: bool) -> ServerSecurityArgs {
        ServerSecurityArgs {
            tls_cert: Some(self.path("server.pem")),
            tls_key: Some(self.path("server.key")),
            tls_client_ca: client_ca.then(|| self.path("ca.pem")),
            auth_tokens: Some(self.tokens_file()),
        }
    }

    /// A client trusting this CA, presenting `identity` ("client", "rogue" or none).
    fn client(&self, identity: Option<&str>, token: Option<&str>) -> ClientSecurity {
        ClientSecurity::new(&ClientSecurityConfig {
            tls_ca: Some(self.path("ca.pem")),
            tls_cert: identity.map(|name| self.path(&format!("{name}.pem"))),
            tls_key: identity.map(|name| self.path(&format!("{name}.key"))),
            token: token.map(str::to_string),
            ..Default::default()
        })
        .expect("client security")
    }
}

/// Everything logged in this test binary, at debug level for every target.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn install() -> Self {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        captured
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn https(addr: std::net::SocketAddr) -> String {
    format!("https://{addr}")
}

async fn model_client(security: &ClientSecurity, url: &str) -> ModelServiceClient<AuthChannel> {
    ModelServiceClient::new(security.connect(url).await.expect("connect"))
}

/// A call the server never answered: the status was made on this side from a transport
/// error (which one depends on when the handshake broke: UNAVAILABLE, UNKNOWN or INTERNAL).
fn assert_transport_failure(status: &tonic::Status) {
    use std::error::Error as _;
    assert!(status.source().is_some(), "{status:?}");
}

fn code_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(status) => status.code(),
    }
}

/// A clip through FeatureService.Transcribe: the text, or the status that ended the stream.
async fn transcribe(
    client: &mut FeatureServiceClient<AuthChannel>,
    path: &Path,
) -> Result<String, tonic::Status> {
    let mut messages = vec![pb::TranscribeAudioRequest {
        payload: Some(Payload::Config(pb::TranscribeAudioConfig {
            format: None,
            options: Some(pb::TranscriptionOptions {
                language: "zh".into(),
                decoding: Some(deterministic_decoding()),
                ..Default::default()
            }),
        })),
    }];
    let bytes = std::fs::read(path).expect("clip");
    messages.extend(bytes.chunks(64 * 1024).map(|c| pb::TranscribeAudioRequest {
        payload: Some(Payload::Audio(c.to_vec())),
    }));
    let mut stream = client
        .transcribe(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut text = String::new();
    while let Some(response) = stream.message().await? {
        if let Some(Event::Segment(segment)) = response.event {
            text.push_str(&segment.text);
        }
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_scoped_tokens_guard_both_services_and_the_hop() {
    let logs = Captured::install();
    let pki = Pki::new();
    let data_root = tempfile::tempdir().expect("tempdir");
    let (model, _handle) = start_model_service(ModelServiceConfig {
        model: Some(model_dir()),
        data_root: data_root.path().to_path_buf(),
        device: "cpu".into(),
        security: pki.server(true),
        ..Default::default()
    })
    .await;
    let model_url = https(model.addr);

    // Mutual TLS: plaintext, no client certificate and a rogue one never get an answer.
    let plaintext = ModelServiceClient::connect(format!("http://{}", model.addr)).await;
    if let Ok(mut client) = plaintext {
        let status = client
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .expect_err("plaintext to a TLS port");
        assert_transport_failure(&status);
    }
    for identity in [None, Some("rogue")] {
        let security = pki.client(identity, Some(OPS));
        if let Ok(channel) = security.connect(&model_url).await {
            let status = ModelServiceClient::new(channel)
                .get_model_info(pb::GetModelInfoRequest {})
                .await
                .expect_err("a client without the CA's certificate");
            assert_transport_failure(&status);
        }
    }

    // Scopes on the model service (with the CA's client certificate).
    let anonymous = pki.client(Some("client"), None);
    let health = tonic_health::pb::health_client::HealthClient::new(
        anonymous.connect(&model_url).await.expect("connect"),
    )
    .check(tonic_health::pb::HealthCheckRequest {
        service: "asr.v1.ModelService".into(),
    })
    .await
    .expect("health needs no token")
    .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    let mut nobody = model_client(&anonymous, &model_url).await;
    assert_eq!(
        code_of(nobody.get_model_info(pb::GetModelInfoRequest {}).await),
        Code::Unauthenticated
    );
    let mut unknown = model_client(&pki.client(Some("client"), Some(UNKNOWN)), &model_url).await;
    assert_eq!(
        code_of(unknown.get_model_info(pb::GetModelInfoRequest {}).await),
        Code::Unauthenticated
    );
    let mut reader = model_client(&pki.client(Some("client"), Some(READER)), &model_url).await;
    let info = reader
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .expect("any valid token reads the model's facts")
        .into_inner();
    assert_eq!(info.model_name, "whisper-base");
    assert_eq!(
        code_of(
            reader
                .list_datasets(pb::ListDatasetsRequest::default())
                .await
        ),
        Code::PermissionDenied
    );
    let delete = || pb::DeleteAdapterRequest {
        name: "no-such-adapter".into(),
    };
    assert_eq!(
        code_of(reader.delete_adapter(delete()).await),
        Code::PermissionDenied
    );
    let mut trainer = model_client(&pki.client(Some("client"), Some(TRAINER)), &model_url).await;
    trainer
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("train scope lists datasets");
    assert_eq!(
        code_of(trainer.delete_adapter(delete()).await),
        Code::PermissionDenied
    );
    let refused = trainer
        .transcribe(tokio_stream::iter(Vec::<pb::TranscribeFramesRequest>::new()))
        .await
        .expect_err("train scope cannot transcribe");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("transcribe") && refused.message().contains("trainer"),
        "{}",
        refused.message()
    );
    let mut ops = model_client(&pki.client(Some("client"), Some(OPS)), &model_url).await;
    assert_eq!(
        code_of(ops.delete_adapter(delete()).await),
        Code::NotFound,
        "admin passes the check and reaches the registry"
    );

    // The feature service: TLS (no client certificate asked), tokens, and its own hop
    // credentials towards the model service.
    let hop = |token: &str| FeatureServiceConfig {
        model_service: Some(model_url.clone()),
        model_service_tls_ca: Some(pki.path("ca.pem")),
        model_service_tls_cert: Some(pki.path("client.pem")),
        model_service_tls_key: Some(pki.path("client.key")),
        model_service_token: Some(token.to_string()),
        security: pki.server(false),
        ..Default::default()
    };
    let features = start_feature_service(hop(RELAY)).await;
    let features_url = https(features.addr);
    let clip = &test_clips(1)[0].path;
    let feature_client = |token: Option<&str>| {
        let security = pki.client(None, token);
        let url = features_url.clone();
        async move { FeatureServiceClient::new(security.connect(&url).await.expect("connect")) }
    };
    assert_eq!(
        code_of(
            feature_client(None)
                .await
                .get_info(pb::GetInfoRequest {})
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(transcribe(&mut feature_client(Some(TRAINER)).await, clip).await),
        Code::PermissionDenied
    );
    let text = transcribe(&mut feature_client(Some(READER)).await, clip)
        .await
        .expect("reader transcribes through both services over TLS");
    assert!(
        text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
        "no Chinese in {text:?}"
    );

    // The CLI, as a user runs it.
    let cli = |token: Option<&str>| {
        let mut command = std::process::Command::new(asr_cli());
        command
            .args(["transcribe", "--language", "zh", "--server", &features_url])
            // The deterministic decoding the Rust client asks for.
            .args(["--temperature", "0", "--compression-ratio-threshold", "-1"])
            .args(["--logprob-threshold", "-1e30", "--no-speech-threshold", "1"])
            .arg("--tls-ca")
            .arg(pki.path("ca.pem"))
            .arg(clip)
            .env_remove("ASR_TOKEN")
            .env_remove("ASR_TOKEN_FILE");
        if let Some(token) = token {
            command.env("ASR_TOKEN", token);
        }
        command.output().expect("asr runs")
    };
    let output = cli(Some(READER));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "asr transcribe: {stderr}");
    let cli_text: String = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .collect();
    assert_eq!(cli_text, text.split_whitespace().collect::<String>());
    let output = cli(None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("bearer token"), "{stderr}");
    assert!(!stderr.contains(READER));

    // A relay whose token the model service refuses: the client learns it is the relay's.
    let misconfigured = start_feature_service(hop(UNKNOWN)).await;
    let mut client = FeatureServiceClient::new(
        pki.client(None, Some(READER))
            .connect(&https(misconfigured.addr))
            .await
            .expect("connect"),
    );
    let status = transcribe(&mut client, clip)
        .await
        .expect_err("the hop's token is refused");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("feature service's credentials"),
        "{}",
        status.message()
    );

    misconfigured.stop().await;
    features.stop().await;
    model.stop().await;
    let logged = logs.text();
    assert!(
        logged.contains("call refused: scope missing") && logged.contains("principal=reader"),
        "the refusals were not logged (is the capture working?)"
    );
    for token in [READER, TRAINER, OPS, RELAY, UNKNOWN] {
        assert!(!logged.contains(token), "a token was logged");
    }
}
