//! The adapter registry on disk: `<data_root>/adapters/<name>/` holds a PEFT adapter
//! (`adapter_config.json`, `adapter_model.safetensors`) and our `registry.json` (origin,
//! creation time). Names are validated before they reach the file system, and imports land
//! with a rename, so a reader never sees half an adapter.

use std::path::{Path, PathBuf};

use asr_proto::v1 as pb;
use asr_whisper::adapter_io::{read_peft_config, CONFIG_FILE, WEIGHTS_FILE};
use asr_whisper::{LoraBias, TargetModules};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::store::{entry_names, now, remove_aside, resolve_inside, timestamp};

const META_FILE: &str = "registry.json";
const MAX_NAME_LEN: usize = 64;

/// A registry name: 1..=64 of `[A-Za-z0-9._-]`, not starting with `.` (so no `..`, no
/// hidden files, no path separators).
pub fn validate_name(name: &str, field: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ModelError::invalid(
            field,
            format!(
                "{name:?} is not a valid name (1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ -, not starting with '.')"
            ),
        ))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    created_unix_seconds: i64,
    origin: String,
    #[serde(default)]
    source_job_id: String,
    #[serde(default)]
    source_dir: String,
}

/// An adapter as stored (not necessarily loaded).
#[derive(Debug, Clone)]
pub struct StoredAdapter {
    pub name: String,
    pub dir: PathBuf,
    pub info: pb::AdapterInfo,
}

#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
    /// LoadAdapter.source_dir is resolved inside this directory, never outside it.
    import_root: PathBuf,
}

impl Registry {
    /// The registry under `data_root/adapters`, importing from `import_root`.
    pub fn open(data_root: &Path, import_root: &Path) -> Result<Self, ModelError> {
        let root = data_root.join("adapters");
        for dir in [&root, import_root] {
            std::fs::create_dir_all(dir)
                .map_err(|e| ModelError::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        Ok(Self {
            root,
            import_root: import_root.to_path_buf(),
        })
    }

    pub fn dir_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.dir_of(name).join(CONFIG_FILE).is_file()
    }

    /// Every stored adapter, sorted by name (directories that are not adapters are skipped).
    pub fn list(&self) -> Result<Vec<StoredAdapter>, ModelError> {
        let mut adapters = Vec::new();
        for name in entry_names(&self.root, |n| self.exists(n))? {
            match self.get(&name) {
                Ok(adapter) => adapters.push(adapter),
                // A link leading out of the registry is not one of its adapters.
                Err(ModelError::InvalidField { description, .. }) => {
                    tracing::warn!(%name, %description, "registry entry skipped");
                }
                Err(other) => return Err(other),
            }
        }
        Ok(adapters)
    }

    pub fn get(&self, name: &str) -> Result<StoredAdapter, ModelError> {
        validate_name(name, "name")?;
        if !self.exists(name) {
            return Err(ModelError::NotFound {
                what: "adapter",
                name: name.to_string(),
            });
        }
        // A link placed in the registry must not lead a request outside it.
        let dir = resolve_inside(&self.root, Path::new(name), "name")?;
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            resolve_inside(&dir, Path::new(file), "name")?;
        }
        let info = describe(name, &dir).map_err(ModelError::internal)?;
        Ok(StoredAdapter {
            name: name.to_string(),
            dir,
            info,
        })
    }

    /// Copies the PEFT adapter directory `source_dir` (relative to the import root, or an
    /// absolute path inside it) into the registry as `name` (origin IMPORTED). Nothing
    /// outside the import root is read: `..` is refused and links are resolved first.
    pub fn import(&self, name: &str, source_dir: &str) -> Result<StoredAdapter, ModelError> {
        validate_name(name, "name")?;
        if self.exists(name) {
            return Err(ModelError::AlreadyExists {
                what: "adapter",
                name: name.to_string(),
            });
        }
        let source = resolve_inside(&self.import_root, Path::new(source_dir), "source_dir")?;
        if !source.is_dir() {
            return Err(ModelError::invalid(
                "source_dir",
                format!("{source_dir} is not a directory"),
            ));
        }
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            match resolve_inside(&source, Path::new(file), "source_dir") {
                Err(ModelError::NotFound { .. }) => {
                    return Err(ModelError::invalid(
                        "source_dir",
                        format!("{source_dir} has no {file}"),
                    ))
                }
                other => other?,
            };
        }
        read_peft_config(&source)
            .map_err(|e| ModelError::invalid("source_dir", format!("not a LoRA adapter: {e:#}")))?;
        self.install(name, &source, "imported", "", source_dir)
    }

    /// Copies `source` into the registry under `name` with its origin recorded.
    pub fn install(
        &self,
        name: &str,
        source: &Path,
        origin: &str,
        source_job_id: &str,
        source_dir: &str,
    ) -> Result<StoredAdapter, ModelError> {
        let staging = self
            .root
            .join(format!(".staging-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let result = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&staging)?;
            for file in [CONFIG_FILE, WEIGHTS_FILE] {
                std::fs::copy(source.join(file), staging.join(file))?;
            }
            let meta = Meta {
                created_unix_seconds: now(),
                origin: origin.to_string(),
                source_job_id: source_job_id.to_string(),
                source_dir: source_dir.to_string(),
            };
            std::fs::write(
                staging.join(META_FILE),
                serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?,
            )?;
            for file in [CONFIG_FILE, WEIGHTS_FILE, META_FILE] {
                std::fs::File::open(staging.join(file))?.sync_all()?;
            }
            std::fs::rename(&staging, self.dir_of(name))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(ModelError::internal(format!(
                "storing adapter {name:?}: {e}"
            )));
        }
        self.get(name)
    }

    /// Removes an adapter's files (moved aside first, so it disappears at once).
    pub fn delete(&self, name: &str) -> Result<(), ModelError> {
        self.get(name)?;
        remove_aside(&self.root, name)
    }
}

/// The registry's view of a stored adapter (`loaded` is filled in by the caller).
fn describe(name: &str, dir: &Path) -> anyhow::Result<pb::AdapterInfo> {
    let peft = read_peft_config(dir)?;
    let meta: Meta = std::fs::read(dir.join(META_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let weights = dir.join(WEIGHTS_FILE);
    let size_bytes = [CONFIG_FILE, WEIGHTS_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let target_modules = match &peft.config.target_modules {
        TargetModules::Names(names) => names.clone(),
        TargetModules::Regex(pattern) => vec![pattern.clone()],
    };
    Ok(pb::AdapterInfo {
        name: name.to_string(),
        r: peft.config.r as u32,
        alpha: peft.config.alpha as f32,
        target_modules,
        bias: match peft.config.bias {
            LoraBias::None => pb::LoraBias::None,
            LoraBias::All => pb::LoraBias::All,
            LoraBias::LoraOnly => pb::LoraBias::LoraOnly,
        } as i32,
        base_model: peft.base_model.unwrap_or_default(),
        trainable_parameters: safetensors_elements(&weights)?,
        loaded: false,
        size_bytes,
        created_time: Some(timestamp(meta.created_unix_seconds)),
        origin: match meta.origin.as_str() {
            "trained" => pb::AdapterOrigin::Trained,
            "imported" => pb::AdapterOrigin::Imported,
            "merged" => pb::AdapterOrigin::Merged,
            _ => pb::AdapterOrigin::Unspecified,
        } as i32,
        source_job_id: meta.source_job_id,
        source_dir: meta.source_dir,
    })
}

/// Elements of every tensor in a safetensors file, from its header alone.
fn safetensors_elements(path: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    anyhow::ensure!(len < 100 << 20, "{}: header too large", path.display());
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)?;
    Ok(header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("shape")?.as_array().cloned())
        .map(|shape| shape.iter().filter_map(|d| d.as_u64()).product::<u64>())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_registry() {
        for bad in ["", "..", "../x", "a/b", "/abs", ".hidden", "a b", "x\0"] {
            assert!(validate_name(bad, "name").is_err(), "{bad:?} accepted");
        }
        for good in ["zh-espeak", "run_1.best", "A9"] {
            validate_name(good, "name").expect(good);
        }
    }

    fn field_of(error: ModelError) -> String {
        match error {
            ModelError::InvalidField { field, .. } => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    /// ../, absolute paths and links out of the import root or the registry are refused
    /// before anything is read.
    #[test]
    fn imports_and_entries_stay_inside_their_roots() {
        use std::os::unix::fs::symlink;
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join(CONFIG_FILE), "{}").unwrap();
        std::fs::write(outside.path().join(WEIGHTS_FILE), "secret").unwrap();
        let imports = data.path().join("imports");
        let registry = Registry::open(data.path(), &imports).unwrap();

        let outside_dir = outside.path().display().to_string();
        assert_eq!(
            field_of(registry.import("a", "../adapters").unwrap_err()),
            "source_dir"
        );
        assert_eq!(
            field_of(
                registry
                    .import("a", &format!("{outside_dir}/../x"))
                    .unwrap_err()
            ),
            "source_dir"
        );
        // An absolute path outside: joined onto the root it replaces it, and is refused.
        assert_eq!(
            field_of(registry.import("a", &outside_dir).unwrap_err()),
            "source_dir"
        );
        assert!(matches!(
            registry.import("a", "missing").unwrap_err(),
            ModelError::NotFound { .. }
        ));
        // A link in the import root leading out.
        symlink(outside.path(), imports.join("link")).unwrap();
        assert_eq!(
            field_of(registry.import("a", "link").unwrap_err()),
            "source_dir"
        );
        // A real directory whose weights are a link leading out.
        let sneaky = imports.join("sneaky");
        std::fs::create_dir(&sneaky).unwrap();
        std::fs::write(sneaky.join(CONFIG_FILE), "{}").unwrap();
        symlink(outside.path().join(WEIGHTS_FILE), sneaky.join(WEIGHTS_FILE)).unwrap();
        assert_eq!(
            field_of(registry.import("a", "sneaky").unwrap_err()),
            "source_dir"
        );
        assert_eq!(
            field_of(
                registry
                    .import("a", &sneaky.display().to_string())
                    .unwrap_err()
            ),
            "source_dir"
        );
        // A link placed in the registry itself.
        symlink(outside.path(), data.path().join("adapters/planted")).unwrap();
        assert_eq!(field_of(registry.get("planted").unwrap_err()), "name");
        assert_eq!(field_of(registry.delete("planted").unwrap_err()), "name");
        assert!(
            outside.path().join(WEIGHTS_FILE).exists(),
            "nothing outside was touched"
        );
        assert!(
            registry.list().unwrap().is_empty(),
            "the planted link is not listed"
        );
    }
}
