//! `asr train`: LoRA fine-tuning. `--local` runs the recipe in this process (see
//! [`crate::train_local`]); `--dry-run` builds the model from an HF config alone
//! (uninitialised weights), attaches the LoRA adapter the flags describe and prints PEFT's
//! trainable-parameter line.

use std::path::PathBuf;

use anyhow::{bail, Context};
use asr_whisper::lora::{trainable_parameters_line, LoraBias, LoraConfig, TargetModules};
use asr_whisper::{Adapter, Weights, Whisper, WhisperConfig};
use clap::{Args, ValueEnum};
use tch::{Device, Kind};

/// LoRA flags, named as the recipe's notebook names them.
#[derive(Args, Clone)]
pub struct LoraArgs {
    #[arg(long, default_value_t = 4)]
    pub lora_r: i64,
    #[arg(long, default_value_t = 64.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Module names (comma-separated, matched as PEFT matches a list) or, with
    /// --target-regex, one regex over whole module names.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub target_modules: Vec<String>,
    #[arg(long)]
    pub target_regex: Option<String>,
    #[arg(long, value_enum, default_value_t = BiasArg::None)]
    pub lora_bias: BiasArg,
    /// Scale by alpha / sqrt(r) (rsLoRA).
    #[arg(long)]
    pub use_rslora: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BiasArg {
    None,
    /// Every bias of the model trains (linear layers, layer norms, convolutions).
    All,
    LoraOnly,
}

impl LoraArgs {
    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: match &self.target_regex {
                Some(pattern) => TargetModules::Regex(pattern.clone()),
                None => TargetModules::Names(self.target_modules.clone()),
            },
            bias: match self.lora_bias {
                BiasArg::None => LoraBias::None,
                BiasArg::All => LoraBias::All,
                BiasArg::LoraOnly => LoraBias::LoraOnly,
            },
            use_rslora: self.use_rslora,
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Train in this process, on files (--train/--eval are manifests or Common Voice
    /// directories). Without it the recipe runs as a job of the model service, on datasets it
    /// stores (--train/--eval are dataset names, see `asr ingest`).
    #[arg(long)]
    pub local: bool,
    /// Registry name of the adapter the model service's job produces.
    #[arg(long, conflicts_with = "local")]
    pub output_adapter: Option<String>,
    /// Follow the job's progress until it ends.
    #[arg(long, conflicts_with = "local")]
    pub watch: bool,
    #[command(flatten)]
    pub server: crate::remote::ModelServiceArg,
    /// Build the model and adapter, print the trainable-parameter line, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// HF config.json of the architecture (with --dry-run; no weights needed).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub recipe: crate::train_local::RecipeArgs,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if !args.dry_run {
        if !args.local {
            let Some(adapter) = &args.output_adapter else {
                bail!("--output-adapter NAME is needed for a model-service job (or use --local)");
            };
            return crate::train_remote::run(
                &args.lora,
                &args.recipe,
                adapter,
                args.watch,
                &args.server,
            );
        }
        return crate::train_local::run(&args.lora, &args.recipe);
    }
    let path = args
        .model_config
        .context("--dry-run needs --model-config CONFIG.json")?;
    let config = WhisperConfig::from_file(&path)?;
    // Uninitialised f32 tensors: allocated lazily by the OS, so even large-v2 costs little.
    let weights = Weights::uninitialised(Device::Cpu, Kind::Float);
    let mut model = Whisper::load(weights, &config)
        .with_context(|| format!("building the model of {}", path.display()))?;
    let adapter = Adapter::init(args.lora.config(), &model.linear_sites(), Device::Cpu)?;
    model.attach(&adapter);
    let (trainable, all) = model.parameter_counts();
    println!(
        "{} adapted layers ({} r={} alpha={})",
        adapter.layers.len(),
        match &adapter.config.target_modules {
            TargetModules::Names(names) => names.join(","),
            TargetModules::Regex(pattern) => format!("regex {pattern}"),
        },
        adapter.config.r,
        adapter.config.alpha
    );
    println!("{}", trainable_parameters_line(trainable, all));
    Ok(())
}
