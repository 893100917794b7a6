//! The HF `config.json` of a Whisper model (tiny ... large-v3, and tiny random test models).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Architecture hyperparameters, as HF's `WhisperConfig` names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhisperConfig {
    /// 51864 (English-only), 51865 (multilingual), 51866 (large-v3).
    pub vocab_size: usize,
    /// 80, or 128 for large-v3.
    pub num_mel_bins: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_layers: usize,
    pub decoder_attention_heads: usize,
    pub decoder_ffn_dim: usize,
    /// Encoder positions after the stride-2 convolution: 1500 for 30 s windows.
    pub max_source_positions: usize,
    /// Decoder positions: 448.
    pub max_target_positions: usize,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    #[serde(default = "default_eos")]
    pub pad_token_id: i64,
    #[serde(default = "default_eos")]
    pub bos_token_id: i64,
    #[serde(default = "default_decoder_start")]
    pub decoder_start_token_id: i64,
    /// Tokens suppressed at every step (older configs carry them here rather than in
    /// generation_config.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress_tokens: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_suppress_tokens: Option<Vec<i64>>,
}

fn default_activation() -> String {
    "gelu".into()
}

fn default_eos() -> i64 {
    50257
}

fn default_decoder_start() -> i64 {
    50258
}

impl WhisperConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.d_model.is_multiple_of(self.encoder_attention_heads),
            "d_model must divide by encoder_attention_heads"
        );
        anyhow::ensure!(
            self.d_model.is_multiple_of(self.decoder_attention_heads),
            "d_model must divide by decoder_attention_heads"
        );
        anyhow::ensure!(
            self.num_mel_bins == 80 || self.num_mel_bins == 128,
            "num_mel_bins must be 80 or 128, got {}",
            self.num_mel_bins
        );
        anyhow::ensure!(
            self.activation_function == "gelu",
            "only gelu activations are supported, got {}",
            self.activation_function
        );
        Ok(())
    }

    /// Multilingual models have language tokens; English-only ones (vocab 51864) do not.
    pub fn is_multilingual(&self) -> bool {
        self.vocab_size >= 51865
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_large_v2() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/configs/whisper-large-v2.json");
        let config = WhisperConfig::from_file(&path).expect("large-v2 config");
        assert_eq!(
            (config.d_model, config.encoder_layers, config.vocab_size),
            (1280, 32, 51865)
        );
        assert!(config.is_multilingual());
    }
}
