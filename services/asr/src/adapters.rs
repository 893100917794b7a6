//! `asr adapters merge`: fold a LoRA adapter (ours or PEFT's) into the float weights of an HF
//! model directory, giving a plain model that any Whisper runtime loads (int8 quantises it at
//! load time like any other model).

use std::path::PathBuf;

use anyhow::{bail, Context};
use asr_whisper::weights::read_model_tensors;
use asr_whisper::{Adapter, Weights, Whisper, WhisperConfig};
use clap::{Args, Subcommand};
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum AdaptersCommand {
    /// Write MODEL with ADAPTER folded into its weights to OUTPUT.
    Merge(MergeArgs),
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
}

pub fn run(command: AdaptersCommand) -> anyhow::Result<()> {
    match command {
        AdaptersCommand::Merge(args) => merge(args),
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
    let adapter = Adapter::load_peft(&args.adapter, &model.linear_sites(), Device::Cpu)
        .with_context(|| format!("loading the adapter {}", args.adapter.display()))?;
    drop(model);
    let mut tensors = read_model_tensors(&args.model)?;
    adapter.merge_into(&mut tensors)?;
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
        "merged {} adapted layers of {} into {}",
        adapter.layers.len(),
        args.adapter.display(),
        args.output.display()
    );
    Ok(())
}
