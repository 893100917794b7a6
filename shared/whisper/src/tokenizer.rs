//! Text <-> tokens with the model's `tokenizer.json` (byte-level BPE).

use std::path::Path;

use anyhow::Context;

pub struct WhisperTokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids from here up are special (end-of-text, languages, tasks, timestamps).
    first_special: i64,
}

impl WhisperTokenizer {
    /// `eos_token_id` marks where the special tokens start (50257 in multilingual models,
    /// 50256 in English-only ones).
    pub fn from_file(path: &Path, eos_token_id: i64) -> anyhow::Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
        Ok(Self {
            inner,
            first_special: eos_token_id,
        })
    }

    /// Text of `tokens`, special tokens (end-of-text, timestamps, ...) left out.
    pub fn decode(&self, tokens: &[i64]) -> anyhow::Result<String> {
        let ids: Vec<u32> = tokens
            .iter()
            .filter(|&&t| (0..self.first_special).contains(&t))
            .map(|&t| t as u32)
            .collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("decoding tokens: {e}"))
    }

    /// Tokens of `text` without special tokens (for prompts and training labels).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("encoding text: {e}"))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    pub fn token_id(&self, token: &str) -> anyhow::Result<i64> {
        self.inner
            .token_to_id(token)
            .map(i64::from)
            .with_context(|| format!("tokenizer has no token {token}"))
    }
}
