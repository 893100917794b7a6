//! A model directory loaded for transcription: the network at a chosen precision, its
//! generation config and tokenizer, and short-form decoding of normalised 30 s windows.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use crate::beam::{beam_search, BeamOptions};
use crate::generation::{GenerationConfig, Task};
use crate::greedy::{greedy_detailed, GreedyOutput, ENCODER_CHUNK};
use crate::linear::DEFAULT_OUTLIER_THRESHOLD;
use crate::model::Whisper;
use crate::timestamps::{segments_from_tokens, TimestampRules};
use crate::tokenizer::WhisperTokenizer;
use crate::weights::Weights;
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            precision: Precision::Int8,
            outlier_threshold: DEFAULT_OUTLIER_THRESHOLD,
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
    /// Timestamp tokens and timed segments (greedy only for now).
    pub timestamps: bool,
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
    /// Probability of `<|nospeech|>` (greedy decoding only).
    pub no_speech_prob: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TimedText {
    pub start: f64,
    pub end: f64,
    pub text: String,
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
        let mut weights = Weights::from_dir(dir, options.device, options.precision.compute_kind())?;
        if options.precision == Precision::Int8 {
            weights = weights.with_int8_linears(options.outlier_threshold);
        }
        let model = Whisper::load(weights, &config)
            .with_context(|| format!("building Whisper from {}", dir.display()))?;
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
            let encoder_out = self.model.encoder.forward_in_chunks(mel, ENCODER_CHUNK);
            let mut cache = self.model.decoder.new_cache(&encoder_out);
            let start = Tensor::from_slice(&[self.generation.decoder_start_token_id])
                .to_device(mel.device())
                .unsqueeze(0)
                .repeat([mel.size()[0], 1]);
            let logits = self.model.decoder.forward(&start, &mut cache).select(1, 0);
            let language_logits =
                logits.index_select(1, &Tensor::from_slice(&ids).to_device(mel.device()));
            let best = Vec::<i64>::try_from(&language_logits.argmax(-1, false))?;
            Ok(best
                .into_iter()
                .map(|i| codes[i as usize].clone())
                .collect())
        })
    }

    /// Short-form transcription of each window (greedy, or beam search when `beam_size > 1`).
    pub fn transcribe_windows(
        &self,
        windows: &[Vec<f32>],
        options: &DecodeOptions,
    ) -> anyhow::Result<Vec<WindowTranscript>> {
        anyhow::ensure!(
            !(options.timestamps && options.beam_size > 1),
            "timestamps with beam search are not supported yet; use greedy (beam 1)"
        );
        let mel = self.batch(windows);
        let languages: Vec<Option<String>> = match &options.language {
            Some(code) => vec![Some(code.clone()); windows.len()],
            None if self.generation.is_multilingual => {
                self.detect_language(&mel)?.into_iter().map(Some).collect()
            }
            None => vec![None; windows.len()],
        };
        // Windows with the same language decode as one batch.
        let mut results: Vec<Option<WindowTranscript>> = vec![None; windows.len()];
        let mut remaining: Vec<usize> = (0..windows.len()).collect();
        while let Some(&first) = remaining.first() {
            let language = languages[first].clone();
            let (group, rest): (Vec<usize>, Vec<usize>) =
                remaining.iter().partition(|&&i| languages[i] == language);
            remaining = rest;
            let rules = TimestampRules::new(&self.generation);
            let prompt =
                self.generation
                    .prompt(language.as_deref(), options.task, options.timestamps)?;
            let index = Tensor::from_slice(&group.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(mel.device());
            let group_mel = mel.index_select(0, &index);
            let eot = self.generation.eos_token_id;
            let decoded: Vec<GreedyOutput> = if options.beam_size > 1 {
                let beam = BeamOptions {
                    beam_size: options.beam_size,
                    patience: options.patience,
                    length_penalty: options.length_penalty,
                    max_new_tokens: options.max_new_tokens,
                };
                (0..group.len() as i64)
                    .map(|i| {
                        let best = beam_search(
                            &self.model,
                            &self.generation,
                            &group_mel.narrow(0, i, 1),
                            &prompt,
                            &beam,
                        );
                        GreedyOutput {
                            tokens: best.tokens,
                            sum_logprob: best.sum_logprob,
                            no_speech_prob: f64::NAN,
                        }
                    })
                    .collect()
            } else {
                greedy_detailed(
                    &self.model,
                    &self.generation,
                    &group_mel,
                    &prompt,
                    options.max_new_tokens,
                    options.timestamps.then_some(&rules),
                )
            };
            for (&i, output) in group.iter().zip(decoded) {
                let avg_logprob = output.avg_logprob(eot);
                let no_speech_prob =
                    (!output.no_speech_prob.is_nan()).then_some(output.no_speech_prob);
                let tokens = output.tokens;
                let text = self.tokenizer.decode(&tokens)?;
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
                    avg_logprob,
                    no_speech_prob,
                });
            }
        }
        Ok(results.into_iter().flatten().collect())
    }
}
