//! Whisper on libtorch.
//!
//! - [`config`]: the HF `config.json` of every Whisper size;
//! - [`weights`]: named tensors of an HF safetensors directory;
//! - [`linear`], [`model`]: the network (HF names and layout), no I/O; [`attention_bf16`]:
//!   attention in bfloat16 products on CPUs with AVX512-BF16; [`projection_bf16`]: the
//!   logits projection there;
//! - [`dataset`], [`feature_cache`]: JSONL manifests and Common Voice releases; features
//!   computed once, content-addressed on disk;
//! - [`labels`]: training labels and decoder inputs as the recipe's collator makes them;
//! - [`train_data`]: examples (cached windows and labels) from a dataset;
//! - [`trainer`]: the recipe's training loop with checkpoints and exact resumption;
//! - [`evaluation`]: CER by generation, as `predict_with_generate`;
//! - [`optim`]: AdamW, the linear schedule and gradient clipping, as the HF Trainer uses them;
//! - [`lora`], [`adapter_io`], [`lora_combine`]: LoRA adapters with PEFT's semantics, file
//!   layout and weighted combinations;
//! - [`generation`]: generation_config.json (prompt tokens, suppression);
//! - [`greedy`], [`beam`]: greedy decoding (and sampling) and openai-style beam search;
//! - [`fallback`]: temperature fallback, compression ratio and the no-speech rule;
//!   [`sampling`]: the seeded per-row generators it samples with;
//! - [`timestamps`]: timestamp rules and segments; [`longform`]: seek-based long-form;
//! - [`tokenizer`]: tokenizer.json; [`metrics`]: character error rate;
//! - [`transcriber`]: a loaded model directory and short-form transcription of windows;
//! - [`ct2`]: reading CTranslate2 / faster-whisper directories and converting them to HF
//!   safetensors directories.

pub mod adapter_io;
pub mod attention_bf16;
pub mod beam;
pub mod config;
pub mod ct2;
pub mod dataset;
pub mod evaluation;
pub mod fallback;
pub mod feature_cache;
pub mod generation;
pub mod greedy;
pub mod int8_gemm;
mod kv_cache;
pub mod labels;
pub mod linear;
pub mod longform;
pub mod lora;
pub mod lora_combine;
pub mod lora_dropout;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod projection_bf16;
pub mod sampling;
pub mod timestamps;
pub mod tokenizer;
pub mod train_data;
pub mod trainer;
pub mod transcriber;
pub mod weights;

pub use config::WhisperConfig;
pub use fallback::FallbackOptions;
pub use generation::{GenerationConfig, Task};
pub use lora::{Adapter, LoraBias, LoraConfig, TargetModules};
pub use model::{Decoder, DecoderCache, Encoder, Whisper};
pub use tokenizer::WhisperTokenizer;
pub use transcriber::{
    DecodeOptions, LoadOptions, LoadedModel, Precision, TimedText, WindowTranscript,
};
pub use weights::{OutputProjection, Weights};
