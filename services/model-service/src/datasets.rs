//! The dataset store: `<data_root>/datasets/<name>/` holds `dataset.json` (language, n_mels,
//! description, times), `windows/<index>.f32` (each example's normalised 30 s window, the
//! feature cache's format, so the trainer reads them as they are) and `examples.jsonl`, an
//! append-only log of accepted examples. A window is written and synced before its log line,
//! and the line is synced before the example is acknowledged, so an acknowledged example
//! survives a crash; a torn last line (crash mid-append) is dropped when the store opens.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use asr_audio::{normalize_window, WINDOW_FRAMES};
use asr_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::registry::validate_name;
use crate::store::{entry_names, now, remove_aside, resolve_inside, timestamp, write_synced};

const META_FILE: &str = "dataset.json";
const LOG_FILE: &str = "examples.jsonl";
const MAX_ID_LEN: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub language: String,
    pub n_mels: usize,
    pub created_unix_seconds: i64,
    pub updated_unix_seconds: i64,
}

/// One stored example (a line of `examples.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredExample {
    pub index: u64,
    pub id: String,
    pub split: String,
    pub text: String,
    pub duration_seconds: f64,
}

/// An opened dataset: its metadata and examples.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub meta: DatasetMeta,
    pub examples: Vec<StoredExample>,
}

impl Dataset {
    pub fn window_path(&self, index: u64) -> PathBuf {
        window_path(&self.dir, index)
    }

    /// The examples of `split` (all when empty).
    pub fn split<'a>(&'a self, split: &'a str) -> impl Iterator<Item = &'a StoredExample> + 'a {
        self.examples
            .iter()
            .filter(move |e| split.is_empty() || e.split == split)
    }

    pub fn to_proto(&self) -> pb::Dataset {
        let mut splits: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
        for e in &self.examples {
            let entry = splits.entry(&e.split).or_default();
            entry.0 += 1;
            entry.1 += e.duration_seconds;
        }
        let seconds: f64 = self.examples.iter().map(|e| e.duration_seconds).sum();
        let window_bytes = (self.meta.n_mels * WINDOW_FRAMES * 4) as u64;
        pb::Dataset {
            name: self.meta.name.clone(),
            description: self.meta.description.clone(),
            language: self.meta.language.clone(),
            n_mels: self.meta.n_mels as u32,
            example_count: self.examples.len() as u64,
            audio_hours: seconds / 3600.0,
            splits: splits
                .into_iter()
                .map(|(name, (count, seconds))| pb::DatasetSplit {
                    name: name.to_string(),
                    example_count: count,
                    audio_hours: seconds / 3600.0,
                })
                .collect(),
            size_bytes: window_bytes * self.examples.len() as u64,
            created_time: Some(timestamp(self.meta.created_unix_seconds)),
            updated_time: Some(timestamp(self.meta.updated_unix_seconds)),
        }
    }
}

fn window_path(dir: &Path, index: u64) -> PathBuf {
    dir.join("windows").join(format!("{index}.f32"))
}

#[derive(Debug, Clone)]
pub struct DatasetStore {
    root: PathBuf,
}

impl DatasetStore {
    pub fn open(data_root: &Path) -> Result<Self, ModelError> {
        let root = data_root.join("datasets");
        std::fs::create_dir_all(&root)
            .map_err(|e| ModelError::Config(format!("cannot create {}: {e}", root.display())))?;
        Ok(Self { root })
    }

    fn dir_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.dir_of(name).join(META_FILE).is_file()
    }

    /// The datasets' names (a link leading out of the store is not one of them).
    pub fn names(&self) -> Result<Vec<String>, ModelError> {
        entry_names(&self.root, |n| {
            self.exists(n) && resolve_inside(&self.root, Path::new(n), "name").is_ok()
        })
    }

    /// Opens a dataset (dropping a torn last log line).
    pub fn get(&self, name: &str) -> Result<Dataset, ModelError> {
        validate_name(name, "name")?;
        if !self.exists(name) {
            return Err(ModelError::NotFound {
                what: "dataset",
                name: name.to_string(),
            });
        }
        // A link placed in the store must not lead a request outside it.
        let dir = resolve_inside(&self.root, Path::new(name), "name")?;
        let meta: DatasetMeta = serde_json::from_slice(
            &std::fs::read(dir.join(META_FILE)).map_err(ModelError::internal)?,
        )
        .map_err(ModelError::internal)?;
        let log = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default();
        let examples = log
            .lines()
            .filter_map(|line| serde_json::from_str::<StoredExample>(line).ok())
            .filter(|e| {
                std::fs::metadata(window_path(&dir, e.index))
                    .is_ok_and(|m| m.len() == (meta.n_mels * WINDOW_FRAMES * 4) as u64)
            })
            .collect();
        Ok(Dataset {
            dir,
            meta,
            examples,
        })
    }

    /// Creates an empty dataset.
    pub fn create(
        &self,
        name: &str,
        n_mels: usize,
        language: &str,
        description: &str,
    ) -> Result<Dataset, ModelError> {
        let dir = self.dir_of(name);
        if std::fs::symlink_metadata(&dir).is_ok() {
            resolve_inside(&self.root, Path::new(name), "name")?;
        }
        std::fs::create_dir_all(dir.join("windows")).map_err(ModelError::internal)?;
        let meta = DatasetMeta {
            name: name.to_string(),
            description: description.to_string(),
            language: language.to_string(),
            n_mels,
            created_unix_seconds: now(),
            updated_unix_seconds: now(),
        };
        write_meta(&dir, &meta)?;
        self.get(name)
    }

    pub fn update_meta(&self, dataset: &Dataset) -> Result<(), ModelError> {
        write_meta(&dataset.dir, &dataset.meta)
    }

    /// Removes a dataset (renamed aside first, so it disappears at once).
    pub fn delete(&self, name: &str) -> Result<(), ModelError> {
        self.get(name)?;
        remove_aside(&self.root, name)
    }
}

fn write_meta(dir: &Path, meta: &DatasetMeta) -> Result<(), ModelError> {
    let bytes = serde_json::to_vec_pretty(meta).map_err(ModelError::internal)?;
    write_synced(&dir.join(META_FILE), &bytes)
}

/// Why an example is not stored.
pub struct Rejection {
    pub reason: pb::RejectionReason,
    pub message: String,
}

fn reject(reason: pb::RejectionReason, message: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        message: message.into(),
    }
}

/// Appends examples to one dataset; one writer per dataset at a time.
pub struct Appender {
    pub dataset: Dataset,
    ids: HashSet<String>,
    next_index: u64,
    log: std::fs::File,
    max_examples: usize,
}

impl Appender {
    /// Appends to `dataset` until it holds `max_examples`.
    pub fn new(dataset: Dataset, max_examples: usize) -> Result<Self, ModelError> {
        let log_path = dataset.dir.join(LOG_FILE);
        // Rewrite the log without a torn tail before appending to it.
        let mut clean = String::new();
        for e in &dataset.examples {
            clean.push_str(&serde_json::to_string(e).map_err(ModelError::internal)?);
            clean.push('\n');
        }
        write_synced(&log_path, clean.as_bytes())?;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .map_err(ModelError::internal)?;
        Ok(Self {
            ids: dataset.examples.iter().map(|e| e.id.clone()).collect(),
            next_index: dataset
                .examples
                .iter()
                .map(|e| e.index + 1)
                .max()
                .unwrap_or(0),
            dataset,
            log,
            max_examples,
        })
    }

    /// Checks and stores one example; `label_check` rejects transcripts too long to train on.
    pub fn append(
        &mut self,
        example: pb::DatasetExample,
        split: &str,
        label_check: impl Fn(&str) -> Result<(), Rejection>,
    ) -> Result<Result<StoredExample, Rejection>, ModelError> {
        use pb::RejectionReason as R;
        let id = example.id;
        if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
            return Ok(Err(reject(
                R::InvalidId,
                format!("id must be 1..={MAX_ID_LEN} bytes without control characters"),
            )));
        }
        if self.ids.contains(&id) {
            return Ok(Err(reject(
                R::DuplicateId,
                format!("the dataset already holds {id:?}"),
            )));
        }
        // Full: the stream ends (RESOURCE_EXHAUSTED) with what was acknowledged kept.
        if self.dataset.examples.len() >= self.max_examples {
            return Err(ModelError::LimitReached {
                limit: "max_dataset_examples",
                value: self.max_examples.to_string(),
                hint: "the dataset is full; store further examples in another dataset",
            });
        }
        if example.text.trim().is_empty() {
            return Ok(Err(reject(R::EmptyText, "empty transcript")));
        }
        if let Err(rejection) = label_check(&example.text) {
            return Ok(Err(rejection));
        }
        let n_mels = self.dataset.meta.n_mels;
        let Some(features) = example.features else {
            return Ok(Err(reject(R::EmptyAudio, "no features")));
        };
        if features.frame_count == 0 || features.values.is_empty() {
            return Ok(Err(reject(R::EmptyAudio, "zero frames")));
        }
        if features.frame_count as usize > WINDOW_FRAMES {
            return Ok(Err(reject(
                R::AudioTooLong,
                format!(
                    "{} frames; at most {WINDOW_FRAMES} (30 s)",
                    features.frame_count
                ),
            )));
        }
        if features.n_mels as usize != n_mels
            || features.first_frame_index != 0
            || features.values.len() != features.frame_count as usize * n_mels
            || features.values.iter().any(|v| !v.is_finite())
        {
            return Ok(Err(reject(
                R::InvalidFeatures,
                format!(
                    "features must be frames 0.. of {n_mels} mels with frame_count * n_mels finite values"
                ),
            )));
        }
        let index = self.next_index;
        let window: Vec<u8> = normalize_window(&features.values, n_mels)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write_synced(&self.dataset.window_path(index), &window)?;
        let duration_seconds = if example.duration_seconds > 0.0 {
            example.duration_seconds
        } else {
            f64::from(features.frame_count) / 100.0
        };
        let stored = StoredExample {
            index,
            id: id.clone(),
            split: split.to_string(),
            text: example.text,
            duration_seconds,
        };
        let mut line = serde_json::to_string(&stored).map_err(ModelError::internal)?;
        line.push('\n');
        self.log
            .write_all(line.as_bytes())
            .and_then(|()| self.log.sync_data())
            .map_err(ModelError::internal)?;
        self.next_index += 1;
        self.ids.insert(id);
        self.dataset.examples.push(stored.clone());
        Ok(Ok(stored))
    }

    /// Records the time of the last addition.
    pub fn touch(&mut self) -> Result<(), ModelError> {
        self.dataset.meta.updated_unix_seconds = now();
        write_meta(&self.dataset.dir, &self.dataset.meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link planted in the store is neither listed, opened, deleted nor written through.
    #[test]
    fn links_out_of_the_store_are_refused() {
        use std::os::unix::fs::symlink;
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let store = DatasetStore::open(data.path()).unwrap();
        store.create("real", 80, "zh", "").unwrap();
        let victim = outside.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join(META_FILE), b"{}").unwrap();
        symlink(&victim, data.path().join("datasets/planted")).unwrap();
        symlink(outside.path(), data.path().join("datasets/fresh")).unwrap();
        assert_eq!(store.names().unwrap(), vec!["real".to_string()]);
        for result in [store.get("planted").map(|_| ()), store.delete("planted")] {
            assert!(
                matches!(result, Err(ModelError::InvalidField { ref field, .. }) if field == "name"),
                "{:?}",
                result.err()
            );
        }
        assert!(store.create("fresh", 80, "zh", "").is_err());
        assert!(
            !outside.path().join("windows").exists(),
            "nothing written outside"
        );
        assert!(victim.join(META_FILE).exists());
    }

    fn example(id: &str) -> pb::DatasetExample {
        pb::DatasetExample {
            id: id.into(),
            text: "你好".into(),
            features: Some(pb::MelFrames {
                n_mels: 80,
                first_frame_index: 0,
                frame_count: 10,
                values: vec![-1.0; 800],
            }),
            ..Default::default()
        }
    }

    /// A full dataset refuses the next example with RESOURCE_EXHAUSTED naming the limit;
    /// duplicates are still named as such, and what was stored stays.
    #[test]
    fn a_full_dataset_names_its_limit() {
        let data = tempfile::tempdir().unwrap();
        let store = DatasetStore::open(data.path()).unwrap();
        let dataset = store.create("small", 80, "zh", "").unwrap();
        let mut appender = Appender::new(dataset, 2).unwrap();
        for id in ["a", "b"] {
            assert!(appender
                .append(example(id), "train", |_| Ok(()))
                .unwrap()
                .is_ok());
        }
        let duplicate = appender.append(example("a"), "train", |_| Ok(())).unwrap();
        assert!(matches!(duplicate, Err(ref r) if r.reason == pb::RejectionReason::DuplicateId));
        let full = appender
            .append(example("c"), "train", |_| Ok(()))
            .err()
            .expect("full");
        let status = tonic::Status::from(full);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("max_dataset_examples"),
            "{}",
            status.message()
        );
        assert_eq!(store.get("small").unwrap().examples.len(), 2);
    }
}
