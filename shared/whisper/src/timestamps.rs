//! Timestamp tokens: openai's `ApplyTimestampRules` (HF's `WhisperTimeStampLogitsProcessor`)
//! and the segments a timestamped token sequence describes.

use tch::{Kind, Tensor};

use crate::generation::GenerationConfig;

/// Seconds per timestamp token step.
pub const TIMESTAMP_STEP_SECONDS: f64 = 0.02;

/// The timestamp rules for one decoding: timestamps come in pairs (except right before the end
/// of text), never decrease, the first token is a timestamp no later than
/// `max_initial_timestamp_index` steps, and when the timestamps together are more likely than
/// any text token, a timestamp is taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimestampRules {
    pub timestamp_begin: i64,
    pub no_timestamps: i64,
    pub eot: i64,
    pub max_initial_timestamp_index: Option<i64>,
}

impl TimestampRules {
    pub fn new(generation: &GenerationConfig) -> Self {
        Self {
            timestamp_begin: generation.timestamp_begin(),
            no_timestamps: generation.no_timestamps_token_id,
            eot: generation.eos_token_id,
            max_initial_timestamp_index: Some(generation.max_initial_timestamp_index),
        }
    }

    /// Masks `logits` (`[B, V]`, float) given the tokens generated so far by each row.
    pub fn apply(&self, logits: &mut Tensor, generated: &[Vec<i64>]) {
        let vocab = logits.size()[1];
        let tb = self.timestamp_begin.min(vocab);
        let ban = |logits: &mut Tensor, row: i64, from: i64, to: i64| {
            let (from, to) = (from.clamp(0, vocab), to.clamp(0, vocab));
            if to > from {
                let _ = logits
                    .get(row)
                    .narrow(0, from, to - from)
                    .fill_(f64::NEG_INFINITY);
            }
        };
        for (k, seq) in generated.iter().enumerate() {
            let row = k as i64;
            ban(logits, row, self.no_timestamps, self.no_timestamps + 1);
            let is_ts = |t: i64| t >= self.timestamp_begin;
            let last_was_timestamp = seq.last().is_some_and(|&t| is_ts(t));
            let penultimate_was_timestamp = seq.len() < 2 || is_ts(seq[seq.len() - 2]);
            if last_was_timestamp {
                if penultimate_was_timestamp {
                    ban(logits, row, tb, vocab);
                } else {
                    ban(logits, row, 0, self.eot);
                }
            }
            if let Some(&last_ts) = seq.iter().rev().find(|&&t| is_ts(t)) {
                let upto = if last_was_timestamp && !penultimate_was_timestamp {
                    last_ts
                } else {
                    last_ts + 1
                };
                ban(logits, row, tb, upto);
            }
            if seq.is_empty() {
                ban(logits, row, 0, tb);
                if let Some(index) = self.max_initial_timestamp_index {
                    ban(logits, row, tb + index + 1, vocab);
                }
            }
        }
        // Take a timestamp when the timestamps together outweigh the best text token.
        let logprobs = logits.log_softmax(-1, Kind::Float);
        let timestamp_mass = logprobs.narrow(1, tb, vocab - tb).logsumexp([1], false);
        let best_text = logprobs.narrow(1, 0, tb).amax([1], false);
        let prefer =
            Vec::<bool>::try_from(&timestamp_mass.gt_tensor(&best_text)).unwrap_or_default();
        for (k, prefer) in prefer.into_iter().enumerate() {
            if prefer && k < generated.len() {
                ban(logits, k as i64, 0, tb);
            }
        }
    }
}

/// A piece of transcript between two timestamps, in seconds from the window start.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedTokens {
    pub start: f64,
    pub end: f64,
    pub tokens: Vec<i64>,
}

/// Splits `<|t0|> text <|t1|><|t1|> text <|t2|> ...` into timed pieces; text after the last
/// timestamp ends at `window_end`.
pub fn segments_from_tokens(
    tokens: &[i64],
    rules: &TimestampRules,
    window_end: f64,
) -> Vec<TimedTokens> {
    let seconds = |t: i64| (t - rules.timestamp_begin) as f64 * TIMESTAMP_STEP_SECONDS;
    let mut segments = Vec::new();
    let mut start = None;
    let mut text = Vec::new();
    for &token in tokens {
        if token >= rules.timestamp_begin {
            if text.is_empty() {
                start = Some(seconds(token));
            } else {
                segments.push(TimedTokens {
                    start: start.unwrap_or(0.0),
                    end: seconds(token),
                    tokens: std::mem::take(&mut text),
                });
                start = None;
            }
        } else if token != rules.eot {
            text.push(token);
        }
    }
    if !text.is_empty() {
        segments.push(TimedTokens {
            start: start.unwrap_or(0.0),
            end: window_end,
            tokens: text,
        });
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> TimestampRules {
        TimestampRules {
            timestamp_begin: 10,
            no_timestamps: 9,
            eot: 8,
            max_initial_timestamp_index: Some(2),
        }
    }

    fn masked(generated: Vec<i64>) -> Vec<bool> {
        let mut logits = Tensor::zeros([1, 20], (Kind::Float, tch::Device::Cpu));
        rules().apply(&mut logits, &[generated]);
        Vec::<f32>::try_from(logits.get(0))
            .unwrap()
            .iter()
            .map(|v| v.is_infinite())
            .collect()
    }

    #[test]
    fn first_token_is_an_early_timestamp() {
        let m = masked(vec![]);
        assert!(m[..10].iter().all(|&b| b), "text is banned first");
        assert!(!m[10] && !m[12] && m[13], "timestamps up to index 2 only");
    }

    #[test]
    fn timestamps_pair_up_and_never_decrease() {
        // After text then a timestamp: another timestamp (>= it) or end of text, no text
        // (with flat logits the timestamps' mass wins, so end of text goes too).
        let m = masked(vec![11, 3, 14]);
        assert!(m[..8].iter().all(|&b| b));
        assert!(m[10..14].iter().all(|&b| b) && !m[14]);
        // After a pair: text next.
        let m = masked(vec![11, 3, 14, 14]);
        assert!(m[10..].iter().all(|&b| b));
    }

    #[test]
    fn splits_segments() {
        let tokens = [10, 1, 2, 15, 15, 3, 20, 8];
        let segments = segments_from_tokens(&tokens, &rules(), 30.0);
        assert_eq!(segments.len(), 2);
        assert_eq!(
            (
                segments[0].start,
                segments[0].end,
                segments[0].tokens.clone()
            ),
            (0.0, 0.1, vec![1, 2])
        );
        assert_eq!((segments[1].start, segments[1].end), (0.1, 0.2));
    }
}
