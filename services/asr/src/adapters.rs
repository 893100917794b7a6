//! `asr adapters merge`: fold a LoRA adapter (ours or PEFT's) into the float weights of an HF
//! model directory, giving a plain model that any Whisper runtime loads; with `--quantize
//! int8` the merged linear weights are stored int8 (bitsandbytes' layout), which our loader
//! reads as int8 layers directly.

use std::path::PathBuf;

use anyhow::{bail, Context};
use asr_whisper::adapter_io::quantize_linears;
use asr_whisper::weights::read_model_tensors;
use asr_whisper::{Adapter, Weights, Whisper, WhisperConfig};
use clap::{Args, Subcommand, ValueEnum};
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum AdaptersCommand {
    /// Write MODEL with ADAPTER folded into its weights to OUTPUT.
    Merge(MergeArgs),
    /// The model service's registry.
    List {
        #[command(flatten)]
        server: crate::remote::ModelServiceArg,
    },
    /// Load a registry adapter into the model service, importing it from --dir first.
    Load {
        name: String,
        /// A PEFT adapter directory to import as NAME, inside the model service's import
        /// root (--import-root, default <data-root>/imports): relative to it, or absolute.
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        server: crate::remote::ModelServiceArg,
    },
    /// Remove an adapter from the model service's registry.
    Delete {
        name: String,
        #[command(flatten)]
        server: crate::remote::ModelServiceArg,
    },
}

#[derive(Args)]
pub struct MergeArgs {
    /// HF-layout Whisper directory.
    #[arg(long, default_value = "assets/whisper-base")]
    model: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    force: bool,
    /// Store the merged linear weights as int8 (bitsandbytes' layout: int8 weight + SCB),
    /// about a quarter of the float32 size; any precision loads it.
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum QuantizeArg {
    Int8,
}

pub fn run(command: AdaptersCommand) -> anyhow::Result<()> {
    match command {
        AdaptersCommand::Merge(args) => merge(args),
        AdaptersCommand::List { server } => crate::remote::adapters_list(&server),
        AdaptersCommand::Load { name, dir, server } => {
            crate::remote::adapters_load(&name, dir.as_ref(), &server)
        }
        AdaptersCommand::Delete { name, server } => crate::remote::adapters_delete(&name, &server),
    }
}

fn merge(args: MergeArgs) -> anyhow::Result<()> {
    if args.output.exists() {
        if !args.force {
            bail!("{} exists (--force replaces it)", args.output.display());
        }
        std::fs::remove_dir_all(&args.output)
            .with_context(|| format!("removing {}", args.output.display()))?;
    }
    let config = WhisperConfig::from_file(&args.model.join("config.json"))?;
    // The layer names and shapes the adapter must fit, from the model itself.
    let mut model = Whisper::load(
        Weights::from_dir(&args.model, Device::Cpu, Kind::Float)?,
        &config,
    )?;
    let sites = model.linear_sites();
    let adapter = Adapter::load_peft(&args.adapter, &sites, Device::Cpu)
        .with_context(|| format!("loading the adapter {}", args.adapter.display()))?;
    drop(model);
    let mut tensors = read_model_tensors(&args.model)?;
    adapter.merge_into(&mut tensors)?;
    if args.quantize.is_some() {
        let layers: Vec<String> = sites
            .into_iter()
            .filter(|s| !s.bias_only)
            .map(|s| s.name)
            .collect();
        quantize_linears(&mut tensors, &layers)?;
    }
    std::fs::create_dir_all(&args.output)?;
    // Everything but the weights (config, generation config, tokenizer) is copied as is.
    for entry in std::fs::read_dir(&args.model)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_file() && !name.starts_with("model.safetensors") {
            std::fs::copy(&path, args.output.join(name))?;
        }
    }
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let path = args.output.join("model.safetensors");
    Tensor::write_safetensors(&named, &path)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "merged {} adapted layers of {} into {}{}",
        adapter.layers.len(),
        args.adapter.display(),
        args.output.display(),
        if args.quantize.is_some() {
            " (linear weights int8)"
        } else {
            ""
        }
    );
    Ok(())
}
