//! `asr bench services`: the espeak-ng test split transcribed through both services (audio to
//! the feature service, frames to the model service) with 1, 4 and 8 concurrent clients,
//! against the in-process CLI path on the same clips and the same machine: throughput in audio
//! seconds per second, latency to the final result, the cost of the two gRPC hops, and the
//! gain from batching. The services are this build's binaries, started on loopback.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use asr_audio::pipeline::extract_all;
use asr_audio::{FeaturePipeline, InputFormat, MelConfig, PipelineConfig};
use asr_proto::v1 as pb;
use asr_whisper::{DecodeOptions, LoadOptions, LoadedModel, Precision};
use clap::Args;
use pb::feature_service_client::FeatureServiceClient;
use pb::transcribe_audio_request::Payload;

use super::spawn::start;

#[derive(Args)]
pub struct ServicesBenchArgs {
    #[arg(long, default_value = "assets/corpus/espeak/test.jsonl")]
    manifest: PathBuf,
    #[arg(long, default_value = "assets/whisper-base")]
    model: PathBuf,
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    clients: Vec<usize>,
    /// Only the first N clips.
    #[arg(long)]
    max_clips: Option<usize>,
}

struct Clip {
    bytes: Vec<u8>,
    seconds: f64,
}

fn options() -> pb::TranscriptionOptions {
    // One greedy pass, as the in-process side: sampled fallbacks would make the work random.
    pb::TranscriptionOptions {
        language: "zh".into(),
        decoding: Some(pb::DecodingOptions {
            temperature_increment: Some(0.0),
            compression_ratio_threshold: Some(0.0),
            log_prob_threshold: Some(f32::NEG_INFINITY),
            no_speech_threshold: Some(1.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One clip through the feature service: (latency to the summary, text).
async fn transcribe(
    client: &mut FeatureServiceClient<tonic::transport::Channel>,
    bytes: &[u8],
) -> anyhow::Result<(Duration, String)> {
    let started = Instant::now();
    let mut messages = vec![pb::TranscribeAudioRequest {
        payload: Some(Payload::Config(pb::TranscribeAudioConfig {
            format: None,
            options: Some(options()),
        })),
    }];
    messages.extend(bytes.chunks(64 * 1024).map(|c| pb::TranscribeAudioRequest {
        payload: Some(Payload::Audio(c.to_vec())),
    }));
    let mut stream = client
        .transcribe(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut texts = Vec::new();
    while let Some(response) = stream.message().await? {
        if let Some(pb::transcribe_response::Event::Segment(s)) = response.event {
            texts.push(s.text);
        }
    }
    Ok((started.elapsed(), texts.join(" ")))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: ServicesBenchArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("reading {}", args.manifest.display()))?;
    let base = args.manifest.parent().unwrap_or(Path::new("."));
    let mut clips = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line)?;
        let audio = base.join(entry["audio"].as_str().context("audio")?);
        clips.push(Clip {
            bytes: std::fs::read(&audio).with_context(|| format!("reading {}", audio.display()))?,
            seconds: entry["duration_s"].as_f64().unwrap_or(0.0),
        });
    }
    if let Some(n) = args.max_clips {
        clips.truncate(n);
    }
    let audio_seconds: f64 = clips.iter().map(|c| c.seconds).sum();
    println!(
        "services benchmark: {} clips, {audio_seconds:.1} s of audio, whisper-base int8, greedy, language zh; cpus {}",
        clips.len(),
        super::cpus_allowed()
    );

    // In-process, as `asr transcribe --local`: features then decoding, clip after clip.
    let model = LoadedModel::load(
        &args.model,
        LoadOptions {
            precision: Precision::Int8,
            ..Default::default()
        },
    )?;
    let pipeline = FeaturePipeline::new(PipelineConfig {
        mel: MelConfig::new(model.n_mels() as u32)?,
        ..Default::default()
    });
    let decode = DecodeOptions {
        language: Some("zh".into()),
        ..Default::default()
    }
    .without_fallback();
    let in_process_text = |clip: &Clip| -> anyhow::Result<String> {
        let (_, frames, summary) = extract_all(
            &pipeline,
            std::io::Cursor::new(clip.bytes.clone()),
            InputFormat::Encoded,
        )?;
        let windows =
            asr_audio::windows_from_frames(&frames, model.n_mels(), summary.windows as usize);
        Ok(model
            .transcribe_windows(&windows, &decode)?
            .iter()
            .map(|t| t.text.trim().to_string())
            .collect::<Vec<_>>()
            .join(" "))
    };
    in_process_text(&clips[0])?; // warm-up
    let started = Instant::now();
    let mut reference = Vec::with_capacity(clips.len());
    let mut latencies = Vec::with_capacity(clips.len());
    for clip in &clips {
        let t = Instant::now();
        reference.push(in_process_text(clip)?);
        latencies.push(t.elapsed().as_secs_f64());
    }
    let in_process_wall = started.elapsed().as_secs_f64();
    drop(model);
    latencies.sort_by(f64::total_cmp);
    println!();
    println!(
        "{:<22} {:>7} {:>10} {:>12} {:>9} {:>9} {:>12} {:>10}",
        "path", "clients", "wall s", "audio-s/s", "p50 s", "p95 s", "vs in-proc", "same text"
    );
    println!(
        "{:<22} {:>7} {:>10.2} {:>12.2} {:>9.3} {:>9.3} {:>12} {:>10}",
        "in-process (CLI path)",
        1,
        in_process_wall,
        audio_seconds / in_process_wall,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        "1.000",
        "-"
    );

    let data_root = tempfile::tempdir()?;
    let model_dir = args.model.display().to_string();
    let data_dir = data_root.path().display().to_string();
    let (_model_service, model_url) = start(
        "model-service",
        &[
            "--model",
            &model_dir,
            "--data-root",
            &data_dir,
            "--device",
            "cpu",
        ],
    )?;
    let (_feature_service, feature_url) =
        start("feature-service", &["--model-service", &model_url])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clips = Arc::new(clips);
    let reference = Arc::new(reference);
    let mut throughputs: Vec<(usize, f64)> = Vec::new();
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(feature_url.clone())?
            .connect()
            .await?;
        let mut client = FeatureServiceClient::new(channel);
        // The model loads in the background: wait for it, and warm up.
        let mut ready = false;
        for _ in 0..600 {
            if transcribe(&mut client, &clips[0].bytes).await.is_ok() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::ensure!(ready, "the services never answered");
        for &clients in &args.clients {
            let next = Arc::new(AtomicUsize::new(0));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..clients.max(1) {
                let (mut client, next, clips, reference) = (
                    client.clone(),
                    next.clone(),
                    clips.clone(),
                    reference.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= clips.len() {
                            return Ok::<_, anyhow::Error>(out);
                        }
                        let (latency, text) = transcribe(&mut client, &clips[i].bytes).await?;
                        out.push((latency.as_secs_f64(), text == reference[i]));
                    }
                }));
            }
            let mut latencies = Vec::new();
            let mut same = 0;
            for task in tasks {
                for (latency, equal) in task.await?? {
                    latencies.push(latency);
                    same += usize::from(equal);
                }
            }
            let wall = started.elapsed().as_secs_f64();
            latencies.sort_by(f64::total_cmp);
            throughputs.push((clients, audio_seconds / wall));
            println!(
                "{:<22} {:>7} {:>10.2} {:>12.2} {:>9.3} {:>9.3} {:>12.3} {:>6}/{}",
                "services (2 hops)",
                clients,
                wall,
                audio_seconds / wall,
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.95),
                in_process_wall / wall,
                same,
                clips.len()
            );
        }
        Ok(())
    })?;
    println!();
    println!("vs in-proc = throughput / in-process throughput (below 1: the hops cost; above: batching gains)");
    let one = throughputs.iter().find(|(c, _)| *c == 1).map(|(_, t)| *t);
    if let Some(one) = one {
        let cost = (audio_seconds / in_process_wall) / one - 1.0;
        println!(
            "cost of the two hops at 1 client: {:+.1}% wall time (goal < 5%)",
            cost * 100.0
        );
        for (clients, throughput) in throughputs.iter().filter(|(c, _)| *c > 1) {
            println!(
                "{clients} clients / 1 client: {:.2}x throughput (goal for 8: >= 1.5x)",
                throughput / one
            );
        }
    }
    Ok(())
}
