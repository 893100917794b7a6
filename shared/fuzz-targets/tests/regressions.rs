//! The regression suite of the fuzz targets: every input under `fuzz/regressions/TARGET/`
//! (crashes, hangs and OOMs that the fuzzer found, kept after their fix) and under
//! `fuzz/seeds/TARGET/` (the committed seeds) goes through its target again. A panic names
//! the file; `scripts/fuzz.sh` adds new crash inputs here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every kept input of `target` and fails listing each one that panicked.
fn replay(target: &str) {
    let function = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let root = fuzz_dir();
    let mut failed = Vec::new();
    let mut count = 0;
    for kind in ["regressions", "seeds"] {
        for file in files(&root.join(kind).join(target)) {
            let data = std::fs::read(&file).unwrap();
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| function(&data))).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    eprintln!("{target}: {count} inputs replayed");
    assert!(
        failed.is_empty(),
        "{target} panics on:\n{}",
        failed.join("\n")
    );
}

#[test]
fn regressions_folder_exists() {
    // Without it the suite would pass while testing nothing.
    let dir = fuzz_dir().join("regressions");
    assert!(
        dir.is_dir(),
        "{} is missing: the fuzz regression suite has nothing to replay",
        dir.display()
    );
}

#[test]
fn every_fuzz_target_is_replayed() {
    let targets: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(targets, REPLAYED, "list each target in replays! below");
}

#[test]
fn every_fuzz_target_has_a_harness() {
    for (name, _) in TARGETS {
        let harness = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(harness.is_file(), "{} is missing", harness.display());
    }
}

macro_rules! replays {
    ($($target:ident),* $(,)?) => {
        const REPLAYED: &[&str] = &[$(stringify!($target)),*];

        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*
    };
}

replays!(
    audio_container,
    audio_pcm,
    audio_resample,
    audio_mel,
    audio_pipeline,
    feature_requests,
    model_requests,
);
