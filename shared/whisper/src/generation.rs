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
}
