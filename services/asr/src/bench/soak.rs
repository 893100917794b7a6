//! `asr bench soak`: both services (this build's binaries, loopback only) driven by many
//! concurrent clients for a bounded time and request count. Each request is one of:
//! - a whole espeak clip (most);
//! - a long clip of 36 or 63 s, several windows;
//! - a clip whose client cancels part-way;
//! - audio that is no audio (INVALID_ARGUMENT expected);
//! - an unknown language (INVALID_ARGUMENT expected).
//!
//! More clients than the feature service takes streams, so some are refused; those refusals
//! must come at once. The report gives requests by outcome and gRPC code, latency
//! percentiles, how fast refusals came, each service's peak RSS, and whether RSS stayed flat
//! after warm-up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use asr_proto::v1 as pb;
use clap::Args;
use pb::feature_service_client::FeatureServiceClient;
use pb::transcribe_audio_request::Payload;
use tonic::transport::Channel;

use super::spawn::start;

#[derive(Args)]
pub struct SoakArgs {
    #[arg(long, default_value = "assets/corpus/espeak/test.jsonl")]
    manifest: PathBuf,
    #[arg(long, default_value = "assets/whisper-base")]
    model: PathBuf,
    /// How long to drive the services, in seconds.
    #[arg(long, default_value_t = 180.0)]
    seconds: f64,
    /// Requests at most (the run ends at whichever bound comes first).
    #[arg(long, default_value_t = 100_000)]
    max_requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 12)]
    clients: usize,
    /// The feature service's stream limit; clients beyond it are refused.
    #[arg(long, default_value_t = 8)]
    max_streams: usize,
    /// Seed of the clients' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Clip,
    Long,
    Cancel,
    BadAudio,
    BadOption,
}

/// How a request ended: a gRPC code name, or "CANCELLED_BY_CLIENT".
struct Outcome {
    kind: Kind,
    ended: &'static str,
    seconds: f64,
    /// Since the start of the run, for the timeline.
    at: f64,
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// SplitMix64: the clients' choices, reproducible from --seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

fn options(language: &str) -> pb::TranscriptionOptions {
    pb::TranscriptionOptions {
        language: language.into(),
        ..Default::default()
    }
}

fn messages(bytes: &[u8], language: &str) -> Vec<pb::TranscribeAudioRequest> {
    let mut messages = vec![pb::TranscribeAudioRequest {
        payload: Some(Payload::Config(pb::TranscribeAudioConfig {
            format: None,
            options: Some(options(language)),
        })),
    }];
    messages.extend(bytes.chunks(64 * 1024).map(|c| pb::TranscribeAudioRequest {
        payload: Some(Payload::Audio(c.to_vec())),
    }));
    messages
}

/// One request to its end (or, for `cancel_after`, until the client walks away).
async fn request(
    client: &mut FeatureServiceClient<Channel>,
    bytes: &[u8],
    language: &str,
    cancel_after: Option<Duration>,
) -> &'static str {
    let call = async {
        let mut stream = client
            .transcribe(tokio_stream::iter(messages(bytes, language)))
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    };
    match cancel_after {
        Some(after) => match tokio::time::timeout(after, call).await {
            Ok(Ok(())) => "OK",
            Ok(Err(status)) => code_name(status.code()),
            Err(_) => "CANCELLED_BY_CLIENT",
        },
        None => match call.await {
            Ok(()) => "OK",
            Err(status) => code_name(status.code()),
        },
    }
}

struct Clips {
    short: Vec<Vec<u8>>,
    long: Vec<Vec<u8>>,
}

fn load_clips(manifest: &std::path::Path) -> anyhow::Result<Clips> {
    let paths = super::manifest_audio(manifest)?;
    let short = paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // 16 and 28 clips end to end: about 36 and 63 s, two and three windows.
    let mut long = Vec::new();
    for count in [16, 28] {
        let mut samples = Vec::new();
        for path in paths.iter().cycle().take(count) {
            samples.extend(super::decode(path)?);
        }
        long.push(super::features::wav_f32(&samples));
    }
    Ok(Clips { short, long })
}

/// One client: requests one after the other until the time or the count runs out.
async fn client_loop(
    mut client: FeatureServiceClient<Channel>,
    clips: Arc<Clips>,
    mut random: Random,
    started: Instant,
    end: Instant,
    budget: Arc<std::sync::atomic::AtomicUsize>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
) {
    use std::sync::atomic::Ordering;
    while Instant::now() < end && budget.fetch_sub(1, Ordering::Relaxed) > 0 {
        let roll = random.below(100);
        let clip = &clips.short[random.below(clips.short.len() as u64) as usize];
        let t = Instant::now();
        let (kind, ended) = match roll {
            0..=64 => (Kind::Clip, request(&mut client, clip, "zh", None).await),
            65..=74 => {
                let long = &clips.long[random.below(clips.long.len() as u64) as usize];
                (Kind::Long, request(&mut client, long, "zh", None).await)
            }
            75..=84 => {
                let after = Duration::from_millis(100 + random.below(900));
                (
                    Kind::Cancel,
                    request(&mut client, clip, "zh", Some(after)).await,
                )
            }
            85..=92 => {
                let noise: Vec<u8> = (0..4096).map(|_| random.next() as u8).collect();
                (
                    Kind::BadAudio,
                    request(&mut client, &noise, "zh", None).await,
                )
            }
            _ => (
                Kind::BadOption,
                request(&mut client, clip, "klingon", None).await,
            ),
        };
        let seconds = t.elapsed().as_secs_f64();
        outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Outcome {
                kind,
                ended,
                seconds,
                at: started.elapsed().as_secs_f64(),
            });
        if ended == "RESOURCE_EXHAUSTED" {
            // As a well-behaved client: back off before trying again.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// (seconds since start, feature-service RSS, model-service RSS), once a second.
type RssSamples = Vec<(f64, u64, u64)>;

fn median_rss(samples: &RssSamples, from: f64, to: f64, pick: fn(&(f64, u64, u64)) -> u64) -> u64 {
    let mut window: Vec<u64> = samples
        .iter()
        .filter(|s| s.0 >= from && s.0 <= to)
        .map(pick)
        .collect();
    window.sort_unstable();
    window.get(window.len() / 2).copied().unwrap_or(0)
}

pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    let clips = Arc::new(load_clips(&args.manifest)?);
    let data_root = tempfile::tempdir()?;
    let model_dir = args.model.display().to_string();
    let (model_service, model_url) = start(
        "model-service",
        &[
            "--model",
            &model_dir,
            "--data-root",
            &data_root.path().display().to_string(),
            "--device",
            "cpu",
        ],
    )?;
    let max_streams = args.max_streams.to_string();
    let (feature_service, feature_url) = start(
        "feature-service",
        &[
            "--model-service",
            &model_url,
            "--max-concurrent-streams",
            &max_streams,
        ],
    )?;
    println!(
        "soak: {} clients (the feature service takes {}), {:.0} s or {} requests, {} clips + 2 long ones, cpus {}",
        args.clients,
        args.max_streams,
        args.seconds,
        args.max_requests,
        clips.short.len(),
        super::cpus_allowed()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let services = [&feature_service, &model_service];
    let (outcomes, rss, healthy_after) = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(feature_url.clone())?
            .connect()
            .await?;
        let mut probe = FeatureServiceClient::new(channel.clone());
        let mut ready = false;
        for _ in 0..600 {
            if request(&mut probe, &clips.short[0], "zh", None).await == "OK" {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::ensure!(ready, "the services never answered");
        let started = Instant::now();
        let end = started + Duration::from_secs_f64(args.seconds);
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let budget = Arc::new(std::sync::atomic::AtomicUsize::new(args.max_requests));
        let mut tasks = Vec::new();
        for i in 0..args.clients {
            // A connection per client, as separate programs would have.
            let channel = tonic::transport::Endpoint::from_shared(feature_url.clone())?
                .connect()
                .await?;
            tasks.push(tokio::spawn(client_loop(
                FeatureServiceClient::new(channel),
                clips.clone(),
                Random(args.seed.wrapping_mul(1000).wrapping_add(i as u64)),
                started,
                end,
                budget.clone(),
                outcomes.clone(),
            )));
        }
        let mut rss: RssSamples = Vec::new();
        while tasks.iter().any(|t| !t.is_finished()) {
            rss.push((
                started.elapsed().as_secs_f64(),
                services[0].rss_bytes(),
                services[1].rss_bytes(),
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for task in tasks {
            task.await?;
        }
        // Still serving, and serving right, after all that.
        let healthy_after = request(&mut probe, &clips.short[0], "zh", None).await == "OK";
        let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|e| e.into_inner()));
        Ok::<_, anyhow::Error>((outcomes, rss, healthy_after))
    })?;
    report(&outcomes, &rss, healthy_after);
    Ok(())
}

fn report(outcomes: &[Outcome], rss: &RssSamples, healthy_after: bool) {
    let wall = outcomes.iter().map(|o| o.at).fold(0.0, f64::max);
    println!(
        "\n{} requests in {wall:.0} s ({:.2}/s)\n",
        outcomes.len(),
        outcomes.len() as f64 / wall.max(1e-9)
    );
    let mut table: BTreeMap<(Kind, &str), Vec<f64>> = BTreeMap::new();
    for o in outcomes {
        table.entry((o.kind, o.ended)).or_default().push(o.seconds);
    }
    println!(
        "{:<10} {:<22} {:>6} {:>8} {:>8} {:>8}",
        "request", "ended", "count", "p50 s", "p95 s", "p99 s"
    );
    for ((kind, ended), seconds) in &mut table {
        seconds.sort_by(f64::total_cmp);
        println!(
            "{:<10} {:<22} {:>6} {:>8.3} {:>8.3} {:>8.3}",
            format!("{kind:?}"),
            ended,
            seconds.len(),
            percentile(seconds, 0.5),
            percentile(seconds, 0.95),
            percentile(seconds, 0.99)
        );
    }
    let mut by_code: BTreeMap<&str, usize> = BTreeMap::new();
    for o in outcomes {
        *by_code.entry(o.ended).or_default() += 1;
    }
    println!("\nby code: {by_code:?}");
    let unexpected: Vec<String> = table
        .iter()
        .filter(|((kind, ended), _)| {
            !matches!(
                (kind, *ended),
                (Kind::Clip | Kind::Long, "OK" | "RESOURCE_EXHAUSTED")
                    | (
                        Kind::Cancel,
                        "OK" | "CANCELLED_BY_CLIENT" | "RESOURCE_EXHAUSTED"
                    )
                    | (
                        Kind::BadAudio | Kind::BadOption,
                        "INVALID_ARGUMENT" | "RESOURCE_EXHAUSTED"
                    )
            )
        })
        .map(|((kind, ended), s)| format!("{kind:?} {ended} x{}", s.len()))
        .collect();
    let mut refusals: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.ended == "RESOURCE_EXHAUSTED")
        .map(|o| o.seconds)
        .collect();
    refusals.sort_by(f64::total_cmp);
    println!(
        "overload: {} refusals (RESOURCE_EXHAUSTED), answered in p50 {:.1} ms / p99 {:.1} ms / max {:.1} ms",
        refusals.len(),
        percentile(&refusals, 0.5) * 1e3,
        percentile(&refusals, 0.99) * 1e3,
        refusals.last().copied().unwrap_or(0.0) * 1e3
    );
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    for (name, pick) in [
        (
            "feature-service",
            (|s: &(f64, u64, u64)| s.1) as fn(&(f64, u64, u64)) -> u64,
        ),
        ("model-service", |s: &(f64, u64, u64)| s.2),
    ] {
        let peak = rss.iter().map(pick).max().unwrap_or(0);
        // After warm-up (the median over 25..35 % of the run) vs the end (the last 10 %).
        let warm = median_rss(rss, 0.25 * wall, 0.35 * wall, pick);
        let last = median_rss(rss, 0.9 * wall, wall + 2.0, pick);
        let growth = (last as f64 - warm as f64) / (warm as f64).max(1.0) * 100.0;
        println!(
            "{name:<16} RSS peak {:>7.1} MiB; after warm-up {:>7.1} MiB, at the end {:>7.1} MiB ({growth:+.1} %: {})",
            mib(peak),
            mib(warm),
            mib(last),
            if growth.abs() <= 10.0 { "flat" } else { "NOT flat" }
        );
    }
    println!(
        "unexpected outcomes: {}",
        if unexpected.is_empty() {
            "none".to_string()
        } else {
            unexpected.join(", ")
        }
    );
    println!(
        "after the soak a clip still transcribes: {}",
        if healthy_after { "yes" } else { "NO" }
    );
}
