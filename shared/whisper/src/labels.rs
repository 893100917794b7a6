//! Training labels as the recipe's collator (`DataCollatorSpeechSeq2SeqWithPadding`) makes
//! them: `<|startoftranscript|><|zh|><|transcribe|><|notimestamps|> text <|endoftext|>`,
//! capped at the decoder's 448 positions, padded with -100, the leading start token stripped
//! when every row has it; the decoder inputs are the labels shifted right behind the start
//! token (HF's `shift_tokens_right`, -100 read as padding).

use tch::Tensor;

use crate::generation::{GenerationConfig, Task};
use crate::tokenizer::WhisperTokenizer;

/// The value the loss ignores.
pub const IGNORE_INDEX: i64 = -100;

/// One row's label tokens for `text`.
pub fn label_tokens(
    tokenizer: &WhisperTokenizer,
    generation: &GenerationConfig,
    text: &str,
    language: Option<&str>,
    task: Task,
) -> anyhow::Result<Vec<i64>> {
    let mut tokens = generation.prompt(language, task, false)?;
    tokens.extend(tokenizer.encode(text)?);
    tokens.push(generation.eos_token_id);
    tokens.truncate(generation.max_length);
    Ok(tokens)
}

/// A padded batch of labels and the decoder inputs that predict them.
#[derive(Debug)]
pub struct LabelBatch {
    /// `[B, L]`, padding = -100.
    pub labels: Tensor,
    /// `[B, L]`: the start token, then the labels shifted right, padding = `pad_token_id`.
    pub decoder_input_ids: Tensor,
}

/// Pads `rows`, strips the shared leading start token and builds the decoder inputs.
pub fn collate_labels(rows: &[Vec<i64>], decoder_start: i64, pad_token_id: i64) -> LabelBatch {
    let strip = !rows.is_empty() && rows.iter().all(|r| r.first() == Some(&decoder_start));
    let rows: Vec<&[i64]> = rows
        .iter()
        .map(|r| if strip { &r[1..] } else { &r[..] })
        .collect();
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut labels = Vec::with_capacity(rows.len() * width);
    let mut inputs = Vec::with_capacity(rows.len() * width);
    for row in &rows {
        let padded: Vec<i64> = row
            .iter()
            .copied()
            .chain(std::iter::repeat(IGNORE_INDEX))
            .take(width)
            .collect();
        inputs.push(decoder_start);
        inputs.extend(padded[..width - 1].iter().map(|&t| {
            if t == IGNORE_INDEX {
                pad_token_id
            } else {
                t
            }
        }));
        labels.extend(padded);
    }
    let shape = [rows.len() as i64, width as i64];
    LabelBatch {
        labels: Tensor::from_slice(&labels).view(shape),
        decoder_input_ids: Tensor::from_slice(&inputs).view(shape),
    }
}

/// Mean token cross-entropy of `logits` `[B, L, V]` against `labels` `[B, L]`, -100 ignored
/// (HF's loss for `WhisperForConditionalGeneration`).
pub fn label_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    logits
        .view([-1, vocab])
        .to_kind(tch::Kind::Float)
        .cross_entropy_loss::<Tensor>(
            &labels.reshape([-1]),
            None,
            tch::Reduction::Mean,
            IGNORE_INDEX,
            0.0,
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collation_strips_the_shared_start_and_shifts_right() {
        let rows = vec![vec![9, 1, 2, 3, 5], vec![9, 4, 5]];
        let batch = collate_labels(&rows, 9, 7);
        assert_eq!(
            Vec::<Vec<i64>>::try_from(&batch.labels).expect("labels"),
            vec![vec![1, 2, 3, 5], vec![4, 5, -100, -100]]
        );
        assert_eq!(
            Vec::<Vec<i64>>::try_from(&batch.decoder_input_ids).expect("inputs"),
            vec![vec![9, 1, 2, 3], vec![9, 4, 5, 7]]
        );
        // A row without the start token keeps every row's first column.
        let mixed = collate_labels(&[vec![9, 1], vec![2, 3]], 9, 7);
        assert_eq!(mixed.labels.size(), [2, 2]);
    }
}
