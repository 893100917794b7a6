//! The feature service over real gRPC on 127.0.0.1: streaming exactness, formats, bad input,
//! limits, cancellation, health and reflection.

use std::time::Duration;

use asr_audio::{InputFormat, PcmSpec, SampleFormat};
use asr_proto::v1 as pb;
use e2e_support::{
    assets, corpus_clips, our_windows, run_reference, start_feature_service, wav_i16, TestServer,
};
use feature_service::FeatureServiceConfig;
use pb::extract_request::Payload;
use pb::extract_response::Event;
use pb::feature_service_client::FeatureServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

#[derive(Debug)]
struct Extracted {
    info: pb::MelStreamInfo,
    frames: Vec<f32>,
    summary: pb::ExtractSummary,
}

async fn client(server: &TestServer) -> FeatureServiceClient<Channel> {
    FeatureServiceClient::connect(server.url())
        .await
        .expect("connect")
}

fn config(format: Option<pb::audio_format::Format>, n_mels: u32) -> pb::ExtractRequest {
    pb::ExtractRequest {
        payload: Some(Payload::Config(pb::ExtractConfig {
            format: format.map(|f| pb::AudioFormat { format: Some(f) }),
            n_mels,
            max_frames_per_message: 0,
        })),
    }
}

fn raw_pcm(
    sample_format: pb::SampleFormat,
    sample_rate_hz: u32,
    channels: u32,
) -> Option<pb::audio_format::Format> {
    Some(pb::audio_format::Format::RawPcm(pb::RawPcmFormat {
        sample_format: sample_format as i32,
        sample_rate_hz,
        channels,
        interleaved: None,
    }))
}

fn audio(bytes: &[u8]) -> pb::ExtractRequest {
    pb::ExtractRequest {
        payload: Some(Payload::Audio(bytes.to_vec())),
    }
}

/// Config + the bytes in chunks of `chunk` bytes.
fn requests(first: pb::ExtractRequest, bytes: &[u8], chunk: usize) -> Vec<pb::ExtractRequest> {
    std::iter::once(first)
        .chain(bytes.chunks(chunk).map(audio))
        .collect()
}

async fn extract(
    client: &mut FeatureServiceClient<Channel>,
    requests: Vec<pb::ExtractRequest>,
) -> Result<Extracted, tonic::Status> {
    let mut stream = client
        .extract(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let (mut info, mut summary, mut frames) = (None, None, Vec::new());
    while let Some(message) = stream.message().await? {
        match message.event.expect("event") {
            Event::Info(i) => {
                assert!(
                    info.is_none() && frames.is_empty(),
                    "info must come first, once"
                );
                info = Some(i);
            }
            Event::Frames(f) => {
                let n_mels = f.n_mels as usize;
                assert_eq!(
                    f.first_frame_index as usize,
                    frames.len() / n_mels,
                    "frames must be contiguous"
                );
                assert_eq!(f.values.len(), f.frame_count as usize * n_mels);
                frames.extend_from_slice(&f.values);
            }
            Event::Summary(s) => summary = Some(s),
        }
    }
    Ok(Extracted {
        info: info.expect("info"),
        frames,
        summary: summary.expect("summary"),
    })
}

/// `wav` encoded as `format` (flac, mp3, ogg) with libsndfile, in `dir`.
fn encode(wav: &std::path::Path, format: &str, dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join(format!("clip.{format}"));
    let (source, target) = (wav.to_str().expect("path"), path.to_str().expect("path"));
    run_reference("audio_tools.py", &["encode", source, format, target], None);
    std::fs::read(path).expect("encoded")
}

fn speech_wav(seconds: f32) -> Vec<u8> {
    let speech: Vec<f32> = corpus_clips("test", 3).concat();
    wav_i16(&speech[..(seconds * 16_000.0) as usize], 16_000, 1)
}

#[tokio::test]
async fn chunked_streams_give_bit_identical_frames() {
    let server = start_feature_service(FeatureServiceConfig::default()).await;
    let mut client = client(&server).await;
    let wav = speech_wav(3.0);
    let (_, local) = our_windows(wav.clone(), InputFormat::Encoded, 80);
    for chunk in [1, 160, 4000, 65536] {
        let got = extract(&mut client, requests(config(None, 80), &wav, chunk))
            .await
            .expect("extract");
        assert!(
            got.frames == local,
            "wav in {chunk}-byte chunks differs from one local call"
        );
        assert_eq!(got.summary.total_samples, 48_000);
        assert_eq!(got.summary.window_count, 1);
        assert_eq!(got.info.container, pb::Container::Wav as i32);
    }
    // Raw f32 PCM at 44.1 kHz, stereo: resampled and downmixed, still chunking-invariant.
    let samples: Vec<f32> = (0..44_100 * 2)
        .map(|i| ((i / 2) as f32 * 0.013).sin() * if i % 2 == 0 { 0.4 } else { 0.2 })
        .collect();
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let spec = PcmSpec::new(SampleFormat::F32Le, 44_100, 2).expect("spec");
    let (_, local) = our_windows(bytes.clone(), InputFormat::RawPcm(spec), 128);
    for chunk in [1, 160, 4000, 65536] {
        let first = config(raw_pcm(pb::SampleFormat::F32le, 44_100, 2), 128);
        let got = extract(&mut client, requests(first, &bytes, chunk))
            .await
            .expect("extract");
        assert!(
            got.frames == local,
            "f32 PCM in {chunk}-byte chunks differs from one local call"
        );
        assert_eq!(got.info.source_sample_rate_hz, 44_100);
        assert_eq!(got.info.n_mels, 128);
    }
    server.stop().await;
}

#[tokio::test]
async fn decodes_wav_flac_mp3_and_ogg_vorbis() {
    let server = start_feature_service(FeatureServiceConfig::default()).await;
    let mut client = client(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wav_path = assets().join("aishell/BAC009S0764W0121.wav");
    let wav = extract(
        &mut client,
        requests(
            config(None, 80),
            &std::fs::read(&wav_path).expect("wav"),
            4096,
        ),
    )
    .await
    .expect("wav");
    for (format, container, codec, bound) in [
        ("flac", pb::Container::Flac, pb::Codec::Flac, 0.0f32),
        ("mp3", pb::Container::Mp3, pb::Codec::Mp3, 0.02),
        ("ogg", pb::Container::Ogg, pb::Codec::Vorbis, 0.02),
    ] {
        let bytes = encode(&wav_path, format, dir.path());
        let got = extract(&mut client, requests(config(None, 80), &bytes, 4096))
            .await
            .expect(format);
        assert_eq!(got.info.container, container as i32, "{format}");
        assert_eq!(got.info.codec, codec as i32, "{format}");
        assert_eq!(got.info.source_sample_rate_hz, 16_000);
        assert_eq!(
            got.summary.total_samples, wav.summary.total_samples,
            "{format}: gapless length"
        );
        // Lossy codecs change the quiet parts' raw log power a lot; compare what the model sees.
        let ours = asr_audio::windows_from_frames(&got.frames, 80, 1).concat();
        let reference = asr_audio::windows_from_frames(&wav.frames, 80, 1).concat();
        let mean = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / reference.len() as f32;
        println!("{format}: mean |window - wav window| = {mean:.4}");
        assert!(mean <= bound, "{format}: mean difference {mean} > {bound}");
    }

    // Common Voice's format: 48 kHz mp3 (stereo here), against the 48 kHz source it came from.
    let source48 = dir.path().join("clip48k.wav");
    let mp3_48 = dir.path().join("clip48k.mp3");
    let tool = |args: &[&str]| run_reference("audio_tools.py", args, None);
    tool(&[
        "upsample",
        wav_path.to_str().expect("path"),
        "48000",
        source48.to_str().expect("path"),
    ]);
    tool(&[
        "encode",
        source48.to_str().expect("path"),
        "mp3",
        mp3_48.to_str().expect("path"),
    ]);
    let source = extract(
        &mut client,
        requests(
            config(None, 80),
            &std::fs::read(&source48).expect("wav"),
            4096,
        ),
    )
    .await
    .expect("48 kHz wav");
    let got = extract(
        &mut client,
        requests(
            config(None, 80),
            &std::fs::read(&mp3_48).expect("mp3"),
            4096,
        ),
    )
    .await
    .expect("48 kHz mp3");
    assert_eq!(
        (got.info.source_sample_rate_hz, got.info.source_channels),
        (48_000, 2)
    );
    assert_eq!(
        got.summary.total_samples, source.summary.total_samples,
        "48 kHz mp3: gapless length"
    );
    let ours = asr_audio::windows_from_frames(&got.frames, 80, 1).concat();
    let reference = asr_audio::windows_from_frames(&source.frames, 80, 1).concat();
    let mean = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / reference.len() as f32;
    println!("48 kHz stereo mp3: mean |window - source window| = {mean:.4}");
    assert!(mean <= 0.02, "48 kHz mp3: mean difference {mean}");
    server.stop().await;
}

struct BadCase {
    name: &'static str,
    requests: Vec<pb::ExtractRequest>,
    code: Code,
    message: &'static str,
    field: Option<&'static str>,
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let server = start_feature_service(FeatureServiceConfig {
        max_audio_seconds: 4.5,
        ..Default::default()
    })
    .await;
    let mut client = client(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wav_path = assets().join("aishell/BAC009S0764W0121.wav");
    let (mp3, flac) = (
        encode(&wav_path, "mp3", dir.path()),
        encode(&wav_path, "flac", dir.path()),
    );
    let good = speech_wav(1.0);
    let nan_pcm: Vec<u8> = [0.1f32, 0.2, f32::NAN, 0.3]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let cases = vec![
        BadCase {
            name: "garbage bytes",
            requests: requests(
                config(None, 80),
                b"definitely not an audio file, just text",
                7,
            ),
            code: Code::InvalidArgument,
            message: "not recognised",
            field: Some("audio"),
        },
        BadCase {
            name: "truncated mp3",
            requests: requests(config(None, 80), &mp3[..mp3.len() * 2 / 3], 4096),
            code: Code::InvalidArgument,
            message: "truncated",
            field: Some("audio"),
        },
        BadCase {
            name: "truncated flac",
            requests: requests(config(None, 80), &flac[..flac.len() / 2], 4096),
            code: Code::InvalidArgument,
            message: "truncated",
            field: Some("audio"),
        },
        BadCase {
            name: "zero-length audio",
            requests: vec![config(None, 80)],
            code: Code::InvalidArgument,
            message: "empty",
            field: Some("audio"),
        },
        BadCase {
            name: "zero-length raw PCM",
            requests: vec![
                config(raw_pcm(pb::SampleFormat::S16le, 16_000, 1), 80),
                audio(&[]),
            ],
            code: Code::InvalidArgument,
            message: "empty",
            field: Some("audio"),
        },
        BadCase {
            name: "NaN in f32 PCM",
            requests: requests(
                config(raw_pcm(pb::SampleFormat::F32le, 16_000, 1), 80),
                &nan_pcm,
                5,
            ),
            code: Code::InvalidArgument,
            message: "sample 2",
            field: Some("audio"),
        },
        BadCase {
            name: "sample rate 0",
            requests: requests(
                config(raw_pcm(pb::SampleFormat::S16le, 0, 1), 80),
                &[0; 64],
                64,
            ),
            code: Code::InvalidArgument,
            message: "sample_rate_hz",
            field: Some("config.format.raw_pcm.sample_rate_hz"),
        },
        BadCase {
            name: "n_mels 81",
            requests: requests(config(None, 81), &good, 4096),
            code: Code::InvalidArgument,
            message: "n_mels",
            field: Some("config.n_mels"),
        },
        BadCase {
            name: "longer than the limit",
            requests: requests(config(None, 80), &speech_wav(6.0), 4096),
            code: Code::ResourceExhausted,
            message: "max_audio_seconds=4.5",
            field: None,
        },
        BadCase {
            name: "config missing",
            requests: vec![audio(&good)],
            code: Code::InvalidArgument,
            message: "must be a config",
            field: Some("config"),
        },
        BadCase {
            name: "config sent twice",
            requests: vec![
                config(None, 80),
                audio(&good[..1000]),
                config(None, 80),
                audio(&good[1000..]),
            ],
            code: Code::InvalidArgument,
            message: "sent twice",
            field: Some("config"),
        },
        BadCase {
            name: "no messages at all",
            requests: vec![],
            code: Code::InvalidArgument,
            message: "ended before its config",
            field: Some("config"),
        },
    ];
    // A long stream runs alongside every bad one and must be unaffected.
    let mut bystander_client = client.clone();
    let long = speech_wav(4.0);
    let bystander = tokio::spawn(async move {
        let (tx, rx) = mpsc::channel(4);
        let sender = tokio::spawn(async move {
            tx.send(config(None, 80)).await.expect("send");
            for chunk in long.chunks(8000) {
                tx.send(audio(chunk)).await.expect("send");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut stream = bystander_client
            .extract(ReceiverStream::new(rx))
            .await
            .expect("bystander")
            .into_inner();
        let mut frames = 0;
        while let Some(message) = stream.message().await.expect("bystander stream") {
            if let Some(Event::Frames(f)) = message.event {
                frames += f.frame_count;
            }
        }
        sender.await.expect("sender");
        frames
    });
    for case in cases {
        let status = extract(&mut client, case.requests)
            .await
            .expect_err(case.name);
        println!(
            "{:<24} -> {:?}: {}",
            case.name,
            status.code(),
            status.message()
        );
        assert_eq!(
            status.code(),
            case.code,
            "{}: {}",
            case.name,
            status.message()
        );
        assert!(
            status.message().contains(case.message),
            "{}: message {:?} lacks {:?}",
            case.name,
            status.message(),
            case.message
        );
        if let Some(field) = case.field {
            let details = status.get_error_details();
            let violations = &details
                .bad_request()
                .unwrap_or_else(|| panic!("{}: no BadRequest details", case.name))
                .field_violations;
            assert_eq!(violations[0].field, field, "{}", case.name);
        }
        // The server still serves.
        let ok = extract(&mut client, requests(config(None, 80), &good, 4096))
            .await
            .expect("good stream after a bad one");
        assert_eq!(ok.summary.total_samples, 16_000);
    }
    assert_eq!(
        bystander.await.expect("bystander task"),
        402,
        "the long stream got all its frames"
    );
    server.stop().await;
}

#[tokio::test]
async fn concurrent_streams_share_the_replica_and_cancelled_ones_free_their_slot() {
    let server = start_feature_service(FeatureServiceConfig {
        max_concurrent_streams: 3,
        ..Default::default()
    })
    .await;
    let client = client(&server).await;
    let wav = speech_wav(2.0);
    let (_, local) = our_windows(wav.clone(), InputFormat::Encoded, 80);

    // Three open streams that never finish hold every slot.
    let mut held = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = mpsc::channel(4);
        tx.send(config(None, 80)).await.expect("send");
        tx.send(audio(&wav[..20_000])).await.expect("send");
        let mut c = client.clone();
        let mut stream = c
            .extract(ReceiverStream::new(rx))
            .await
            .expect("open")
            .into_inner();
        let first = stream.message().await.expect("message").expect("info");
        assert!(matches!(first.event, Some(Event::Info(_))));
        held.push((tx, stream));
    }
    let mut c = client.clone();
    let status = extract(&mut c, requests(config(None, 80), &wav, 4096))
        .await
        .expect_err("a fourth stream");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_concurrent_streams=3"),
        "{}",
        status.message()
    );

    // Cancel one: dropping both halves cancels the call and its pipeline must stop.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match extract(&mut c, requests(config(None, 80), &wav, 4096)).await {
            Ok(got) => {
                assert!(got.frames == local);
                break;
            }
            Err(status)
                if status.code() == Code::ResourceExhausted
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("the cancelled stream's slot was not freed: {status}"),
        }
    }
    drop(held);

    // Many streams at once on a roomier replica, all exact.
    let server2 = start_feature_service(FeatureServiceConfig::default()).await;
    let client2 = FeatureServiceClient::connect(server2.url())
        .await
        .expect("connect");
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let mut c = client2.clone();
            let wav = wav.clone();
            tokio::spawn(async move {
                extract(&mut c, requests(config(None, 80), &wav, 1000 + i * 97)).await
            })
        })
        .collect();
    for task in tasks {
        let got = task.await.expect("task").expect("concurrent stream");
        assert!(got.frames == local, "a concurrent stream differs");
    }
    server2.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn serves_health_reflection_and_info() {
    let server = start_feature_service(FeatureServiceConfig {
        model_service: Some("http://model:50052".into()),
        ..Default::default()
    })
    .await;
    let channel = Channel::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let response = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "asr.v1.FeatureService".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        response.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection message")
        .expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["asr.v1.FeatureService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "reflection lists {names:?}, missing {expected}"
        );
    }

    let mut client = FeatureServiceClient::new(channel);
    let info = client
        .get_info(pb::GetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.model_service_address, "http://model:50052");
    assert_eq!(info.supported_n_mels, vec![80, 128]);
    assert_eq!(info.limits.expect("limits").default_frames_per_message, 100);
    server.stop().await;
}

/// Frames leave as soon as their 400 samples have arrived, before the client half-closes.
#[tokio::test]
async fn frames_stream_before_the_input_ends() {
    let server = start_feature_service(FeatureServiceConfig::default()).await;
    let mut client = client(&server).await;
    let wav = speech_wav(3.0);
    let pcm = &wav[44..];
    for (name, first, bytes, split, expected_frames) in [
        // 1 s of 16 kHz PCM: frames 0..=98 are complete (frame i needs samples up to 160 i + 199).
        (
            "raw PCM",
            config(raw_pcm(pb::SampleFormat::S16le, 16_000, 1), 80),
            pcm,
            32_000,
            99,
        ),
        // wav: the header and 1 s of samples; the demuxer works in packets, so allow a packet less.
        ("wav", config(None, 80), &wav[..], 44 + 32_000, 80),
    ] {
        let (tx, rx) = mpsc::channel(4);
        tx.send(first).await.expect("send");
        tx.send(audio(&bytes[..split])).await.expect("send");
        let mut stream = client
            .extract(ReceiverStream::new(rx))
            .await
            .expect("extract")
            .into_inner();
        let mut frames = 0;
        while frames < expected_frames {
            let message = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .unwrap_or_else(|_| {
                    panic!("{name}: only {frames} frames arrived while the stream stayed open")
                })
                .expect("stream")
                .expect("message");
            if let Some(Event::Frames(f)) = message.event {
                frames += f.frame_count;
            }
        }
        println!("{name}: {frames} frames arrived before the rest of the audio was sent");
        tx.send(audio(&bytes[split..])).await.expect("send");
        drop(tx);
        while stream.message().await.expect("stream").is_some() {}
    }
    server.stop().await;
}
