//! `asr convert --from ct2 SRC DST`: a faster-whisper / CTranslate2 Whisper directory into an
//! HF transformers directory (model.safetensors, config.json, generation_config.json,
//! tokenizer and preprocessor files).

use std::path::PathBuf;

use asr_whisper::ct2::{convert_to_hf, ConvertOptions, OutputDType};
use clap::{Args, ValueEnum};

#[derive(Args)]
pub struct ConvertArgs {
    /// Format of SRC: `ct2`, a CTranslate2 / faster-whisper directory (model.bin, config.json,
    /// tokenizer.json, vocabulary.txt).
    #[arg(long = "from", value_enum)]
    pub from: SourceFormat,
    /// The source directory.
    pub src: PathBuf,
    /// The HF directory to write (created; written beside it and renamed when complete).
    pub dst: PathBuf,
    /// Float type of the written weights: f32 (what the int8 quantiser and the fp32 parity
    /// tests load), f16, bf16, or `same` as the source's (int8 weights are dequantised to it).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// Replace DST if it exists and is not empty.
    #[arg(long)]
    pub force: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SourceFormat {
    Ct2,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
    Same,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let SourceFormat::Ct2 = args.from;
    let dtype = match args.dtype {
        DTypeArg::F32 => OutputDType::F32,
        DTypeArg::F16 => OutputDType::F16,
        DTypeArg::Bf16 => OutputDType::BF16,
        DTypeArg::Same => OutputDType::Same,
    };
    let options = ConvertOptions {
        dtype,
        overwrite: args.force,
    };
    let report = convert_to_hf(&args.src, &args.dst, &options)?;
    let c = &report.config;
    println!(
        "{} -> {}: {} tensors, {} parameters, {} (from {}), {} bytes written; d_model {}, layers {}+{}, heads {}, vocab {}, tied output {}",
        args.src.display(),
        args.dst.display(),
        report.tensors,
        report.parameters,
        report.dtype,
        report.source_dtype,
        report.bytes_written,
        c.d_model,
        c.encoder_layers,
        c.decoder_layers,
        c.encoder_attention_heads,
        c.vocab_size,
        report.tied_output
    );
    Ok(())
}
