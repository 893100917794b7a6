//! Long-form transcription, window after window with a seek, as openai/whisper's `transcribe`:
//! each 30 s window starting at `seek` is decoded with timestamps; when it ends inside a
//! segment (a closing timestamp pair), the next window starts at the last closed timestamp,
//! otherwise at the end of the window. Each window is prompted with the tokens of the
//! earlier ones (after the initial prompt) unless `condition_on_previous_text` is off or a
//! window needed a temperature above 0.5; windows judged silent are skipped whole.

use crate::timestamps::{segments_from_tokens, TimestampRules, TIMESTAMP_STEP_SECONDS};
use crate::transcriber::{DecodeOptions, LoadedModel, TimedText};

/// Frames per second of the log-mel input.
const FRAMES_PER_SECOND: f64 = 100.0;
const WINDOW_FRAMES: usize = 3000;

/// A segment of the whole audio, in seconds from its start.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub text: String,
    /// The text's tokens (no timestamp or special tokens).
    pub tokens: Vec<i64>,
    pub window_index: usize,
    /// Of the window the segment was decoded in.
    pub avg_logprob: f64,
    pub no_speech_prob: Option<f64>,
    /// The language the window was decoded in: given, or detected on the first window.
    pub language: Option<String>,
}

impl LoadedModel {
    /// Transcribes a whole stream of raw log-mel frames (`[frames][n_mels]`, as the feature
    /// path emits them; frames past `total_frames` are the padding's silence).
    pub fn transcribe_long(
        &self,
        raw_frames: &[f32],
        total_frames: usize,
        options: &DecodeOptions,
    ) -> anyhow::Result<Vec<Segment>> {
        let n_mels = self.n_mels();
        let options = DecodeOptions {
            timestamps: true,
            ..options.clone()
        };
        let rules = TimestampRules::new(&self.generation);
        let mut segments = Vec::new();
        let mut seek = 0usize;
        let mut window_index = 0;
        let mut language = options.language.clone();
        // Previous text (initial prompt first); the prompt uses what follows `prompt_from`.
        let mut all_tokens = self.initial_prompt_tokens(&options)?;
        let mut prompt_from = 0usize;
        while seek < total_frames {
            let end = (seek + WINDOW_FRAMES).min(total_frames);
            let available = raw_frames.len() / n_mels;
            let slice = &raw_frames[seek.min(available) * n_mels..end.min(available) * n_mels];
            let window = asr_audio::normalize_window(slice, n_mels);
            let window_options = DecodeOptions {
                language: language.clone(),
                ..options.clone()
            };
            let transcript = self
                .transcribe_windows_after(&[window], &window_options, &all_tokens[prompt_from..])?
                .pop()
                .ok_or_else(|| anyhow::anyhow!("no transcript for window at frame {seek}"))?;
            language = language.or(transcript.language.clone());
            let offset = seek as f64 / FRAMES_PER_SECOND;
            let window_seconds = (end - seek) as f64 / FRAMES_PER_SECOND;
            if transcript.silent {
                seek = end;
                window_index += 1;
                continue;
            }
            let tokens = &transcript.tokens;
            let is_ts = |t: i64| t >= rules.timestamp_begin;
            let ends_single_timestamp = tokens.len() >= 2 && {
                let text_end = tokens.iter().rposition(|&t| t != rules.eot).unwrap_or(0);
                text_end >= 1 && is_ts(tokens[text_end]) && !is_ts(tokens[text_end - 1])
            };
            // Index of the second timestamp of the last consecutive pair (openai's last slice).
            let last_pair = (1..tokens.len())
                .rev()
                .find(|&k| is_ts(tokens[k]) && is_ts(tokens[k - 1]));
            for piece in segments_from_tokens(tokens, &rules, window_seconds) {
                let text = self.tokenizer.decode(&piece.tokens)?;
                if text.trim().is_empty() {
                    continue;
                }
                segments.push(Segment {
                    start: offset + piece.start,
                    end: offset + piece.end.min(window_seconds),
                    text: text.trim().to_string(),
                    tokens: piece.tokens.clone(),
                    window_index,
                    avg_logprob: transcript.avg_logprob,
                    no_speech_prob: transcript.no_speech_prob,
                    language: language.clone(),
                });
            }
            // Where the next window starts, and the tokens it consumed (context for the next).
            let (advance, consumed) = match last_pair {
                Some(k) if !ends_single_timestamp => {
                    let seconds =
                        (tokens[k - 1] - rules.timestamp_begin) as f64 * TIMESTAMP_STEP_SECONDS;
                    (
                        ((seconds * FRAMES_PER_SECOND).round() as usize).max(1),
                        &tokens[..k],
                    )
                }
                _ => (end - seek, &tokens[..]),
            };
            all_tokens.extend(consumed.iter().copied().filter(|&t| t != rules.eot));
            if !options.condition_on_previous_text || transcript.temperature > 0.5 {
                prompt_from = all_tokens.len();
            }
            seek += advance.min(end - seek).max(1);
            window_index += 1;
        }
        Ok(segments)
    }
}

impl From<&Segment> for TimedText {
    fn from(segment: &Segment) -> Self {
        TimedText {
            start: segment.start,
            end: segment.end,
            text: segment.text.clone(),
        }
    }
}
