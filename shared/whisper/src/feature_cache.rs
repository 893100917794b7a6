//! Training features computed once and kept on disk, content-addressed: the key is a SHA-256
//! of the audio file's bytes and the mel configuration, so a later run (or another manifest
//! naming the same clip) reuses them, and a changed file or setting never hits a stale entry.
//! Clips longer than one 30 s window are not training examples (the recipe's filter); that
//! verdict is cached too.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use asr_audio::pipeline::extract_all;
use asr_audio::{normalize_window, FeaturePipeline, InputFormat};
use sha2::{Digest, Sha256};

/// Longest clip that is one training example.
pub const MAX_SECONDS: f64 = 30.0;

/// What a clip gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    /// Its normalised window (`n_mels * 3000` values).
    Window(Vec<f32>),
    /// Longer than [`MAX_SECONDS`] (its duration): skipped.
    TooLong(f64),
}

pub struct FeatureCache {
    dir: PathBuf,
    pipeline: FeaturePipeline,
    n_mels: usize,
    /// Lookups answered from disk, for the log.
    pub hits: usize,
}

impl FeatureCache {
    pub fn new(dir: &Path, pipeline: FeaturePipeline, n_mels: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            pipeline,
            n_mels,
            hits: 0,
        }
    }

    fn key(&self, audio: &[u8]) -> String {
        let mut hash = Sha256::new();
        hash.update(b"asr-lora features v1\0");
        hash.update((self.n_mels as u64).to_le_bytes());
        hash.update(audio);
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn path(&self, key: &str, extension: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.{extension}"))
    }

    /// The clip at `audio`, from the cache or computed (and then stored).
    pub fn prepare(&mut self, audio: &Path) -> anyhow::Result<Prepared> {
        Ok(match self.locate(audio)? {
            Located::Window(path) => Prepared::Window(read_window(&path, self.n_mels)?),
            Located::TooLong(seconds) => Prepared::TooLong(seconds),
        })
    }

    /// Where the clip's window lies in the cache (computed and stored first when missing), so
    /// that a training set can hold paths and read each window when its batch comes.
    pub fn locate(&mut self, audio: &Path) -> anyhow::Result<Located> {
        let bytes = std::fs::read(audio).with_context(|| format!("reading {}", audio.display()))?;
        let key = self.key(&bytes);
        let (window_path, long_path) = (self.path(&key, "f32"), self.path(&key, "long"));
        let window_bytes = (self.n_mels * 3000 * 4) as u64;
        if std::fs::metadata(&window_path).is_ok_and(|m| m.len() == window_bytes) {
            self.hits += 1;
            return Ok(Located::Window(window_path));
        }
        if let Ok(seconds) = std::fs::read_to_string(&long_path) {
            if let Ok(seconds) = seconds.trim().parse::<f64>() {
                self.hits += 1;
                return Ok(Located::TooLong(seconds));
            }
        }
        let (_, frames, summary) = extract_all(
            &self.pipeline,
            std::io::Cursor::new(bytes),
            InputFormat::Encoded,
        )
        .with_context(|| format!("computing features of {}", audio.display()))?;
        if summary.duration_seconds > MAX_SECONDS {
            write_atomically(&long_path, summary.duration_seconds.to_string().as_bytes())?;
            return Ok(Located::TooLong(summary.duration_seconds));
        }
        let frames = &frames[..frames.len().min(3000 * self.n_mels)];
        let bytes: Vec<u8> = normalize_window(frames, self.n_mels)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write_atomically(&window_path, &bytes)?;
        Ok(Located::Window(window_path))
    }
}

/// Where [`FeatureCache::locate`] found a clip.
#[derive(Debug, Clone, PartialEq)]
pub enum Located {
    /// The file of its window (`n_mels * 3000` little-endian f32).
    Window(PathBuf),
    /// Longer than [`MAX_SECONDS`] (its duration): skipped.
    TooLong(f64),
}

/// Reads a cached window, checking its size.
pub fn read_window(path: &Path, n_mels: usize) -> anyhow::Result<Vec<f32>> {
    let stored = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        stored.len() == n_mels * 3000 * 4,
        "{} holds {} bytes, not one {n_mels}-mel window",
        path.display(),
        stored.len()
    );
    Ok(stored
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Writes through a temporary file and a rename, so that a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.persist(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use asr_audio::{MelConfig, PipelineConfig};

    fn wav(seconds: f64) -> Vec<u8> {
        let samples = (seconds * 16_000.0) as usize;
        let pcm: Vec<u8> = (0..samples)
            .flat_map(|i| {
                let v = (i as f64 * 440.0 * std::f64::consts::TAU / 16_000.0).sin() * 8000.0;
                (v as i16).to_le_bytes()
            })
            .collect();
        let mut out = Vec::new();
        out.extend(b"RIFF");
        out.extend((36 + pcm.len() as u32).to_le_bytes());
        out.extend(b"WAVEfmt ");
        out.extend(16u32.to_le_bytes());
        out.extend(1u16.to_le_bytes());
        out.extend(1u16.to_le_bytes());
        out.extend(16_000u32.to_le_bytes());
        out.extend(32_000u32.to_le_bytes());
        out.extend(2u16.to_le_bytes());
        out.extend(16u16.to_le_bytes());
        out.extend(b"data");
        out.extend((pcm.len() as u32).to_le_bytes());
        out.extend(pcm);
        out
    }

    #[test]
    fn windows_are_computed_once_and_long_clips_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (short, long) = (dir.path().join("short.wav"), dir.path().join("long.wav"));
        std::fs::write(&short, wav(1.5)).expect("write");
        std::fs::write(&long, wav(31.0)).expect("write");
        let pipeline = || {
            FeaturePipeline::new(PipelineConfig {
                mel: MelConfig::new(80).expect("mel"),
                ..Default::default()
            })
        };
        let cache_dir = dir.path().join("cache");
        let mut cache = FeatureCache::new(&cache_dir, pipeline(), 80);
        let first = cache.prepare(&short).expect("short");
        let Prepared::Window(values) = &first else {
            panic!("a 1.5 s clip is an example");
        };
        assert_eq!(values.len(), 80 * 3000);
        assert!(matches!(cache.prepare(&long).expect("long"), Prepared::TooLong(s) if s > 30.0));
        assert_eq!(cache.hits, 0);

        // A later run, and a copy of the clip under another name, hit the cache.
        let copy = dir.path().join("copy.wav");
        std::fs::copy(&short, &copy).expect("copy");
        let mut later = FeatureCache::new(&cache_dir, pipeline(), 80);
        assert_eq!(later.prepare(&copy).expect("copy"), first);
        assert!(matches!(
            later.prepare(&long).expect("long"),
            Prepared::TooLong(_)
        ));
        assert_eq!(later.hits, 2);
        // Another mel setting is another key.
        let mut other = FeatureCache::new(
            &cache_dir,
            FeaturePipeline::new(PipelineConfig {
                mel: MelConfig::new(128).expect("mel"),
                ..Default::default()
            }),
            128,
        );
        let Prepared::Window(values) = other.prepare(&short).expect("128") else {
            panic!("a window");
        };
        assert_eq!((values.len(), other.hits), (128 * 3000, 0));
    }
}
