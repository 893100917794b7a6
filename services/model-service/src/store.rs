//! What the on-disk stores (adapters, datasets, jobs) share: atomic writes, listing the
//! entries of a store directory, removing one at once, and timestamps.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::ModelError;
use crate::registry::validate_name;

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

/// Writes through a temporary file, fsync and rename.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let result = (|| -> std::io::Result<()> {
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        file.write_all(bytes)?;
        file.as_file().sync_all()?;
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    })();
    result.map_err(|e| ModelError::internal(format!("writing {}: {e}", path.display())))
}

/// `requested` (relative to `root`, or absolute) when it exists and resolves, links followed,
/// to a path inside `root`: requests name paths, and neither `..` nor a symbolic link placed
/// in a store may lead them elsewhere. `field` names the request field in errors.
pub fn resolve_inside(root: &Path, requested: &Path, field: &str) -> Result<PathBuf, ModelError> {
    if requested
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(ModelError::invalid(field, "must not contain '..'"));
    }
    let root = root
        .canonicalize()
        .map_err(|e| ModelError::internal(format!("{}: {e}", root.display())))?;
    let joined = root.join(requested);
    let resolved = match joined.canonicalize() {
        Ok(resolved) => resolved,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelError::NotFound {
                what: "path",
                name: requested.display().to_string(),
            })
        }
        Err(e) => return Err(ModelError::internal(format!("{}: {e}", joined.display()))),
    };
    if resolved.starts_with(&root) {
        Ok(resolved)
    } else {
        Err(ModelError::invalid(
            field,
            format!(
                "{} resolves outside {} (through a symbolic link?)",
                requested.display(),
                root.display()
            ),
        ))
    }
}

/// The valid names under `root` for which `is_entry` holds, sorted (staging and trash
/// directories start with '.', so they never are).
pub fn entry_names(
    root: &Path,
    is_entry: impl Fn(&str) -> bool,
) -> Result<Vec<String>, ModelError> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(ModelError::internal)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_name(n, "name").is_ok() && is_entry(n))
        .collect();
    names.sort();
    Ok(names)
}

/// Removes `root/name`: renamed aside first, so it disappears at once.
pub fn remove_aside(root: &Path, name: &str) -> Result<(), ModelError> {
    let trash = root.join(format!(".deleting-{name}-{}", std::process::id()));
    std::fs::rename(root.join(name), &trash).map_err(ModelError::internal)?;
    std::fs::remove_dir_all(&trash).map_err(ModelError::internal)
}
