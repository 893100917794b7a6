//! Greedy decoding of a batch of windows, as HF `generate(num_beams=1, do_sample=False)`
//! does for Whisper short-form: forced prompt, `suppress_tokens` at every step,
//! `begin_suppress_tokens` at the first generated position, the timestamp rules when
//! timestamps are asked for, stop at end-of-text.

use tch::{Kind, Tensor};

use crate::generation::GenerationConfig;
use crate::model::Whisper;
use crate::timestamps::TimestampRules;

/// Windows encoded at a time (see [`crate::model::Encoder::forward_in_chunks`]).
pub const ENCODER_CHUNK: i64 = 2;

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

/// One window's greedy result.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyOutput {
    /// Generated tokens (without the prompt, with end-of-text when reached).
    pub tokens: Vec<i64>,
    /// Sum of the chosen tokens' log-probabilities (after the logit filters), end-of-text
    /// included, as openai sums them.
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
    greedy_detailed(model, generation, mel, prompt, max_new_tokens, timestamps)
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
    max_new_tokens: usize,
    timestamps: Option<&TimestampRules>,
) -> Vec<GreedyOutput> {
    tch::no_grad(|| {
        let batch = mel.size()[0];
        let encoder_out = model.encoder.forward_in_chunks(mel, ENCODER_CHUNK);
        let mut cache = model.decoder.new_cache(&encoder_out);
        let prompt_tensor = Tensor::from_slice(prompt)
            .to_device(mel.device())
            .unsqueeze(0)
            .repeat([batch, 1]);
        let prompt_logits = model.decoder.forward(&prompt_tensor, &mut cache);
        // <|nospeech|> is the token before <|notimestamps|> in every multilingual vocabulary.
        let no_speech_token = generation.no_timestamps_token_id - 1;
        let no_speech: Vec<f64> = Vec::<f32>::try_from(
            &prompt_logits
                .select(1, 0)
                .to_kind(Kind::Float)
                .softmax(-1, Kind::Float)
                .select(1, no_speech_token),
        )
        .unwrap_or_default()
        .into_iter()
        .map(f64::from)
        .collect();
        let mut logits = prompt_logits.select(1, -1);
        let mut sums = vec![0.0f64; batch as usize];
        let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); batch as usize];
        let mut finished = vec![false; batch as usize];
        let room = generation.max_length.saturating_sub(prompt.len());
        for step in 0..max_new_tokens.min(room) {
            let mut step_logits = logits.to_kind(Kind::Float);
            suppress(&mut step_logits, &generation.suppress_tokens);
            if step == 0 {
                suppress(&mut step_logits, &generation.begin_suppress_tokens);
            }
            if let Some(rules) = timestamps {
                rules.apply(&mut step_logits, &outputs);
            }
            let next = step_logits.argmax(-1, false);
            let chosen = step_logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &next.unsqueeze(1), false)
                .squeeze_dim(1);
            let chosen: Vec<f32> = Vec::<f32>::try_from(&chosen).unwrap_or_default();
            let next_ids: Vec<i64> = Vec::<i64>::try_from(&next).unwrap_or_default();
            for (i, &token) in next_ids.iter().enumerate() {
                if !finished[i] {
                    outputs[i].push(token);
                    sums[i] += f64::from(chosen.get(i).copied().unwrap_or(0.0));
                    finished[i] = token == generation.eos_token_id;
                }
            }
            if finished.iter().all(|&f| f) {
                break;
            }
            // Finished rows keep feeding end-of-text; their outputs no longer change.
            let fed: Vec<i64> = next_ids
                .iter()
                .zip(&finished)
                .map(|(&t, &done)| if done { generation.eos_token_id } else { t })
                .collect();
            let fed = Tensor::from_slice(&fed)
                .to_device(mel.device())
                .unsqueeze(1);
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
