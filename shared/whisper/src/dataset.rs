//! Training and evaluation sets: a JSONL manifest (`{"audio": path, "text": ...}` per line,
//! paths relative to the manifest) or a Common Voice release (`clips/*.mp3` with
//! `train.tsv` / `dev.tsv` / `test.tsv`, whose `path` and `sentence` columns name the clip and
//! its text). Errors name the file and line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// One clip and its transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub audio: PathBuf,
    pub text: String,
}

/// Reads a JSONL manifest.
pub fn read_manifest(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let base = path.parent().unwrap_or(Path::new("."));
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), number + 1);
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let audio = value["audio"]
            .as_str()
            .with_context(|| format!("{}: no \"audio\" string", at()))?;
        let transcript = value["text"]
            .as_str()
            .with_context(|| format!("{}: no \"text\" string", at()))?;
        entries.push(Entry {
            audio: base.join(audio),
            text: transcript.to_string(),
        });
    }
    Ok(entries)
}

/// Reads split `split` ("train", "dev", "test", ...) of a Common Voice release directory.
pub fn read_common_voice(dir: &Path, split: &str) -> anyhow::Result<Vec<Entry>> {
    let path = dir.join(format!("{split}.tsv"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .with_context(|| format!("{} is empty", path.display()))?
        .split('\t')
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("{} has no {name} column", path.display()))
    };
    let (path_column, sentence_column) = (column("path")?, column("sentence")?);
    let mut entries = Vec::new();
    for (number, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let (Some(clip), Some(sentence)) = (fields.get(path_column), fields.get(sentence_column))
        else {
            bail!(
                "{}:{}: {} fields, the header has {}",
                path.display(),
                number + 2,
                fields.len(),
                header.len()
            );
        };
        entries.push(Entry {
            audio: dir.join("clips").join(clip),
            text: sentence.to_string(),
        });
    }
    Ok(entries)
}

/// A manifest file, or a Common Voice directory read at `split`.
pub fn read_dataset(path: &Path, split: &str) -> anyhow::Result<Vec<Entry>> {
    if path.is_dir() {
        read_common_voice(path, split)
    } else {
        read_manifest(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_resolve_paths_and_name_bad_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = dir.path().join("train.jsonl");
        std::fs::write(
            &manifest,
            "{\"audio\": \"a/1.wav\", \"text\": \"你好\"}\n\n{\"audio\": \"/abs/2.wav\", \"text\": \"再见\"}\n",
        )
        .expect("write");
        let entries = read_manifest(&manifest).expect("manifest");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].audio, dir.path().join("a/1.wav"));
        assert_eq!(entries[1].audio, PathBuf::from("/abs/2.wav"));
        assert_eq!(entries[1].text, "再见");
        std::fs::write(&manifest, "{\"audio\": \"x.wav\"}\n").expect("write");
        let error = format!("{:#}", read_manifest(&manifest).expect_err("no text"));
        assert!(
            error.contains("train.jsonl:1") && error.contains("text"),
            "{error}"
        );
    }

    #[test]
    fn common_voice_tsv_columns_are_found_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("train.tsv"),
            "client_id\tpath\tsentence\tup_votes\nc1\tcommon_voice_zh-CN_1.mp3\t你好世界\t2\n",
        )
        .expect("write");
        let entries = read_dataset(dir.path(), "train").expect("cv");
        assert_eq!(
            entries,
            vec![Entry {
                audio: dir.path().join("clips/common_voice_zh-CN_1.mp3"),
                text: "你好世界".into()
            }]
        );
        std::fs::write(dir.path().join("dev.tsv"), "client_id\tsentence\n").expect("write");
        let error = format!(
            "{:#}",
            read_common_voice(dir.path(), "dev").expect_err("no path")
        );
        assert!(error.contains("no path column"), "{error}");
    }
}
