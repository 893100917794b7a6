//! CTranslate2 / faster-whisper Whisper directories: reading `model.bin` ([`reader`]) and
//! converting a directory into an HF transformers one ([`convert`]): `model.safetensors` with
//! HF's tensor names, config.json, generation_config.json, tokenizer and feature-extractor
//! files, loadable by `WhisperForConditionalGeneration` / `WhisperProcessor.from_pretrained`
//! and by this crate's [`crate::weights::Weights`]. Pure Rust (no libtorch).

pub mod convert;
mod hf_files;
pub mod reader;

#[cfg(test)]
mod tests;

pub use convert::{convert_to_hf, ConvertOptions, ConvertReport, OutputDType};
pub use reader::{read_model_bin, Ct2DType, Ct2Model, Variable};
