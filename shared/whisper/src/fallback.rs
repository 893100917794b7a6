//! openai's `decode_with_fallback`: decode at temperature 0 (greedy or beam search); a window
//! whose text is too repetitive (gzip compression ratio above 2.4) or too unlikely (average
//! log-probability below -1) is decoded again at the next temperature (0.2, 0.4, ... 1.0),
//! sampling `best_of` candidates and keeping the most likely, unless it looks like silence
//! (no-speech probability above 0.6 and a low average log-probability).

use std::io::Write;

use tch::Tensor;

use crate::beam::{beam_search, BeamOptions, Hypothesis};
use crate::greedy::{decode_greedy, GreedyOptions, GreedyOutput};
use crate::sampling::mix;
use crate::timestamps::TimestampRules;
use crate::transcriber::LoadedModel;

/// When a decoding is redone at a higher temperature, and when a window counts as silence.
#[derive(Debug, Clone, PartialEq)]
pub struct FallbackOptions {
    /// Tried in order; a single 0 means no fallback.
    pub temperatures: Vec<f64>,
    /// Sampled candidates per window at temperatures above 0.
    pub best_of: usize,
    pub compression_ratio_threshold: Option<f64>,
    pub logprob_threshold: Option<f64>,
    pub no_speech_threshold: Option<f64>,
    /// Seeds the sampling at temperatures above 0, together with each window's content: each
    /// window draws from its own generator, so nothing decoded alongside (or on another
    /// thread) moves its draws.
    pub seed: u64,
}

impl Default for FallbackOptions {
    /// openai's and faster-whisper's defaults.
    fn default() -> Self {
        Self {
            temperatures: vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            best_of: 5,
            compression_ratio_threshold: Some(2.4),
            logprob_threshold: Some(-1.0),
            no_speech_threshold: Some(0.6),
            seed: 0,
        }
    }
}

impl FallbackOptions {
    /// One deterministic pass, no thresholds: what HF `generate` does by default.
    pub fn none() -> Self {
        Self {
            temperatures: vec![0.0],
            best_of: 1,
            compression_ratio_threshold: None,
            logprob_threshold: None,
            no_speech_threshold: None,
            seed: 0,
        }
    }

    /// openai's silence rule: likely no speech and not confidently decoded.
    pub fn is_silence(&self, decoded: &Decoded) -> bool {
        match (self.no_speech_threshold, decoded.no_speech_prob) {
            (Some(threshold), Some(p)) if p > threshold => self
                .logprob_threshold
                .is_none_or(|limit| decoded.avg_logprob < limit),
            _ => false,
        }
    }

    fn needs_fallback(&self, decoded: &Decoded) -> bool {
        let repetitive = self
            .compression_ratio_threshold
            .is_some_and(|limit| decoded.compression_ratio > limit);
        let unlikely = self
            .logprob_threshold
            .is_some_and(|limit| decoded.avg_logprob < limit);
        (repetitive || unlikely) && !self.is_silence(decoded)
    }
}

/// One window's final decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Generated tokens (without the prompt, with end-of-text when reached).
    pub tokens: Vec<i64>,
    pub text: String,
    pub avg_logprob: f64,
    pub no_speech_prob: Option<f64>,
    /// The temperature that produced it.
    pub temperature: f64,
    pub compression_ratio: f64,
}

/// openai's `compression_ratio`: UTF-8 length over zlib-compressed length (level 6, as
/// Python's `zlib.compress`); 0 for empty text.
pub fn compression_ratio(text: &str) -> f64 {
    if text.is_empty() {
        return 0.0;
    }
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    let compressed = encoder
        .write_all(text.as_bytes())
        .and_then(|()| encoder.finish())
        .map_or(text.len(), |bytes| bytes.len());
    text.len() as f64 / compressed.max(1) as f64
}

/// Most decoder rows (windows x samples) decoded as one batch.
pub const MAX_DECODE_ROWS: usize = 16;

/// How one group of windows is decoded.
#[derive(Debug, Clone, Copy)]
pub struct DecodeSettings<'a> {
    pub beam: BeamOptions,
    pub timestamps: Option<&'a TimestampRules>,
    pub fallback: &'a FallbackOptions,
}

impl LoadedModel {
    /// Decodes encoded windows (`[B, 1500, D]`) after `prompt` with temperature fallback;
    /// window `i` samples with generators derived from `window_seeds[i]` (see
    /// [`crate::sampling::window_seed`]).
    pub fn decode_with_fallback(
        &self,
        encoder_out: &Tensor,
        window_seeds: &[u64],
        prompt: &[i64],
        settings: &DecodeSettings,
    ) -> anyhow::Result<Vec<Decoded>> {
        let batch = encoder_out.size()[0] as usize;
        anyhow::ensure!(
            window_seeds.len() == batch,
            "{} sampling seeds for {batch} windows",
            window_seeds.len()
        );
        let mut results: Vec<Option<Decoded>> = vec![None; batch];
        let mut pending: Vec<usize> = (0..batch).collect();
        let temperatures = if settings.fallback.temperatures.is_empty() {
            vec![0.0]
        } else {
            settings.fallback.temperatures.clone()
        };
        for (attempt, &temperature) in temperatures.iter().enumerate() {
            let last = attempt + 1 == temperatures.len();
            let index = Tensor::from_slice(&pending.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(encoder_out.device());
            let encoded = encoder_out.index_select(0, &index);
            let seeds: Vec<u64> = pending
                .iter()
                .map(|&i| mix(window_seeds[i], attempt as u64))
                .collect();
            let candidates = self.decode_at(&encoded, &seeds, prompt, settings, temperature)?;
            let mut still_pending = Vec::new();
            for (&i, decoded) in pending.iter().zip(candidates) {
                if !last && settings.fallback.needs_fallback(&decoded) {
                    still_pending.push(i);
                }
                results[i] = Some(decoded);
            }
            pending = still_pending;
            if pending.is_empty() {
                break;
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// One attempt at `temperature` for every row of `encoded` (`seeds`: one per row).
    fn decode_at(
        &self,
        encoded: &Tensor,
        seeds: &[u64],
        prompt: &[i64],
        settings: &DecodeSettings,
        temperature: f64,
    ) -> anyhow::Result<Vec<Decoded>> {
        let eot = self.generation.eos_token_id;
        let rows = encoded.size()[0];
        let outputs: Vec<GreedyOutput> = if temperature <= 0.0 && settings.beam.beam_size > 1 {
            let beam = BeamOptions {
                timestamps: settings.timestamps.copied(),
                ..settings.beam
            };
            (0..rows)
                .map(|i| {
                    let result = beam_search(
                        &self.model,
                        &self.generation,
                        &encoded.narrow(0, i, 1),
                        prompt,
                        &beam,
                    );
                    GreedyOutput {
                        tokens: result.best.tokens,
                        sum_logprob: result.best.sum_logprob,
                        no_speech_prob: result.no_speech_prob,
                    }
                })
                .collect()
        } else {
            let samples = if temperature > 0.0 {
                settings.fallback.best_of.max(1)
            } else {
                1
            };
            // Sample `s` of window `w` draws from its own generator.
            let row_seeds: Vec<u64> = seeds
                .iter()
                .flat_map(|&seed| (0..samples as u64).map(move |s| mix(seed, s)))
                .collect();
            // Windows decoded together, so that best-of sampling of many windows keeps the
            // decoder batch (and its cross-attention cache) bounded.
            let windows_per_chunk = (MAX_DECODE_ROWS / samples).max(1) as i64;
            let mut all = Vec::with_capacity(rows as usize * samples);
            for start in (0..rows).step_by(windows_per_chunk as usize) {
                let chunk = encoded.narrow(0, start, windows_per_chunk.min(rows - start));
                let repeated = if samples > 1 {
                    chunk.repeat_interleave_self_int(samples as i64, 0, None)
                } else {
                    chunk
                };
                let first_row = start as usize * samples;
                let options = GreedyOptions {
                    max_new_tokens: settings.beam.max_new_tokens,
                    temperature,
                    timestamps: settings.timestamps,
                    row_seeds: row_seeds.get(first_row..).unwrap_or(&[]),
                };
                all.extend(decode_greedy(
                    &self.model,
                    &self.generation,
                    &repeated,
                    prompt,
                    &options,
                ));
            }
            // The most likely of each window's samples (openai's MaximumLikelihoodRanker).
            all.chunks(samples)
                .map(|group| {
                    group
                        .iter()
                        .max_by(|a, b| {
                            let score = |o: &GreedyOutput| {
                                Hypothesis {
                                    tokens: o.tokens.clone(),
                                    sum_logprob: o.sum_logprob,
                                }
                                .score(eot, settings.beam.length_penalty)
                            };
                            score(a)
                                .partial_cmp(&score(b))
                                .unwrap_or(std::cmp::Ordering::Equal)
                        })
                        .cloned()
                        .unwrap_or(GreedyOutput {
                            tokens: Vec::new(),
                            sum_logprob: 0.0,
                            no_speech_prob: 0.0,
                        })
                })
                .collect()
        };
        outputs
            .into_iter()
            .map(|output| {
                let text = self.tokenizer.decode(&output.tokens)?;
                Ok(Decoded {
                    avg_logprob: output.avg_logprob(eot),
                    no_speech_prob: Some(output.no_speech_prob),
                    compression_ratio: compression_ratio(text.trim()),
                    text,
                    tokens: output.tokens,
                    temperature,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_ratio_of_repetitive_text_is_high() {
        let repeated = "我们我们".repeat(30);
        assert!(compression_ratio(&repeated) > 2.4);
        assert!(compression_ratio("今天天气很好。") < 2.4);
        assert_eq!(compression_ratio(""), 0.0);
        // Python's `len(b) / len(zlib.compress(b))` for the same texts.
        assert_eq!(
            compression_ratio(&"今天天气很好。".repeat(10)),
            210.0 / 33.0
        );
        assert_eq!(
            compression_ratio("the cat sat on the mat, the cat sat on the mat"),
            46.0 / 32.0
        );
        assert_eq!(compression_ratio(&"我们".repeat(60)), 360.0 / 19.0);
    }

    #[test]
    fn silence_rule_needs_both_signals() {
        let options = FallbackOptions::default();
        let decoded = |no_speech: f64, avg_logprob: f64| Decoded {
            tokens: vec![],
            text: String::new(),
            avg_logprob,
            no_speech_prob: Some(no_speech),
            temperature: 0.0,
            compression_ratio: 1.0,
        };
        assert!(options.is_silence(&decoded(0.9, -1.5)));
        assert!(!options.is_silence(&decoded(0.9, -0.2)));
        assert!(!options.is_silence(&decoded(0.1, -1.5)));
        assert!(options.needs_fallback(&decoded(0.1, -1.5)));
        assert!(!options.needs_fallback(&decoded(0.9, -1.5)));
        assert!(!FallbackOptions::none().needs_fallback(&decoded(0.1, -5.0)));
    }
}
