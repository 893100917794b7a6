//! Beam search as openai/whisper's `BeamSearchDecoder` + `MaximumLikelihoodRanker`: each beam
//! proposes its `beam_size + 1` best next tokens, identical candidate sequences collapse, the
//! best `beam_size` unfinished ones continue and finished ones are kept until
//! `round(beam_size * patience)` exist; the winner maximises sum log-probability divided by
//! the length penalty (the length itself, or `((5 + length) / 6) ^ length_penalty`).

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::generation::GenerationConfig;
use crate::greedy::{no_speech_probs, SuppressMasks};
use crate::model::Whisper;
use crate::timestamps::TimestampRules;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamOptions {
    pub beam_size: usize,
    pub patience: f64,
    /// `None`: divide by the length (openai's default).
    pub length_penalty: Option<f64>,
    pub max_new_tokens: usize,
    /// The timestamp rules, applied to every beam, when timestamps are decoded.
    pub timestamps: Option<TimestampRules>,
}

impl Default for BeamOptions {
    fn default() -> Self {
        Self {
            beam_size: 5,
            patience: 1.0,
            length_penalty: None,
            max_new_tokens: 224,
            timestamps: None,
        }
    }
}

/// A finished or running hypothesis: generated tokens (without the prompt) and their summed
/// log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<i64>,
    pub sum_logprob: f64,
}

impl Hypothesis {
    /// Tokens before end-of-text.
    fn text_len(&self, eot: i64) -> usize {
        self.tokens
            .iter()
            .position(|&t| t == eot)
            .unwrap_or(self.tokens.len())
    }

    /// openai's `MaximumLikelihoodRanker` score.
    pub fn score(&self, eot: i64, length_penalty: Option<f64>) -> f64 {
        let length = self.text_len(eot) as f64;
        let penalty = match length_penalty {
            None => length,
            Some(alpha) => ((5.0 + length) / 6.0).powf(alpha),
        };
        self.sum_logprob / penalty.max(f64::MIN_POSITIVE)
    }
}

/// The winner of a beam search and the window's no-speech probability.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamResult {
    pub best: Hypothesis,
    pub no_speech_prob: f64,
}

/// Beam search over one encoded window (`encoder_out` is `[1, 1500, D]`).
pub fn beam_search(
    model: &Whisper,
    generation: &GenerationConfig,
    encoder_out: &Tensor,
    prompt: &[i64],
    options: &BeamOptions,
) -> BeamResult {
    tch::no_grad(|| {
        let beam_size = options.beam_size.max(1);
        let max_candidates = ((beam_size as f64 * options.patience).round() as usize).max(1);
        let eot = generation.eos_token_id;
        let device = encoder_out.device();
        let mut cache = model
            .decoder
            .new_cache(&encoder_out.repeat([beam_size as i64, 1, 1]));
        let prompt_rows = Tensor::from_slice(prompt)
            .to_device(device)
            .unsqueeze(0)
            .repeat([beam_size as i64, 1]);
        let prompt_logits = model.decoder.forward(&prompt_rows, &mut cache);
        let no_speech_prob = no_speech_probs(&prompt_logits, generation, prompt)
            .first()
            .copied()
            .unwrap_or(0.0);
        let masks = SuppressMasks::new(generation, prompt_logits.size()[2], device);
        let mut logits = prompt_logits.select(1, -1);
        let mut beams = vec![
            Hypothesis {
                tokens: Vec::new(),
                sum_logprob: 0.0
            };
            beam_size
        ];
        let mut finished: Vec<Hypothesis> = Vec::new();
        let room = generation.max_length.saturating_sub(prompt.len());
        for step in 0..options.max_new_tokens.min(room) {
            let mut step_logits = logits.to_kind(Kind::Float);
            masks.apply(&mut step_logits, step);
            if let Some(rules) = &options.timestamps {
                let generated: Vec<Vec<i64>> = beams.iter().map(|b| b.tokens.clone()).collect();
                rules.apply(&mut step_logits, &generated);
            }
            let logprobs = step_logits.log_softmax(-1, Kind::Float);
            let (top_values, top_indices) = logprobs.topk((beam_size + 1) as i64, -1, true, true);
            let top_values = Vec::<Vec<f32>>::try_from(&top_values).unwrap_or_default();
            let top_indices = Vec::<Vec<i64>>::try_from(&top_indices).unwrap_or_default();
            // Candidates in insertion order; identical sequences collapse (the later wins, as
            // in openai's dict).
            let mut order: Vec<Vec<i64>> = Vec::new();
            let mut scored: HashMap<Vec<i64>, (f64, usize)> = HashMap::new();
            for (source, beam) in beams.iter().enumerate() {
                for (&value, &token) in top_values[source].iter().zip(&top_indices[source]) {
                    let mut tokens = beam.tokens.clone();
                    tokens.push(token);
                    if !scored.contains_key(&tokens) {
                        order.push(tokens.clone());
                    }
                    scored.insert(tokens, (beam.sum_logprob + f64::from(value), source));
                }
            }
            // Stable sort by score, best first (Python's sorted(..., reverse=True)).
            order.sort_by(|a, b| {
                scored[b]
                    .0
                    .partial_cmp(&scored[a].0)
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let mut next: Vec<(Hypothesis, usize)> = Vec::with_capacity(beam_size);
            for tokens in order {
                let (sum_logprob, source) = scored[&tokens];
                if tokens.last() == Some(&eot) {
                    if finished.len() < max_candidates {
                        finished.push(Hypothesis {
                            tokens,
                            sum_logprob,
                        });
                    }
                } else {
                    next.push((
                        Hypothesis {
                            tokens,
                            sum_logprob,
                        },
                        source,
                    ));
                    if next.len() == beam_size {
                        break;
                    }
                }
            }
            if finished.len() >= max_candidates || next.is_empty() {
                break;
            }
            let sources: Vec<i64> = next.iter().map(|(_, s)| *s as i64).collect();
            cache.select(&Tensor::from_slice(&sources).to_device(device));
            let last: Vec<i64> = next
                .iter()
                .map(|(h, _)| *h.tokens.last().unwrap_or(&eot))
                .collect();
            beams = next.into_iter().map(|(h, _)| h).collect();
            if beams.len() < beam_size {
                // Fewer live beams than rows: keep the cache shape by repeating the last one.
                break;
            }
            logits = model
                .decoder
                .forward(
                    &Tensor::from_slice(&last).to_device(device).unsqueeze(1),
                    &mut cache,
                )
                .select(1, -1);
        }
        // Not enough finished: the best running beams count as finished (openai's finalize).
        let mut running = beams;
        running.sort_by(|a, b| {
            b.sum_logprob
                .partial_cmp(&a.sum_logprob)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for beam in running {
            if finished.len() >= beam_size {
                break;
            }
            finished.push(beam);
        }
        let best = finished
            .into_iter()
            .map(|h| (h.score(eot, options.length_penalty), h))
            .fold(None::<(f64, Hypothesis)>, |best, (score, h)| match best {
                Some((s, b)) if s >= score => Some((s, b)),
                _ => Some((score, h)),
            })
            .map(|(_, h)| h)
            .unwrap_or(Hypothesis {
                tokens: Vec::new(),
                sum_logprob: 0.0,
            });
        BeamResult {
            best,
            no_speech_prob,
        }
    })
}
