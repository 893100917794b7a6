//! The batching scheduler: one thread owns the model (libtorch tensors are not `Sync`) and
//! serves a bounded queue. Windows waiting at the same moment, from any streams, are decoded
//! together when their settings and adapter agree: one encoder batch, decoders stepping
//! together. Adapters are attached per group and detached after, so streams with and
//! without an adapter share the base model.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use asr_whisper::longform::Segment as LongSegment;
use asr_whisper::lora::LinearSite;
use asr_whisper::lora_combine::{combine, Combination};
use asr_whisper::{Adapter, DecodeOptions, LoadOptions, LoadedModel, Precision, WindowTranscript};
use tch::Device;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::error::ModelError;
use crate::options::AdapterChoice;

/// Extra channel room for control commands beside the queued windows.
const CONTROL_SLOTS: usize = 16;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_dir: PathBuf,
    pub precision: Precision,
    pub device: Device,
    /// Windows (or long-form jobs) waiting for the model, across all streams.
    pub queue_capacity: usize,
    /// Most windows decoded as one batch.
    pub max_batch_windows: usize,
    pub max_loaded_adapters: usize,
    pub metrics: asr_runtime::metrics::Registry,
}

/// What a loaded model is, for ModelInfo and request validation.
#[derive(Debug, Clone)]
pub struct ModelDescription {
    pub name: String,
    pub n_mels: usize,
    pub vocab_size: u32,
    pub multilingual: bool,
    /// Language codes in token order.
    pub languages: Vec<String>,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub d_model: usize,
    pub max_target_positions: usize,
    pub weight_bytes: i64,
}

#[derive(Debug, Clone)]
pub enum EngineState {
    Loading,
    Ready(Arc<ModelDescription>),
    Failed(String),
}

/// Counters the scheduler keeps (exported as metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub batches: AtomicU64,
    pub windows: AtomicU64,
    pub largest_batch: AtomicU64,
    pub long_form_jobs: AtomicU64,
    pub cancelled_windows: AtomicU64,
}

/// One window to decode; the reply is dropped unanswered when the requester went away.
struct WindowJob {
    window: Vec<f32>,
    options: Arc<DecodeOptions>,
    adapter: Option<AdapterChoice>,
    reply: oneshot::Sender<Result<WindowTranscript, ModelError>>,
    _permit: OwnedSemaphorePermit,
}

/// A whole stream decoded with seek and timestamps (openai's long-form).
struct LongFormJob {
    frames: Vec<f32>,
    content_frames: usize,
    options: Arc<DecodeOptions>,
    adapter: Option<AdapterChoice>,
    reply: oneshot::Sender<Result<Vec<LongSegment>, ModelError>>,
    _permit: OwnedSemaphorePermit,
}

enum Command {
    Window(WindowJob),
    LongForm(LongFormJob),
    LoadAdapter {
        name: String,
        dir: PathBuf,
        reply: oneshot::Sender<Result<u64, ModelError>>,
    },
    UnloadAdapter {
        name: String,
        reply: oneshot::Sender<bool>,
    },
    /// Combines stored adapters into a new PEFT directory at `output`.
    Merge {
        inputs: Vec<(PathBuf, f64)>,
        combination: Combination,
        output: PathBuf,
        base_model: String,
        reply: oneshot::Sender<Result<(), ModelError>>,
    },
}

/// Handle to the scheduler; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    commands: mpsc::Sender<Command>,
    queue: Arc<Semaphore>,
    queue_capacity: usize,
    state: watch::Receiver<EngineState>,
    loaded: Arc<Mutex<BTreeSet<String>>>,
    pub stats: Arc<EngineStats>,
}

impl Engine {
    /// Starts the scheduler thread; the model loads in it (state `Loading` until then).
    pub fn start(config: EngineConfig) -> Self {
        let (commands, receiver) = mpsc::channel(config.queue_capacity + CONTROL_SLOTS);
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let loaded = Arc::new(Mutex::new(BTreeSet::new()));
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            config: config.clone(),
            loaded: loaded.clone(),
            stats: stats.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("model-engine".into())
            .spawn(move || worker.run(receiver, state_tx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the model thread");
        }
        Self {
            commands,
            queue: Arc::new(Semaphore::new(config.queue_capacity)),
            queue_capacity: config.queue_capacity,
            state,
            loaded,
            stats,
        }
    }

    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    /// The model, or why there is none yet.
    pub fn ready(&self) -> Result<Arc<ModelDescription>, ModelError> {
        match self.state() {
            EngineState::Ready(model) => Ok(model),
            EngineState::Loading => Err(ModelError::Loading),
            EngineState::Failed(reason) => Err(ModelError::LoadFailed(reason)),
        }
    }

    /// Waits until the model is loaded (or failed to).
    pub async fn wait_ready(&self) -> Result<Arc<ModelDescription>, ModelError> {
        let mut state = self.state.clone();
        let _ = state.wait_for(|s| !matches!(s, EngineState::Loading)).await;
        self.ready()
    }

    /// Work items waiting or running.
    pub fn queue_depth(&self) -> usize {
        self.queue_capacity - self.queue.available_permits()
    }

    pub fn is_loaded(&self, adapter: &str) -> bool {
        self.loaded.lock().is_ok_and(|l| l.contains(adapter))
    }

    pub fn loaded_adapters(&self) -> BTreeSet<String> {
        self.loaded.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// A queue slot: at once (`wait` false: RESOURCE_EXHAUSTED when full) or when one frees.
    async fn slot(&self, wait: bool) -> Result<OwnedSemaphorePermit, ModelError> {
        let permit = if wait {
            self.queue.clone().acquire_owned().await.ok()
        } else {
            self.queue.clone().try_acquire_owned().ok()
        };
        permit.ok_or(ModelError::LimitReached {
            limit: "queue_capacity",
            value: self.queue_capacity.to_string(),
            hint: "the scheduler queue is full; retry later",
        })
    }

    async fn send(&self, command: Command) -> Result<(), ModelError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| ModelError::ShuttingDown)
    }

    /// Queues one normalised window; the answer arrives on the returned receiver.
    pub async fn submit_window(
        &self,
        window: Vec<f32>,
        options: Arc<DecodeOptions>,
        adapter: Option<AdapterChoice>,
        wait_for_slot: bool,
    ) -> Result<oneshot::Receiver<Result<WindowTranscript, ModelError>>, ModelError> {
        let permit = self.slot(wait_for_slot).await?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Window(WindowJob {
            window,
            options,
            adapter,
            reply,
            _permit: permit,
        }))
        .await?;
        Ok(answer)
    }

    /// Decodes a whole stream's raw frames with seek and timestamps.
    pub async fn long_form(
        &self,
        frames: Vec<f32>,
        content_frames: usize,
        options: Arc<DecodeOptions>,
        adapter: Option<AdapterChoice>,
    ) -> Result<Vec<LongSegment>, ModelError> {
        let permit = self.slot(true).await?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::LongForm(LongFormJob {
            frames,
            content_frames,
            options,
            adapter,
            reply,
            _permit: permit,
        }))
        .await?;
        answer.await.map_err(|_| ModelError::ShuttingDown)?
    }

    /// Loads a registry adapter's files into memory; returns its trainable parameter count.
    pub async fn load_adapter(&self, name: &str, dir: PathBuf) -> Result<u64, ModelError> {
        self.ready()?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::LoadAdapter {
            name: name.to_string(),
            dir,
            reply,
        })
        .await?;
        answer.await.map_err(|_| ModelError::ShuttingDown)?
    }

    /// Writes the weighted combination of the adapters in `inputs` (directories) to `output`.
    pub async fn merge_adapters(
        &self,
        inputs: Vec<(PathBuf, f64)>,
        combination: Combination,
        output: PathBuf,
        base_model: String,
    ) -> Result<(), ModelError> {
        self.ready()?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Merge {
            inputs,
            combination,
            output,
            base_model,
            reply,
        })
        .await?;
        answer.await.map_err(|_| ModelError::ShuttingDown)?
    }

    /// Frees an adapter's memory; false when it was not loaded.
    pub async fn unload_adapter(&self, name: &str) -> Result<bool, ModelError> {
        if !self.is_loaded(name) {
            return Ok(false);
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::UnloadAdapter {
            name: name.to_string(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| ModelError::ShuttingDown)
    }
}

/// The scheduler thread's state.
struct Worker {
    config: EngineConfig,
    loaded: Arc<Mutex<BTreeSet<String>>>,
    stats: Arc<EngineStats>,
}

/// What the worker holds once the model is loaded.
struct Loaded {
    model: LoadedModel,
    sites: Vec<LinearSite>,
    adapters: HashMap<String, Adapter>,
}

impl Worker {
    fn run(self, mut commands: mpsc::Receiver<Command>, state: watch::Sender<EngineState>) {
        let mut loaded = match self.load() {
            Ok((loaded, description)) => {
                tracing::info!(
                    model = %description.name,
                    weight_mb = description.weight_bytes / (1 << 20),
                    "model loaded"
                );
                let _ = state.send(EngineState::Ready(Arc::new(description)));
                loaded
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the model failed to load");
                let _ = state.send(EngineState::Failed(format!("{e:#}")));
                // Answer everything with the failure until the service stops.
                while let Some(command) = commands.blocking_recv() {
                    fail(command, ModelError::LoadFailed(format!("{e:#}")));
                }
                return;
            }
        };
        while let Some(first) = commands.blocking_recv() {
            let mut windows = Vec::new();
            let mut others = Vec::new();
            let mut next = Some(first);
            // Everything already waiting joins this round, up to the batch size.
            while let Some(command) = next.take() {
                match command {
                    Command::Window(job) => windows.push(job),
                    other => others.push(other),
                }
                if windows.len() < self.config.max_batch_windows {
                    next = commands.try_recv().ok();
                }
            }
            for command in others {
                self.control(&mut loaded, command);
            }
            self.decode_windows(&mut loaded, windows);
        }
    }

    fn load(&self) -> anyhow::Result<(Loaded, ModelDescription)> {
        let mut model = LoadedModel::load(
            &self.config.model_dir,
            LoadOptions {
                device: self.config.device,
                precision: self.config.precision,
                // A window's text must not depend on the other requests batched with it.
                per_sample_outliers: true,
                ..Default::default()
            },
        )?;
        let sites = model.model.linear_sites();
        let config = &model.model.config;
        let mut languages: Vec<(i64, String)> = model
            .generation
            .lang_to_id
            .iter()
            .map(|(token, &id)| {
                let code = token.trim_start_matches("<|").trim_end_matches("|>");
                (id, code.to_string())
            })
            .collect();
        languages.sort();
        let description = ModelDescription {
            name: self
                .config
                .model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            n_mels: config.num_mel_bins,
            vocab_size: config.vocab_size as u32,
            multilingual: model.generation.is_multilingual,
            languages: languages.into_iter().map(|(_, code)| code).collect(),
            encoder_layers: config.encoder_layers,
            decoder_layers: config.decoder_layers,
            d_model: config.d_model,
            max_target_positions: config.max_target_positions,
            weight_bytes: model.model.weight_bytes(),
        };
        Ok((
            Loaded {
                model,
                sites,
                adapters: HashMap::new(),
            },
            description,
        ))
    }

    fn control(&self, loaded: &mut Loaded, command: Command) {
        match command {
            Command::LongForm(job) => self.decode_long_form(loaded, job),
            Command::LoadAdapter { name, dir, reply } => {
                let _ = reply.send(self.load_adapter(loaded, &name, &dir));
            }
            Command::UnloadAdapter { name, reply } => {
                let removed = loaded.adapters.remove(&name).is_some();
                if let Ok(mut set) = self.loaded.lock() {
                    set.remove(&name);
                }
                let _ = reply.send(removed);
            }
            Command::Window(job) => self.decode_windows(loaded, vec![job]),
            Command::Merge {
                inputs,
                combination,
                output,
                base_model,
                reply,
            } => {
                let _ = reply.send(self.merge(loaded, &inputs, combination, &output, &base_model));
            }
        }
    }

    fn load_adapter(
        &self,
        loaded: &mut Loaded,
        name: &str,
        dir: &std::path::Path,
    ) -> Result<u64, ModelError> {
        if let Some(adapter) = loaded.adapters.get(name) {
            return Ok(adapter.trainable_parameter_count() as u64);
        }
        if loaded.adapters.len() >= self.config.max_loaded_adapters {
            return Err(ModelError::LimitReached {
                limit: "max_loaded_adapters",
                value: self.config.max_loaded_adapters.to_string(),
                hint: "unload an adapter first",
            });
        }
        let adapter = Adapter::load_peft(dir, &loaded.sites, self.config.device).map_err(|e| {
            ModelError::FailedPrecondition(format!(
                "adapter {name:?} does not fit this model: {e:#}"
            ))
        })?;
        let count = adapter.trainable_parameter_count() as u64;
        loaded.adapters.insert(name.to_string(), adapter);
        if let Ok(mut set) = self.loaded.lock() {
            set.insert(name.to_string());
        }
        Ok(count)
    }

    fn merge(
        &self,
        loaded: &Loaded,
        inputs: &[(PathBuf, f64)],
        combination: Combination,
        output: &std::path::Path,
        base_model: &str,
    ) -> Result<(), ModelError> {
        let adapters = inputs
            .iter()
            .map(|(dir, _)| {
                Adapter::load_peft(dir, &loaded.sites, self.config.device).map_err(|e| {
                    ModelError::FailedPrecondition(format!("{}: {e:#}", dir.display()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let weighted: Vec<(&Adapter, f64)> = adapters
            .iter()
            .zip(inputs)
            .map(|(a, (_, w))| (a, *w))
            .collect();
        let merged = tch::no_grad(|| combine(&weighted, combination))
            .map_err(|e| ModelError::FailedPrecondition(format!("{e:#}")))?;
        merged
            .save_peft(output, base_model)
            .map_err(ModelError::internal)
    }

    /// Attaches the chosen adapter (scaled), runs `f`, detaches.
    fn with_adapter<T>(
        loaded: &mut Loaded,
        adapter: &Option<AdapterChoice>,
        f: impl FnOnce(&LoadedModel) -> anyhow::Result<T>,
    ) -> Result<T, ModelError> {
        if let Some(choice) = adapter {
            let stored = loaded.adapters.get(&choice.name).ok_or_else(|| {
                ModelError::FailedPrecondition(format!(
                    "adapter {:?} is not loaded (LoadAdapter first)",
                    choice.name
                ))
            })?;
            if choice.scale == 1.0 {
                loaded.model.model.attach(stored);
            } else {
                let scaled = stored.scaled(choice.scale, &loaded.sites);
                loaded.model.model.attach(&scaled);
            }
        }
        let result = tch::no_grad(|| f(&loaded.model));
        if adapter.is_some() {
            loaded.model.model.detach();
        }
        result.map_err(ModelError::internal)
    }

    fn decode_windows(&self, loaded: &mut Loaded, jobs: Vec<WindowJob>) {
        let (live, cancelled): (Vec<WindowJob>, Vec<WindowJob>) =
            jobs.into_iter().partition(|job| !job.reply.is_closed());
        self.stats
            .cancelled_windows
            .fetch_add(cancelled.len() as u64, Ordering::Relaxed);
        // Groups of identical settings and adapter decode as one batch.
        let mut groups: Vec<(String, Vec<WindowJob>)> = Vec::new();
        for job in live {
            let key = format!("{:?}|{:?}", job.options, job.adapter);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push(job),
                None => groups.push((key, vec![job])),
            }
        }
        for (_, mut group) in groups {
            let size = group.len() as u64;
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats.windows.fetch_add(size, Ordering::Relaxed);
            self.stats.largest_batch.fetch_max(size, Ordering::Relaxed);
            self.config.metrics.observe(
                "asr_model_batch_size",
                "Windows decoded together by the scheduler.",
                vec![],
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                size as f64,
            );
            let options = group[0].options.clone();
            let adapter = group[0].adapter.clone();
            // Moved out: a window is 1 MB, and the job only needs its reply from here.
            let windows: Vec<Vec<f32>> = group
                .iter_mut()
                .map(|j| std::mem::take(&mut j.window))
                .collect();
            let result = Self::with_adapter(loaded, &adapter, |model| {
                model.transcribe_windows(&windows, &options)
            });
            match result {
                Ok(transcripts) => {
                    for (job, transcript) in group.into_iter().zip(transcripts) {
                        let _ = job.reply.send(Ok(transcript));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "decoding failed");
                    let message = e.to_string();
                    for job in group {
                        let _ = job.reply.send(Err(ModelError::Internal(message.clone())));
                    }
                }
            }
        }
    }

    fn decode_long_form(&self, loaded: &mut Loaded, job: LongFormJob) {
        if job.reply.is_closed() {
            return;
        }
        self.stats.long_form_jobs.fetch_add(1, Ordering::Relaxed);
        let result = Self::with_adapter(loaded, &job.adapter, |model| {
            model.transcribe_long(&job.frames, job.content_frames, &job.options)
        });
        let _ = job.reply.send(result);
    }
}

/// Answers a command that cannot run.
fn fail(command: Command, error: ModelError) {
    let message = error.to_string();
    match command {
        Command::Window(job) => {
            let _ = job.reply.send(Err(ModelError::LoadFailed(message)));
        }
        Command::LongForm(job) => {
            let _ = job.reply.send(Err(ModelError::LoadFailed(message)));
        }
        Command::LoadAdapter { reply, .. } => {
            let _ = reply.send(Err(ModelError::LoadFailed(message)));
        }
        Command::UnloadAdapter { reply, .. } => {
            let _ = reply.send(false);
        }
        Command::Merge { reply, .. } => {
            let _ = reply.send(Err(ModelError::LoadFailed(message)));
        }
    }
}
