//! HF `generation_config.json` of a Whisper model: special tokens, languages, tasks and the
//! tokens suppressed while decoding.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct GenerationConfig {
    pub decoder_start_token_id: i64,
    pub eos_token_id: i64,
    pub no_timestamps_token_id: i64,
    #[serde(default)]
    pub suppress_tokens: Vec<i64>,
    #[serde(default)]
    pub begin_suppress_tokens: Vec<i64>,
    /// `"<|zh|>" -> 50260`.
    #[serde(default)]
    pub lang_to_id: BTreeMap<String, i64>,
    /// `"transcribe" -> 50359`.
    #[serde(default)]
    pub task_to_id: BTreeMap<String, i64>,
    #[serde(default)]
    pub is_multilingual: bool,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default = "default_max_initial_timestamp_index")]
    pub max_initial_timestamp_index: i64,
    /// `<|startofprev|>`, which introduces previous text before the prompt.
    #[serde(default)]
    pub prev_sot_token_id: Option<i64>,
}

fn default_max_length() -> usize {
    448
}

fn default_max_initial_timestamp_index() -> i64 {
    50
}

/// What the decoder is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    #[default]
    Transcribe,
    Translate,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Transcribe => "transcribe",
            Task::Translate => "translate",
        }
    }
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The token of language `code` ("zh", "en", ...).
    pub fn language_token(&self, code: &str) -> anyhow::Result<i64> {
        self.lang_to_id
            .get(&format!("<|{code}|>"))
            .copied()
            .with_context(|| {
                format!(
                    "unknown language {code:?}; this model knows {}",
                    self.lang_to_id.len()
                )
            })
    }

    pub fn task_token(&self, task: Task) -> anyhow::Result<i64> {
        self.task_to_id
            .get(task.name())
            .copied()
            .with_context(|| format!("this model has no {} task token", task.name()))
    }

    /// The first timestamp token `<|0.00|>` (the one after `<|notimestamps|>`).
    pub fn timestamp_begin(&self) -> i64 {
        self.no_timestamps_token_id + 1
    }

    /// `<|startoftranscript|> [<|lang|> <|task|>] [<|notimestamps|>]`.
    pub fn prompt(
        &self,
        language: Option<&str>,
        task: Task,
        timestamps: bool,
    ) -> anyhow::Result<Vec<i64>> {
        let mut tokens = vec![self.decoder_start_token_id];
        if self.is_multilingual {
            if let Some(code) = language {
                tokens.push(self.language_token(code)?);
            }
            tokens.push(self.task_token(task)?);
        }
        if !timestamps {
            tokens.push(self.no_timestamps_token_id);
        }
        Ok(tokens)
    }

    /// [`Self::prompt`] after previous text (an initial prompt, or the text of earlier
    /// windows): `<|startofprev|>` and its last `max_length / 2 - 1` tokens, as openai does.
    pub fn prompt_after(
        &self,
        previous: &[i64],
        language: Option<&str>,
        task: Task,
        timestamps: bool,
    ) -> anyhow::Result<Vec<i64>> {
        let sot_sequence = self.prompt(language, task, timestamps)?;
        if previous.is_empty() {
            return Ok(sot_sequence);
        }
        let prev_sot = self
            .prev_sot_token_id
            .context("this model's generation_config.json has no prev_sot_token_id")?;
        let keep = (self.max_length / 2).saturating_sub(1).min(previous.len());
        let mut tokens = Vec::with_capacity(1 + keep + sot_sequence.len());
        tokens.push(prev_sot);
        tokens.extend_from_slice(&previous[previous.len() - keep..]);
        tokens.extend(sot_sequence);
        Ok(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GenerationConfig {
        serde_json::from_value(serde_json::json!({
            "decoder_start_token_id": 50258, "eos_token_id": 50257,
            "no_timestamps_token_id": 50363, "prev_sot_token_id": 50361,
            "is_multilingual": true, "lang_to_id": {"<|zh|>": 50260},
            "task_to_id": {"transcribe": 50359, "translate": 50358}, "max_length": 448
        }))
        .expect("config")
    }

    #[test]
    fn previous_text_precedes_the_prompt_and_is_cut_to_half_the_context() {
        let g = config();
        assert_eq!(
            g.prompt_after(&[], Some("zh"), Task::Transcribe, false)
                .expect("prompt"),
            vec![50258, 50260, 50359, 50363]
        );
        assert_eq!(
            g.prompt_after(&[10, 11], Some("zh"), Task::Transcribe, true)
                .expect("prompt"),
            vec![50361, 10, 11, 50258, 50260, 50359]
        );
        let long: Vec<i64> = (0..500).collect();
        let prompt = g
            .prompt_after(&long, Some("zh"), Task::Transcribe, false)
            .expect("prompt");
        assert_eq!(prompt.len(), 1 + 223 + 4);
        assert_eq!(prompt[1], 500 - 223);
    }
}
