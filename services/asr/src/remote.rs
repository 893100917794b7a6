//! The controller's model-service verbs: `asr ingest` (a manifest or Common Voice split into a
//! dataset), `asr jobs start|watch|list|cancel`, and `asr adapters list|load|delete`.

use std::path::PathBuf;

use anyhow::Context;
use asr_audio::pipeline::extract_all;
use asr_audio::{FeaturePipeline, InputFormat, MelConfig, PipelineConfig};
use asr_proto::v1 as pb;
use asr_whisper::dataset::read_dataset;
use clap::{Args, Subcommand};
use pb::model_service_client::ModelServiceClient;
use pb::training_event::Event;
use tonic::transport::{Channel, Endpoint};

/// Largest message sent or received (an example's features are about 1 MB).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Args, Clone)]
pub struct ModelServiceArg {
    /// Model service URL.
    #[arg(
        long,
        env = "ASR_MODEL_SERVICE",
        default_value = "http://127.0.0.1:50052"
    )]
    pub model_service: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub async fn connect(url: &str) -> anyhow::Result<ModelServiceClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("--model-service {url:?} is not a valid URL"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the model service at {url}"))?;
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
    #[command(flatten)]
    pub server: ModelServiceArg,
}

/// Features computed here, sent with their transcripts; examples already stored are skipped
/// (create-or-append with duplicate ids rejected), so an interrupted ingestion can be re-run.
pub fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let mut entries = read_dataset(&args.data, &args.from_split)?;
    if let Some(n) = args.max_examples {
        entries.truncate(n);
    }
    let root = args
        .data
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    runtime()?.block_on(async {
        let mut client = connect(&args.server.model_service).await?;
        let info = client.get_model_info(pb::GetModelInfoRequest {}).await?.into_inner();
        let n_mels = if info.n_mels == 0 { 80 } else { info.n_mels };
        let pipeline = FeaturePipeline::new(PipelineConfig {
            mel: MelConfig::new(n_mels)?,
            ..Default::default()
        });
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::IngestExamplesRequest {
            payload: Some(pb::ingest_examples_request::Payload::Config(pb::IngestExamplesConfig {
                dataset: args.name.clone(),
                mode: pb::IngestMode::CreateOrAppend as i32,
                n_mels,
                split: args.split.clone(),
                language: args.language.clone(),
                description: String::new(),
            })),
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
                let id = entry
                    .audio
                    .strip_prefix(&root)
                    .unwrap_or(&entry.audio)
                    .display()
                    .to_string();
                let example = pb::DatasetExample {
                    id,
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
            .ingest_examples(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let (mut accepted, mut duplicates, mut rejected) = (0, 0, 0);
        while let Some(ack) = acks.message().await? {
            if ack.status == pb::ExampleStatus::Accepted as i32 {
                accepted += 1;
            } else if ack.rejection == pb::RejectionReason::DuplicateId as i32 {
                duplicates += 1;
            } else {
                rejected += 1;
                eprintln!("rejected {}: {}", ack.example_id, ack.message);
            }
        }
        producer.await??;
        let dataset = client
            .get_dataset(pb::GetDatasetRequest {
                name: args.name.clone(),
            })
            .await?
            .into_inner();
        println!(
            "{}: {accepted} of {total} examples stored ({duplicates} already there, {rejected} rejected); the dataset holds {} examples, {:.2} h",
            args.name, dataset.example_count, dataset.audio_hours
        );
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

pub async fn watch(client: &mut ModelServiceClient<Channel>, id: &str) -> anyhow::Result<()> {
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
                for r in e.results {
                    println!(
                        "eval epoch {}: {} loss {:.4}{}",
                        e.epoch,
                        r.name,
                        r.loss,
                        r.cer.map_or(String::new(), |c| format!(", CER {:.2}%", c * 100.0))
                    );
                }
            }
            Some(Event::CheckpointSaved(c)) => {
                println!("checkpoint {}{}", c.name, if c.is_best { " (best so far)" } else { "" })
            }
            Some(Event::JobFinished(f)) => {
                println!("finished at step {}: adapter {:?} ({})", f.global_step, f.adapter, f.best_checkpoint);
                return Ok(());
            }
            Some(Event::JobFailed(f)) => anyhow::bail!("job {id} failed at step {}: {}", f.global_step, f.reason),
            Some(Event::JobCancelled(c)) => anyhow::bail!("job {id} was cancelled at step {}", c.global_step),
            None => {}
        }
    }
    Ok(())
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
        let source_dir = match dir {
            Some(d) => std::fs::canonicalize(d)
                .with_context(|| format!("{}", d.display()))?
                .display()
                .to_string(),
            None => String::new(),
        };
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
