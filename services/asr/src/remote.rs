//! The controller's model-service verbs: `asr ingest` (a manifest or Common Voice split into a
//! dataset), `asr jobs start|watch|list|cancel`, and `asr adapters list|load|delete`.

use std::path::PathBuf;

use anyhow::Context;
use asr_audio::pipeline::extract_all;
use asr_audio::{FeaturePipeline, InputFormat, MelConfig, PipelineConfig};
use asr_proto::v1 as pb;
use asr_runtime::AuthChannel;
use asr_whisper::dataset::read_dataset;
use clap::{Args, Subcommand};
use pb::model_service_client::ModelServiceClient;
use pb::training_event::Event;

/// Largest message sent or received (an example's features are about 1 MB).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Args, Clone)]
pub struct ModelServiceArg {
    /// Model service URL. Unset: the one the feature service at ASR_SERVER (default
    /// http://127.0.0.1:50051) relays to, as its GetInfo reports it.
    #[arg(long, env = "ASR_MODEL_SERVICE", default_value = "")]
    pub model_service: String,
}

/// Where the feature service is when `asr transcribe --server` is not in play.
const DEFAULT_FEATURE_SERVER: &str = "http://127.0.0.1:50051";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The model service the feature service relays to.
async fn model_service_of_feature_service() -> anyhow::Result<String> {
    let server = std::env::var("ASR_SERVER").unwrap_or_else(|_| DEFAULT_FEATURE_SERVER.into());
    let mut client = crate::net::connect(&server)
        .await
        .map(pb::feature_service_client::FeatureServiceClient::new)
        .with_context(|| {
            format!("no --model-service given, and the feature service at {server} (ASR_SERVER) cannot be reached to ask")
        })?;
    let info = client.get_info(pb::GetInfoRequest {}).await?.into_inner();
    anyhow::ensure!(
        !info.model_service_address.is_empty(),
        "no --model-service given, and the feature service at {server} relays to none"
    );
    Ok(info.model_service_address)
}

/// A client of the model service at `url` (empty: ask the feature service).
pub async fn connect(url: &str) -> anyhow::Result<ModelServiceClient<AuthChannel>> {
    let url = if url.is_empty() {
        model_service_of_feature_service().await?
    } else {
        url.to_string()
    };
    let channel = crate::net::connect(&url)
        .await
        .with_context(|| format!("--model-service: the model service at {url}"))?;
    Ok(ModelServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

#[derive(Args)]
pub struct IngestArgs {
    /// Dataset name in the model service.
    #[arg(long)]
    pub name: String,
    /// A JSONL manifest ({"audio", "text"}) or a Common Voice release directory.
    pub data: PathBuf,
    /// Common Voice split to read (train, dev, test); ignored for a manifest.
    #[arg(long, default_value = "train")]
    pub from_split: String,
    /// Split the examples are stored under.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Whisper language code of the speech.
    #[arg(long, default_value = "zh")]
    pub language: String,
    /// Only the first N examples.
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Feature service URLs: send the audio files themselves through FeatureService.Ingest,
    /// one contiguous share of the examples per URL, concurrently (the model service stores
    /// one stream per dataset at a time, so the shares take turns there). Without it the
    /// features are computed here and sent straight to the model service.
    #[arg(
        long,
        env = "ASR_FEATURE_SERVERS",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub features: Vec<String>,
    #[command(flatten)]
    pub server: ModelServiceArg,
}

/// Stores the examples; those already stored are skipped (create-or-append with duplicate
/// ids rejected), so an interrupted ingestion can be re-run. Without `--features` the
/// features are computed here and sent with their transcripts to the model service; with it
/// the audio files go through the feature services' Ingest (see `through_features`).
pub fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use asr_whisper::dataset::Entry;
    use pb::feature_service_client::FeatureServiceClient;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    /// Audio bytes per message sent to a feature service.
    const AUDIO_CHUNK: usize = 64 * 1024;

    /// Acks counted the way the summary line reports them.
    #[derive(Default)]
    struct Counts {
        accepted: usize,
        duplicates: usize,
        rejected: usize,
    }

    impl Counts {
        fn add(&mut self, ack: &pb::IngestAck) {
            if ack.status == pb::ExampleStatus::Accepted as i32 {
                self.accepted += 1;
            } else if ack.rejection == pb::RejectionReason::DuplicateId as i32 {
                self.duplicates += 1;
            } else {
                self.rejected += 1;
                eprintln!("rejected {}: {}", ack.example_id, ack.message);
            }
        }
    }

    fn summary(name: &str, counts: &Counts, total: usize, dataset: Option<&pb::Dataset>) {
        let (examples, hours) = dataset.map_or((0, 0.0), |d| (d.example_count, d.audio_hours));
        println!(
            "{name}: {} of {total} examples stored ({} already there, {} rejected); the dataset holds {examples} examples, {hours:.2} h",
            counts.accepted, counts.duplicates, counts.rejected
        );
    }

    /// An example's id: its audio path relative to the manifest's directory.
    fn example_id(root: &Path, audio: &Path) -> String {
        audio
            .strip_prefix(root)
            .unwrap_or(audio)
            .display()
            .to_string()
    }

    /// One FeatureService.Ingest stream: the config, then each entry's header and audio file.
    /// The outer error is this side's (a file that cannot be read), the inner one the
    /// service's status.
    async fn ingest_stream(
        client: &mut FeatureServiceClient<AuthChannel>,
        config: pb::IngestAudioConfig,
        entries: Vec<Entry>,
        root: PathBuf,
    ) -> anyhow::Result<Result<pb::IngestResponse, tonic::Status>> {
        use pb::ingest_audio_request::Payload;
        let (tx, rx) = mpsc::channel(8);
        let producer = tokio::spawn(async move {
            let send = |payload| {
                tx.send(pb::IngestAudioRequest {
                    payload: Some(payload),
                })
            };
            // A closed channel: the service ended the call; its status tells why.
            if send(Payload::Config(config)).await.is_err() {
                return Ok(());
            }
            for entry in entries {
                let path = entry.audio.clone();
                let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
                    .await?
                    .with_context(|| format!("reading {}", entry.audio.display()))?;
                let header = pb::AudioExampleHeader {
                    id: example_id(&root, &entry.audio),
                    text: entry.text,
                    format: None,
                    split: String::new(),
                };
                if send(Payload::Example(header)).await.is_err() {
                    return Ok(());
                }
                for chunk in bytes.chunks(AUDIO_CHUNK) {
                    if send(Payload::Audio(chunk.to_vec())).await.is_err() {
                        return Ok(());
                    }
                }
            }
            anyhow::Ok(())
        });
        let response = client.ingest(ReceiverStream::new(rx)).await;
        producer.await??;
        Ok(response.map(tonic::Response::into_inner))
    }

    /// Counts the shares still running; dropped when its share ends.
    struct Running(Arc<AtomicUsize>);

    impl Drop for Running {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// One share of the entries through one feature service. The model service takes one
    /// ingestion per dataset at a time and refuses the others with FAILED_PRECONDITION before
    /// storing anything: retried while another share is running, then once more.
    async fn send_share(
        mut client: FeatureServiceClient<AuthChannel>,
        url: String,
        config: pb::IngestAudioConfig,
        entries: Vec<Entry>,
        root: PathBuf,
        running: Running,
    ) -> anyhow::Result<pb::IngestResponse> {
        let mut backoff = Duration::from_millis(50);
        let mut last_try = false;
        loop {
            let outcome =
                ingest_stream(&mut client, config.clone(), entries.clone(), root.clone()).await?;
            match outcome {
                Ok(response) => return Ok(response),
                Err(status) if status.code() == tonic::Code::FailedPrecondition && !last_try => {
                    last_try = running.0.load(Ordering::SeqCst) <= 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(status) => {
                    return Err(anyhow::Error::from(status))
                        .with_context(|| format!("ingesting through the feature service at {url}"))
                }
            }
        }
    }

    /// The entries spread over the feature services at `urls`: the dataset is created (or
    /// opened) first by a stream without examples, then each service gets one contiguous
    /// share, all concurrently.
    async fn through_features(
        args: &IngestArgs,
        urls: Vec<String>,
        entries: Vec<Entry>,
        root: PathBuf,
    ) -> anyhow::Result<()> {
        let mut clients = Vec::new();
        for url in &urls {
            let channel = crate::net::connect(url)
                .await
                .with_context(|| format!("--features: the feature service at {url}"))?;
            clients.push(
                FeatureServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        }
        let config = pb::IngestAudioConfig {
            dataset: args.name.clone(),
            mode: pb::IngestMode::CreateOrAppend as i32,
            split: args.split.clone(),
            language: args.language.clone(),
            description: String::new(),
            default_format: None,
        };
        let total = entries.len();
        let created = ingest_stream(&mut clients[0], config.clone(), Vec::new(), root.clone())
            .await?
            .map_err(anyhow::Error::from)
            .with_context(|| format!("creating {:?} through {}", args.name, urls[0]))?;
        let mut dataset = created.dataset_info;
        let share = total.div_ceil(clients.len()).max(1);
        let running = Arc::new(AtomicUsize::new(0));
        let mut shares = tokio::task::JoinSet::new();
        for ((entries, client), url) in entries.chunks(share).zip(clients).zip(urls) {
            running.fetch_add(1, Ordering::SeqCst);
            shares.spawn(send_share(
                client,
                url,
                config.clone(),
                entries.to_vec(),
                root.clone(),
                Running(running.clone()),
            ));
        }
        let mut counts = Counts::default();
        while let Some(done) = shares.join_next().await {
            let response = done??;
            response.results.iter().for_each(|ack| counts.add(ack));
            // Each share's view of the dataset is taken after it ended: the largest is the
            // latest.
            if let Some(info) = response.dataset_info {
                if dataset
                    .as_ref()
                    .is_none_or(|d| d.example_count <= info.example_count)
                {
                    dataset = Some(info);
                }
            }
        }
        summary(&args.name, &counts, total, dataset.as_ref());
        Ok(())
    }

    let mut entries = read_dataset(&args.data, &args.from_split)?;
    if let Some(n) = args.max_examples {
        entries.truncate(n);
    }
    let root = args.data.parent().unwrap_or(Path::new(".")).to_path_buf();
    let urls: Vec<String> = args
        .features
        .iter()
        .map(|url| url.trim().to_string())
        .filter(|url| !url.is_empty())
        .collect();
    if !urls.is_empty() {
        return runtime()?.block_on(through_features(&args, urls, entries, root));
    }
    runtime()?.block_on(async {
        let mut client = connect(&args.server.model_service).await?;
        let info = client
            .get_model_info(pb::GetModelInfoRequest {})
            .await?
            .into_inner();
        let n_mels = if info.n_mels == 0 { 80 } else { info.n_mels };
        let pipeline = FeaturePipeline::new(PipelineConfig {
            mel: MelConfig::new(n_mels)?,
            ..Default::default()
        });
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::IngestExamplesRequest {
            payload: Some(pb::ingest_examples_request::Payload::Config(
                pb::IngestExamplesConfig {
                    dataset: args.name.clone(),
                    mode: pb::IngestMode::CreateOrAppend as i32,
                    n_mels,
                    split: args.split.clone(),
                    language: args.language.clone(),
                    description: String::new(),
                },
            )),
        })
        .await?;
        let total = entries.len();
        let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for entry in entries {
                let bytes = std::fs::read(&entry.audio)
                    .with_context(|| format!("reading {}", entry.audio.display()))?;
                let (_, frames, summary) =
                    extract_all(&pipeline, std::io::Cursor::new(bytes), InputFormat::Encoded)
                        .with_context(|| format!("decoding {}", entry.audio.display()))?;
                let example = pb::DatasetExample {
                    id: example_id(&root, &entry.audio),
                    text: entry.text,
                    duration_seconds: summary.duration_seconds,
                    features: Some(pb::MelFrames {
                        n_mels,
                        first_frame_index: 0,
                        frame_count: (frames.len() / n_mels as usize) as u32,
                        values: frames,
                    }),
                    split: String::new(),
                };
                let message = pb::IngestExamplesRequest {
                    payload: Some(pb::ingest_examples_request::Payload::Example(example)),
                };
                if tx.blocking_send(message).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut acks = client
            .ingest_examples(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut counts = Counts::default();
        while let Some(ack) = acks.message().await? {
            counts.add(&ack);
        }
        producer.await??;
        let dataset = client
            .get_dataset(pb::GetDatasetRequest {
                name: args.name.clone(),
            })
            .await?
            .into_inner();
        summary(&args.name, &counts, total, Some(&dataset));
        Ok(())
    })
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Queue a LoRA training job on datasets of the model service.
    Start(StartArgs),
    /// Follow a job's events until it ends.
    Watch {
        id: String,
        #[command(flatten)]
        server: ModelServiceArg,
    },
    /// Jobs, newest first.
    List {
        #[command(flatten)]
        server: ModelServiceArg,
    },
    /// Cancel a queued or running job.
    Cancel {
        id: String,
        #[command(flatten)]
        server: ModelServiceArg,
    },
}

#[derive(Args)]
pub struct StartArgs {
    /// Train dataset, as NAME or NAME:SPLIT.
    #[arg(long)]
    pub train: String,
    /// Eval dataset, as NAME or NAME:SPLIT.
    #[arg(long)]
    pub eval: Option<String>,
    /// Registry name of the adapter the job produces.
    #[arg(long)]
    pub output_adapter: String,
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    #[arg(long, default_value_t = 4)]
    pub batch_size: u32,
    #[arg(long, default_value_t = 4)]
    pub grad_accum: u32,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 50)]
    pub warmup_steps: u32,
    #[arg(long)]
    pub max_steps: Option<u32>,
    #[arg(long, default_value_t = 25)]
    pub logging_steps: u32,
    #[arg(long, default_value_t = 4)]
    pub lora_r: u32,
    #[arg(long, default_value_t = 64.0)]
    pub lora_alpha: f32,
    /// Evaluate CER by generation and keep the best checkpoint by it.
    #[arg(long)]
    pub eval_cer: bool,
    /// Follow the job until it ends.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub server: ModelServiceArg,
}

fn data_ref(spec: &str) -> pb::DatasetRef {
    let (dataset, split) = spec.split_once(':').unwrap_or((spec, ""));
    pb::DatasetRef {
        dataset: dataset.to_string(),
        split: split.to_string(),
    }
}

pub fn jobs(command: JobsCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        match command {
            JobsCommand::Start(args) => {
                let mut client = connect(&args.server.model_service).await?;
                let job = client
                    .start_training(pb::StartTrainingRequest {
                        train_dataset: Some(data_ref(&args.train)),
                        eval_dataset: args.eval.as_deref().map(data_ref),
                        lora: Some(pb::LoraConfig {
                            r: args.lora_r,
                            alpha: args.lora_alpha,
                            ..Default::default()
                        }),
                        hyperparameters: Some(pb::TrainingHyperparameters {
                            learning_rate: args.lr,
                            epochs: args.epochs as f32,
                            max_steps: args.max_steps.unwrap_or(0),
                            per_device_batch_size: args.batch_size,
                            gradient_accumulation_steps: args.grad_accum,
                            warmup_steps: Some(args.warmup_steps),
                            logging_steps: args.logging_steps,
                            metric_for_best_model: if args.eval_cer {
                                pb::BestModelMetric::Cer as i32
                            } else {
                                0
                            },
                            ..Default::default()
                        }),
                        output_adapter: args.output_adapter.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                println!("job {} queued", job.id);
                if args.watch {
                    watch(&mut client, &job.id).await?;
                }
                Ok(())
            }
            JobsCommand::Watch { id, server } => {
                watch(&mut connect(&server.model_service).await?, &id).await
            }
            JobsCommand::List { server } => {
                let jobs = connect(&server.model_service)
                    .await?
                    .list_training_jobs(pb::ListTrainingJobsRequest::default())
                    .await?
                    .into_inner();
                for job in jobs.jobs {
                    let state = pb::TrainingJobState::try_from(job.state)
                        .map(|s| {
                            s.as_str_name()
                                .trim_start_matches("TRAINING_JOB_STATE_")
                                .to_string()
                        })
                        .unwrap_or_default();
                    let progress = job.progress.unwrap_or_default();
                    println!(
                        "{}  {state:<9}  step {}/{}  adapter {}{}",
                        job.id,
                        progress.global_step,
                        progress.max_steps,
                        job.request.map(|r| r.output_adapter).unwrap_or_default(),
                        if job.error.is_empty() {
                            String::new()
                        } else {
                            format!("  error: {}", job.error)
                        }
                    );
                }
                Ok(())
            }
            JobsCommand::Cancel { id, server } => {
                connect(&server.model_service)
                    .await?
                    .cancel_training(pb::CancelTrainingRequest { job_id: id.clone() })
                    .await?;
                println!("job {id}: cancel requested");
                Ok(())
            }
        }
    })
}

pub async fn watch(client: &mut ModelServiceClient<AuthChannel>, id: &str) -> anyhow::Result<()> {
    let mut stream = client
        .watch_training(pb::WatchTrainingRequest {
            job_id: id.to_string(),
            from_event_index: 0,
        })
        .await?
        .into_inner();
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(Event::JobStarted(s)) => println!(
                "started: {} examples, {} steps, trainable params {} of {} on {}",
                s.train_example_count, s.max_steps, s.trainable_parameters, s.total_parameters, s.device
            ),
            Some(Event::Resumed(r)) => println!("resumed from {} at step {}", r.checkpoint, r.from_step),
            Some(Event::StepLogged(s)) => println!(
                "step {:>5}  epoch {:>5.2}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  samples/s {:.2}",
                s.global_step, s.epoch, s.loss, s.learning_rate, s.grad_norm, s.samples_per_second
            ),
            Some(Event::Evaluated(e)) => {
                let when = if e.global_step == 0 {
                    "zero-shot".to_string()
                } else {
                    format!("eval epoch {:.2} step {}", e.epoch, e.global_step)
                };
                for r in e.results {
                    println!("{when}: {}", eval_line(&r));
                }
            }
            Some(Event::CheckpointSaved(c)) => {
                println!("checkpoint {}{}", c.name, if c.is_best { " (best so far)" } else { "" })
            }
            Some(Event::JobFinished(f)) => {
                println!("finished at step {}: adapter {:?} ({}){}", f.global_step, f.adapter, f.best_checkpoint,
                    if f.stopped_early { ", stopped early" } else { "" });
                for r in &f.best_results {
                    let before = f.baseline_results.iter().find(|b| b.name == r.name).and_then(|b| b.cer);
                    println!(
                        "  kept: {}{}",
                        eval_line(r),
                        before.map_or(String::new(), |b| format!(" (zero-shot {:.2}%)", b * 100.0))
                    );
                }
                if !f.within_guard_bound {
                    println!("  warning: no checkpoint kept every guard set within max_guard_regression; kept the least regressed");
                }
                return Ok(());
            }
            Some(Event::JobFailed(f)) => anyhow::bail!("job {id} failed at step {}: {}", f.global_step, f.reason),
            Some(Event::JobCancelled(c)) => anyhow::bail!("job {id} was cancelled at step {}", c.global_step),
            None => {}
        }
    }
    Ok(())
}

/// One eval set's figures: loss, CER, and a guard set's change from zero-shot.
fn eval_line(r: &pb::EvalSetResult) -> String {
    format!(
        "{}{} loss {:.4}{}{}",
        r.name,
        if r.guard { " (guard)" } else { "" },
        r.loss,
        r.cer
            .map_or(String::new(), |c| format!(", CER {:.2}%", c * 100.0)),
        r.cer_regression
            .map_or(String::new(), |d| format!(", {:+.2} points", d * 100.0))
    )
}

/// `asr adapters list|load|delete` against the model service's registry.
pub fn adapters_list(server: &ModelServiceArg) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let list = connect(&server.model_service)
            .await?
            .list_adapters(pb::ListAdaptersRequest::default())
            .await?
            .into_inner();
        for a in list.adapters {
            println!(
                "{:<24} r={:<3} alpha={:<5} {:>9} params  {}{}",
                a.name,
                a.r,
                a.alpha,
                a.trainable_parameters,
                if a.loaded { "loaded" } else { "stored" },
                if a.source_job_id.is_empty() {
                    String::new()
                } else {
                    format!("  (job {})", a.source_job_id)
                }
            );
        }
        Ok(())
    })
}

pub fn adapters_load(
    name: &str,
    dir: Option<&PathBuf>,
    server: &ModelServiceArg,
) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        // A path on the model service's host, resolved there inside its import root.
        let source_dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
        let info = connect(&server.model_service)
            .await?
            .load_adapter(pb::LoadAdapterRequest {
                name: name.to_string(),
                source_dir,
            })
            .await?
            .into_inner();
        println!(
            "adapter {} loaded ({} parameters)",
            info.name, info.trainable_parameters
        );
        Ok(())
    })
}

pub fn adapters_delete(name: &str, server: &ModelServiceArg) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        connect(&server.model_service)
            .await?
            .delete_adapter(pb::DeleteAdapterRequest {
                name: name.to_string(),
            })
            .await?;
        println!("adapter {name} deleted");
        Ok(())
    })
}
