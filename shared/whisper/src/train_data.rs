//! Training and evaluation examples from a dataset: each clip's window located in the feature
//! cache (and read from it when its batch comes, so a large set does not sit in memory), its
//! labels as the recipe's collator makes them; clips over 30 s are skipped and counted.

use std::borrow::Cow;
use std::path::PathBuf;

use anyhow::Context;

use crate::dataset::Entry;
use crate::feature_cache::{read_window, FeatureCache, Located};
use crate::generation::{GenerationConfig, Task};
use crate::labels::label_tokens;
use crate::tokenizer::WhisperTokenizer;

/// A normalised window (`n_mels * 3000` values, mel-major).
#[derive(Debug, Clone)]
pub enum Window {
    Memory(Vec<f32>),
    /// A file of the feature cache.
    Cached(PathBuf),
}

/// One example: a window and its label tokens (see [`crate::labels`]).
#[derive(Debug, Clone)]
pub struct Example {
    pub window: Window,
    pub labels: Vec<i64>,
}

impl Example {
    pub fn in_memory(window: Vec<f32>, labels: Vec<i64>) -> Self {
        Self {
            window: Window::Memory(window),
            labels,
        }
    }

    /// The window's values, checked to be one `n_mels` window.
    pub fn read_window(&self, n_mels: usize) -> anyhow::Result<Cow<'_, [f32]>> {
        match &self.window {
            Window::Memory(values) => {
                anyhow::ensure!(
                    values.len() == n_mels * 3000,
                    "an example holds {} values, not one {n_mels}-mel window",
                    values.len()
                );
                Ok(Cow::Borrowed(values))
            }
            Window::Cached(path) => Ok(Cow::Owned(read_window(path, n_mels)?)),
        }
    }
}

/// How labels are made: the prompt's language and task.
#[derive(Clone, Copy)]
pub struct LabelSpec<'a> {
    pub tokenizer: &'a WhisperTokenizer,
    pub generation: &'a GenerationConfig,
    pub language: Option<&'a str>,
    pub task: Task,
}

/// A dataset turned into examples.
#[derive(Debug, Default)]
pub struct PreparedSet {
    pub examples: Vec<Example>,
    /// The transcript of each example (the reference for CER).
    pub texts: Vec<String>,
    /// Clips over 30 s, left out as the recipe's filter does.
    pub skipped_too_long: usize,
    /// Clips whose features came from the cache.
    pub cache_hits: usize,
}

/// Locates (computing where needed) every clip's window and makes its labels; `on_clip` is
/// called after each clip (for a progress bar).
pub fn prepare_set(
    entries: &[Entry],
    cache: &mut FeatureCache,
    spec: LabelSpec,
    mut on_clip: impl FnMut(),
) -> anyhow::Result<PreparedSet> {
    let hits_before = cache.hits;
    let mut set = PreparedSet::default();
    for entry in entries {
        match cache.locate(&entry.audio)? {
            Located::Window(path) => {
                let labels = label_tokens(
                    spec.tokenizer,
                    spec.generation,
                    &entry.text,
                    spec.language,
                    spec.task,
                )
                .with_context(|| format!("labels of {}", entry.audio.display()))?;
                set.examples.push(Example {
                    window: Window::Cached(path),
                    labels,
                });
                set.texts.push(entry.text.clone());
            }
            Located::TooLong(_) => set.skipped_too_long += 1,
        }
        on_clip();
    }
    set.cache_hits = cache.hits - hits_before;
    Ok(set)
}
