//! A model directory loaded for transcription: the network at a chosen precision, its
//! generation config and tokenizer, and short-form decoding of normalised 30 s windows.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use crate::beam::BeamOptions;
use crate::fallback::{DecodeSettings, FallbackOptions};
use crate::generation::{GenerationConfig, Task};
use crate::linear::DEFAULT_OUTLIER_THRESHOLD;
use crate::model::Whisper;
use crate::sampling::{mix, window_seed};
use crate::timestamps::{segments_from_tokens, TimestampRules};
use crate::tokenizer::WhisperTokenizer;
use crate::weights::{OutputProjection, Weights};
use crate::WhisperConfig;

/// How the base weights are held and computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    /// CUDA only.
    Fp16,
    /// CUDA only.
    Bf16,
    /// Linear weights int8 with per-channel scales (int8 GEMM); the rest fp32.
    Int8,
}

impl Precision {
    fn compute_kind(self) -> Kind {
        match self {
            Precision::Fp16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp32 | Precision::Int8 => Kind::Float,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub device: Device,
    pub precision: Precision,
    /// LLM.int8 outlier threshold for int8 linears.
    pub outlier_threshold: f64,
    /// How the logits projection is held (see [`OutputProjection`]); `None`: for int8 on the
    /// CPU [`OutputProjection::cpu_default`], otherwise tied to the embedding.
    pub output_projection: Option<OutputProjection>,
    /// int8: outlier columns per window rather than per batch, so a window's transcript does
    /// not depend on the windows decoded with it (see [`Whisper::set_per_sample_outliers`]).
    pub per_sample_outliers: bool,
    /// int8 inference in bfloat16 products where float32 would run on the CPU: the encoder's
    /// self-attention (see [`crate::attention_bf16`]) and the float part of large int8
    /// products (see [`crate::linear::Linear::set_bf16_float_part`]). `None`: for int8 on a
    /// CPU with AVX512-BF16 (`ASR_CPU_BF16=on|off` overrides that choice, e.g. to time both on
    /// one machine). fp32 keeps float32 throughout, the precision the parity tests hold to
    /// HF's.
    pub cpu_bf16: Option<bool>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            precision: Precision::Int8,
            outlier_threshold: DEFAULT_OUTLIER_THRESHOLD,
            output_projection: None,
            per_sample_outliers: false,
            cpu_bf16: None,
        }
    }
}

/// Decoding settings for one request.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// ISO code ("zh"); `None` detects the language from the first window.
    pub language: Option<String>,
    pub task: Task,
    pub max_new_tokens: usize,
    /// 1 = greedy.
    pub beam_size: usize,
    pub patience: f64,
    pub length_penalty: Option<f64>,
    /// Timestamp tokens and timed segments.
    pub timestamps: bool,
    /// Temperatures, thresholds and the silence rule (openai's defaults).
    pub fallback: FallbackOptions,
    /// Text given to the decoder as if it preceded the audio (vocabulary, spelling, style).
    pub initial_prompt: Option<String>,
    /// Long-form: each window is prompted with the text of the previous ones (until a
    /// decoding needs a temperature above 0.5).
    pub condition_on_previous_text: bool,
}

impl DecodeOptions {
    /// One deterministic pass without thresholds (HF `generate`'s default behaviour).
    pub fn without_fallback(self) -> Self {
        Self {
            fallback: FallbackOptions::none(),
            ..self
        }
    }
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            language: None,
            task: Task::Transcribe,
            max_new_tokens: 224,
            beam_size: 1,
            patience: 1.0,
            length_penalty: None,
            timestamps: false,
            fallback: FallbackOptions::default(),
            initial_prompt: None,
            condition_on_previous_text: true,
        }
    }
}

/// What one window decoded to.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowTranscript {
    pub language: Option<String>,
    pub tokens: Vec<i64>,
    pub text: String,
    /// With timestamps: the timed pieces, in seconds from the window start.
    pub segments: Vec<TimedText>,
    /// Mean log-probability per token (openai's `avg_logprob`).
    pub avg_logprob: f64,
    /// Probability of `<|nospeech|>`.
    pub no_speech_prob: Option<f64>,
    /// The temperature of the decoding kept (above 0 after a fallback).
    pub temperature: f64,
    pub compression_ratio: f64,
    /// Judged silent by the no-speech rule: no tokens, text or segments.
    pub silent: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TimedText {
    pub start: f64,
    pub end: f64,
    pub text: String,
}

/// [`LoadOptions::cpu_bf16`]'s choice: for `int8_on_cpu` where the CPU has AVX512-BF16,
/// unless `ASR_CPU_BF16` says `off` (or `on`: wherever the CPU has it).
fn cpu_bf16_default(int8_on_cpu: bool) -> bool {
    match std::env::var("ASR_CPU_BF16").as_deref() {
        Ok("off") => false,
        Ok("on") => crate::attention_bf16::supported(),
        _ => int8_on_cpu && crate::attention_bf16::supported(),
    }
}

pub struct LoadedModel {
    pub model: Whisper,
    pub generation: GenerationConfig,
    pub tokenizer: WhisperTokenizer,
    pub dir: PathBuf,
    pub options: LoadOptions,
}

impl LoadedModel {
    pub fn load(dir: &Path, options: LoadOptions) -> anyhow::Result<Self> {
        if matches!(options.precision, Precision::Fp16 | Precision::Bf16)
            && options.device == Device::Cpu
        {
            anyhow::bail!(
                "{:?} needs a CUDA device; use int8 or fp32 on the CPU",
                options.precision
            );
        }
        let config = WhisperConfig::from_file(&dir.join("config.json"))?;
        let generation = GenerationConfig::from_file(&dir.join("generation_config.json"))?;
        let tokenizer =
            WhisperTokenizer::from_file(&dir.join("tokenizer.json"), generation.eos_token_id)?;
        let mut weights = Weights::from_dir(dir, options.device, options.precision.compute_kind())?
            .with_output_projection(options.output_projection.unwrap_or(
                if options.precision == Precision::Int8 && options.device == Device::Cpu {
                    OutputProjection::cpu_default()
                } else {
                    OutputProjection::Tied
                },
            ));
        if options.precision == Precision::Int8 {
            weights = weights.with_int8_linears(options.outlier_threshold);
        }
        let mut model = Whisper::load(weights, &config)
            .with_context(|| format!("building Whisper from {}", dir.display()))?;
        model.set_per_sample_outliers(options.per_sample_outliers);
        model.set_cpu_bf16(options.cpu_bf16.unwrap_or_else(|| {
            cpu_bf16_default(options.precision == Precision::Int8 && options.device == Device::Cpu)
        }));
        Ok(Self {
            model,
            generation,
            tokenizer,
            dir: dir.to_path_buf(),
            options,
        })
    }

    pub fn n_mels(&self) -> usize {
        self.model.config.num_mel_bins
    }

    /// Windows (`[n_mels * 3000]` each, mel-major as `asr_audio::normalize_window` returns
    /// them) as one batch tensor on the model's device and kind.
    pub fn batch(&self, windows: &[Vec<f32>]) -> Tensor {
        let n_mels = self.n_mels() as i64;
        let flat: Vec<f32> = windows.concat();
        Tensor::from_slice(&flat)
            .view([windows.len() as i64, n_mels, 3000])
            .to_device(self.options.device)
            .to_kind(self.options.precision.compute_kind())
    }

    /// Language code of each window, from the decoder's first step after start-of-transcript.
    pub fn detect_language(&self, mel: &Tensor) -> anyhow::Result<Vec<String>> {
        let encoder_out = tch::no_grad(|| self.model.encoder.forward_windows(mel));
        self.detect_language_encoded(&encoder_out)
    }

    /// [`Self::detect_language`] of encoded windows (`[B, 1500, D]`).
    pub fn detect_language_encoded(&self, encoder_out: &Tensor) -> anyhow::Result<Vec<String>> {
        let (codes, ids): (Vec<String>, Vec<i64>) = self
            .generation
            .lang_to_id
            .iter()
            .map(|(token, &id)| {
                (
                    token
                        .trim_start_matches("<|")
                        .trim_end_matches("|>")
                        .to_string(),
                    id,
                )
            })
            .unzip();
        anyhow::ensure!(!ids.is_empty(), "this model has no language tokens");
        tch::no_grad(|| {
            let device = encoder_out.device();
            let mut cache = self.model.decoder.new_cache(encoder_out);
            let start = Tensor::from_slice(&[self.generation.decoder_start_token_id])
                .to_device(device)
                .unsqueeze(0)
                .repeat([encoder_out.size()[0], 1]);
            let logits = self.model.decoder.forward(&start, &mut cache).select(1, 0);
            let language_logits =
                logits.index_select(1, &Tensor::from_slice(&ids).to_device(device));
            let best = Vec::<i64>::try_from(&language_logits.argmax(-1, false))?;
            Ok(best
                .into_iter()
                .map(|i| codes[i as usize].clone())
                .collect())
        })
    }

    /// The tokens of `options.initial_prompt` (with openai's leading space), or none.
    pub fn initial_prompt_tokens(&self, options: &DecodeOptions) -> anyhow::Result<Vec<i64>> {
        match &options.initial_prompt {
            Some(text) if !text.trim().is_empty() => {
                self.tokenizer.encode(&format!(" {}", text.trim()))
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Short-form transcription of each window (greedy, or beam search when `beam_size > 1`,
    /// with temperature fallback), prompted with the initial prompt if any.
    pub fn transcribe_windows(
        &self,
        windows: &[Vec<f32>],
        options: &DecodeOptions,
    ) -> anyhow::Result<Vec<WindowTranscript>> {
        let previous = self.initial_prompt_tokens(options)?;
        self.transcribe_windows_after(windows, options, &previous)
    }

    /// [`Self::transcribe_windows`] after the given previous-text tokens.
    pub fn transcribe_windows_after(
        &self,
        windows: &[Vec<f32>],
        options: &DecodeOptions,
        previous: &[i64],
    ) -> anyhow::Result<Vec<WindowTranscript>> {
        let seeds: Vec<u64> = windows
            .iter()
            .map(|w| window_seed(options.fallback.seed, w))
            .collect();
        self.transcribe_encoded_seeded(&self.encode_windows(windows), &seeds, options, previous)
    }

    /// The encoder's output for `windows`, `[N, frames / 2, d_model]`: what
    /// [`Self::transcribe_encoded`] decodes, once or with several settings.
    pub fn encode_windows(&self, windows: &[Vec<f32>]) -> Tensor {
        let mel = self.batch(windows);
        tch::no_grad(|| self.model.encoder.forward_windows(&mel))
    }

    /// [`Self::transcribe_windows_after`] from the windows' encoder output. Sampling (at
    /// temperatures above 0) is seeded by the fallback seed and each window's position.
    pub fn transcribe_encoded(
        &self,
        encoder_out: &Tensor,
        options: &DecodeOptions,
        previous: &[i64],
    ) -> anyhow::Result<Vec<WindowTranscript>> {
        let count = encoder_out.size()[0] as u64;
        let seeds: Vec<u64> = (0..count).map(|i| mix(options.fallback.seed, i)).collect();
        self.transcribe_encoded_seeded(encoder_out, &seeds, options, previous)
    }

    /// [`Self::transcribe_encoded`] with one sampling seed per window (an error otherwise).
    pub fn transcribe_encoded_seeded(
        &self,
        encoder_out: &Tensor,
        window_seeds: &[u64],
        options: &DecodeOptions,
        previous: &[i64],
    ) -> anyhow::Result<Vec<WindowTranscript>> {
        let count = encoder_out.size()[0] as usize;
        anyhow::ensure!(
            window_seeds.len() == count,
            "{} sampling seeds for {count} windows",
            window_seeds.len()
        );
        let languages: Vec<Option<String>> = match &options.language {
            Some(code) => vec![Some(code.clone()); count],
            None if self.generation.is_multilingual => self
                .detect_language_encoded(encoder_out)?
                .into_iter()
                .map(Some)
                .collect(),
            None => vec![None; count],
        };
        let rules = TimestampRules::new(&self.generation);
        let settings = DecodeSettings {
            beam: BeamOptions {
                beam_size: options.beam_size,
                patience: options.patience,
                length_penalty: options.length_penalty,
                max_new_tokens: options.max_new_tokens,
                timestamps: None,
            },
            timestamps: options.timestamps.then_some(&rules),
            fallback: &options.fallback,
        };
        // Windows with the same language decode as one batch.
        let mut results: Vec<Option<WindowTranscript>> = vec![None; count];
        let mut remaining: Vec<usize> = (0..count).collect();
        while let Some(&first) = remaining.first() {
            let language = languages[first].clone();
            let (group, rest): (Vec<usize>, Vec<usize>) =
                remaining.iter().partition(|&&i| languages[i] == language);
            remaining = rest;
            let prompt = self.generation.prompt_after(
                previous,
                language.as_deref(),
                options.task,
                options.timestamps,
            )?;
            let index = Tensor::from_slice(&group.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(encoder_out.device());
            let group_seeds: Vec<u64> = group.iter().map(|&i| window_seeds[i]).collect();
            let decoded = self.decode_with_fallback(
                &encoder_out.index_select(0, &index),
                &group_seeds,
                &prompt,
                &settings,
            )?;
            for (&i, decoded) in group.iter().zip(decoded) {
                let silent = options.fallback.is_silence(&decoded);
                let (tokens, text) = if silent {
                    (Vec::new(), String::new())
                } else {
                    (decoded.tokens, decoded.text)
                };
                let pieces = if options.timestamps {
                    segments_from_tokens(&tokens, &rules, 30.0)
                } else {
                    Vec::new()
                };
                let segments = pieces
                    .into_iter()
                    .map(|p| {
                        Ok(TimedText {
                            start: p.start,
                            end: p.end,
                            text: self.tokenizer.decode(&p.tokens)?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                results[i] = Some(WindowTranscript {
                    language: language.clone(),
                    tokens,
                    text,
                    segments,
                    avg_logprob: decoded.avg_logprob,
                    no_speech_prob: decoded.no_speech_prob,
                    temperature: decoded.temperature,
                    compression_ratio: decoded.compression_ratio,
                    silent,
                });
            }
        }
        Ok(results.into_iter().flatten().collect())
    }
}
