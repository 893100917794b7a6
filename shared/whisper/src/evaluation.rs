//! Evaluation by generation, as Seq2SeqTrainer's `predict_with_generate`: greedy decoding of
//! each example with the forced prompt (language, task, no timestamps), capped at
//! `generation_max_length` tokens in all (the recipe's 96), then the character error rate
//! against the transcripts.

use tch::Tensor;

use crate::generation::{GenerationConfig, Task};
use crate::greedy::{decode_greedy, GreedyOptions};
use crate::metrics::cer;
use crate::model::Whisper;
use crate::tokenizer::WhisperTokenizer;
use crate::train_data::Example;

/// A named evaluation set: examples and their transcripts.
#[derive(Debug, Clone)]
pub struct EvalSet {
    pub name: String,
    /// A guard set: speech the model must keep reading (its CER is compared with the
    /// zero-shot pass), as opposed to the in-domain set the training aims at.
    pub guard: bool,
    pub examples: Vec<crate::train_data::Example>,
    pub texts: Vec<String>,
}

/// How to transcribe for CER.
#[derive(Clone)]
pub struct GenerationEval<'a> {
    pub generation: &'a GenerationConfig,
    pub tokenizer: &'a WhisperTokenizer,
    pub language: Option<String>,
    pub task: Task,
    /// Prompt plus generated tokens (HF's `generation_max_length`).
    pub max_length: usize,
    /// Windows decoded together.
    pub batch_size: usize,
}

impl GenerationEval<'_> {
    /// The text of each example, greedily decoded by `model` as it stands (the caller turns
    /// dropout off).
    pub fn transcribe(&self, model: &Whisper, examples: &[Example]) -> anyhow::Result<Vec<String>> {
        let prompt = self
            .generation
            .prompt(self.language.as_deref(), self.task, false)?;
        let options = GreedyOptions {
            max_new_tokens: self.max_length.saturating_sub(prompt.len()).max(1),
            temperature: 0.0,
            timestamps: None,
            row_seeds: &[],
        };
        let n_mels = model.config.num_mel_bins;
        let mut texts = Vec::with_capacity(examples.len());
        for batch in examples.chunks(self.batch_size.max(1)) {
            let mut flat = Vec::with_capacity(batch.len() * n_mels * 3000);
            for example in batch {
                flat.extend_from_slice(&example.read_window(n_mels)?);
            }
            let mel = Tensor::from_slice(&flat)
                .view([batch.len() as i64, n_mels as i64, 3000])
                .to_device(model.encoder.device())
                .to_kind(model.encoder.kind());
            let encoded = tch::no_grad(|| model.encoder.forward_windows(&mel));
            for output in decode_greedy(model, self.generation, &encoded, &prompt, &options) {
                texts.push(self.tokenizer.decode(&output.tokens)?);
            }
        }
        Ok(texts)
    }

    /// Corpus CER of `model` on `set` (0.05 = 5 %).
    pub fn cer(&self, model: &Whisper, set: &EvalSet) -> anyhow::Result<f64> {
        let hypotheses = self.transcribe(model, &set.examples)?;
        Ok(cer(hypotheses
            .iter()
            .map(String::as_str)
            .zip(set.texts.iter().map(String::as_str))))
    }
}
