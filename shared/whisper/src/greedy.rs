//! Greedy decoding (and sampling at a temperature) of a batch of windows, as HF
//! `generate(num_beams=1)` / openai's `GreedyDecoder` do for Whisper short-form: forced prompt,
//! `suppress_tokens` at every step, `begin_suppress_tokens` at the first generated position,
//! the timestamp rules when timestamps are asked for, stop at end-of-text.

use tch::{Kind, Tensor};

use crate::generation::GenerationConfig;
use crate::model::Whisper;
use crate::sampling::{sample_tokens, Sampler};
use crate::timestamps::TimestampRules;

/// Bans `tokens` (ids outside the vocabulary are ignored) from `logits` `[B, V]`.
pub fn suppress(logits: &mut Tensor, tokens: &[i64]) {
    let vocab = logits.size()[1];
    let ids: Vec<i64> = tokens
        .iter()
        .copied()
        .filter(|&t| (0..vocab).contains(&t))
        .collect();
    if ids.is_empty() {
        return;
    }
    let index = Tensor::from_slice(&ids).to_device(logits.device());
    let _ = logits.index_fill_(1, &index, f64::NEG_INFINITY);
}

/// The generation config's token bans as additive `[V]` masks (0 or -inf), built once per
/// decoding instead of at every step.
pub struct SuppressMasks {
    every_step: Tensor,
    first_step: Tensor,
}

impl SuppressMasks {
    pub fn new(generation: &GenerationConfig, vocab: i64, device: tch::Device) -> Self {
        let mask = |tokens: &[i64]| {
            let mut mask = Tensor::zeros([1, vocab], (Kind::Float, device));
            suppress(&mut mask, tokens);
            mask.squeeze_dim(0)
        };
        let every_step = mask(&generation.suppress_tokens);
        let first_step = &every_step + mask(&generation.begin_suppress_tokens);
        Self {
            every_step,
            first_step,
        }
    }

    /// Applies the bans of decoding step `step` (0 = first generated token) to `[B, V]`.
    pub fn apply(&self, logits: &mut Tensor, step: usize) {
        let mask = if step == 0 {
            &self.first_step
        } else {
            &self.every_step
        };
        *logits += mask;
    }
}

/// One window's greedy result.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyOutput {
    /// Generated tokens (without the prompt, with end-of-text when reached).
    pub tokens: Vec<i64>,
    /// Sum of the chosen tokens' log-probabilities (after the logit filters, before any
    /// temperature), end-of-text included, as openai sums them.
    pub sum_logprob: f64,
    /// Probability of `<|nospeech|>` right after start-of-transcript.
    pub no_speech_prob: f64,
}

impl GreedyOutput {
    /// openai's `avg_logprob`: the sum over (text tokens + 1).
    pub fn avg_logprob(&self, eot: i64) -> f64 {
        let text = self.tokens.iter().filter(|&&t| t != eot).count();
        self.sum_logprob / (text + 1) as f64
    }
}

/// How [`decode_greedy`] picks tokens.
#[derive(Debug, Clone, Copy)]
pub struct GreedyOptions<'a> {
    pub max_new_tokens: usize,
    /// 0: the most likely token; above 0: sampled from `softmax(logits / temperature)`.
    pub temperature: f64,
    pub timestamps: Option<&'a TimestampRules>,
    /// The seed of each row's generator when sampling (row `i` without one uses `i`).
    pub row_seeds: &'a [u64],
}

/// Decodes each window of `mel` (`[B, n_mels, 3000]`) greedily after `prompt`; returns the
/// generated tokens of each (without the prompt, with the end-of-text token when reached).
pub fn greedy(
    model: &Whisper,
    generation: &GenerationConfig,
    mel: &Tensor,
    prompt: &[i64],
    max_new_tokens: usize,
    timestamps: Option<&TimestampRules>,
) -> Vec<Vec<i64>> {
    let options = GreedyOptions {
        max_new_tokens,
        temperature: 0.0,
        timestamps,
        row_seeds: &[],
    };
    greedy_detailed(model, generation, mel, prompt, &options)
        .into_iter()
        .map(|o| o.tokens)
        .collect()
}

/// [`greedy`] with the log-probability and no-speech probability of each window.
pub fn greedy_detailed(
    model: &Whisper,
    generation: &GenerationConfig,
    mel: &Tensor,
    prompt: &[i64],
    options: &GreedyOptions,
) -> Vec<GreedyOutput> {
    let encoder_out = tch::no_grad(|| model.encoder.forward_windows(mel));
    decode_greedy(model, generation, &encoder_out, prompt, options)
}

/// Greedy decoding of already encoded windows (`[B, 1500, D]`), so that a retry at another
/// temperature does not run the encoder again. Rows that reach end-of-text leave the batch.
pub fn decode_greedy(
    model: &Whisper,
    generation: &GenerationConfig,
    encoder_out: &Tensor,
    prompt: &[i64],
    options: &GreedyOptions,
) -> Vec<GreedyOutput> {
    tch::no_grad(|| {
        let batch = encoder_out.size()[0] as usize;
        let device = encoder_out.device();
        let eot = generation.eos_token_id;
        let mut cache = model.decoder.new_cache(encoder_out);
        let prompt_tensor = Tensor::from_slice(prompt)
            .to_device(device)
            .unsqueeze(0)
            .repeat([batch as i64, 1]);
        let prompt_logits = model.decoder.forward(&prompt_tensor, &mut cache);
        let vocab = prompt_logits.size()[2];
        let masks = SuppressMasks::new(generation, vocab, device);
        let no_speech = no_speech_probs(&prompt_logits, generation, prompt);
        let mut logits = prompt_logits.select(1, -1);
        let mut sums = vec![0.0f64; batch];
        let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); batch];
        // Output index of each row still in the batch (and in the cache).
        let mut active: Vec<usize> = (0..batch).collect();
        let mut samplers: Vec<Sampler> = (0..batch)
            .map(|i| Sampler::new(options.row_seeds.get(i).copied().unwrap_or(i as u64)))
            .collect();
        let room = generation.max_length.saturating_sub(prompt.len());
        for step in 0..options.max_new_tokens.min(room) {
            let mut step_logits = logits.to_kind(Kind::Float);
            masks.apply(&mut step_logits, step);
            if let Some(rules) = options.timestamps {
                let generated: Vec<Vec<i64>> = active.iter().map(|&i| outputs[i].clone()).collect();
                rules.apply(&mut step_logits, &generated);
            }
            let next = if options.temperature > 0.0 {
                let picked =
                    sample_tokens(&step_logits, options.temperature, &mut samplers, &active);
                Tensor::from_slice(&picked).to_device(device)
            } else {
                step_logits.argmax(-1, false)
            };
            let chosen = step_logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &next.unsqueeze(1), false)
                .squeeze_dim(1);
            let chosen: Vec<f32> = Vec::<f32>::try_from(&chosen).unwrap_or_default();
            let next_ids: Vec<i64> = Vec::<i64>::try_from(&next).unwrap_or_default();
            let mut keep_rows = Vec::with_capacity(active.len());
            let mut fed = Vec::with_capacity(active.len());
            for (row, &i) in active.iter().enumerate() {
                let token = next_ids.get(row).copied().unwrap_or(eot);
                outputs[i].push(token);
                sums[i] += f64::from(chosen.get(row).copied().unwrap_or(0.0));
                if token != eot {
                    keep_rows.push(row as i64);
                    fed.push(token);
                }
            }
            if fed.is_empty() {
                break;
            }
            if keep_rows.len() < active.len() {
                cache.select(&Tensor::from_slice(&keep_rows).to_device(device));
                active = keep_rows.iter().map(|&row| active[row as usize]).collect();
            }
            let fed = Tensor::from_slice(&fed).to_device(device).unsqueeze(1);
            logits = model.decoder.forward(&fed, &mut cache).select(1, -1);
        }
        outputs
            .into_iter()
            .zip(sums)
            .enumerate()
            .map(|(i, (tokens, sum_logprob))| GreedyOutput {
                tokens,
                sum_logprob,
                no_speech_prob: no_speech.get(i).copied().unwrap_or(0.0),
            })
            .collect()
    })
}

/// Probability of `<|nospeech|>` at the start-of-transcript position of each row (the
/// prompt may begin with previous text).
pub fn no_speech_probs(
    prompt_logits: &Tensor,
    generation: &GenerationConfig,
    prompt: &[i64],
) -> Vec<f64> {
    // <|nospeech|> is the token before <|notimestamps|> in every multilingual vocabulary.
    let no_speech_token = generation.no_timestamps_token_id - 1;
    let sot_index = prompt
        .iter()
        .position(|&t| t == generation.decoder_start_token_id)
        .unwrap_or(0) as i64;
    Vec::<f32>::try_from(
        &prompt_logits
            .select(1, sot_index)
            .to_kind(Kind::Float)
            .softmax(-1, Kind::Float)
            .select(1, no_speech_token),
    )
    .unwrap_or_default()
    .into_iter()
    .map(f64::from)
    .collect()
}
