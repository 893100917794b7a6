//! How glibc's malloc hands large blocks back to the kernel.
//!
//! By default glibc serves blocks of 128 KiB and more with a fresh `mmap` and unmaps them on
//! `free` (its dynamic threshold grows only to what was freed last). A Whisper encoder pass
//! allocates and frees activations of 3-12 MB per operation, so every one of them was page
//! faulted in and zeroed by the kernel again: 13% of an int8 encoder pass was kernel time
//! (`clear_page_erms`, page faults). Served from the heap and kept there, a pass took 0.43 s
//! instead of 0.49-0.54 s and 32 clips decoded in 16.6 s instead of 17.7-19.6 s, at the same
//! peak RSS (the freed blocks are reused by the next pass, not added to it).
//!
//! glibc reads `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` (or `GLIBC_TUNABLES`) at
//! start; a user who set any of them keeps theirs.

use std::ffi::OsString;

/// Blocks below this come from the heap: glibc's largest allowed mmap threshold on 64-bit
/// (half its 64 MiB heap size), above the encoder's largest activation of whisper-large
/// (`[1500, 5120]` float32, 30 MiB).
pub const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of the heap is returned to the kernel past this much.
pub const TRIM_THRESHOLD: i32 = 1 << 30;

/// The variables through which a user tunes glibc's malloc; if any is set, it is theirs.
const USER_SETTINGS: [&str; 3] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Whether to apply [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`] in an environment given as a
/// lookup (testable without touching the process's).
pub fn should_tune(lookup: impl Fn(&str) -> Option<OsString>) -> bool {
    !USER_SETTINGS.iter().any(|name| lookup(name).is_some())
}

/// Call early in `main` of a binary that runs libtorch. Returns whether the settings were
/// applied (false on a user's own settings, or a libc other than glibc).
pub fn keep_large_blocks() -> bool {
    if !should_tune(|name| std::env::var_os(name)) {
        return false;
    }
    apply()
}

/// Optimiser steps between [`release_free_memory`] calls in training. On a float32 run of
/// whisper-base: peak RSS 3.8 GB after 14 steps trimming every step (8% slower steps, the freed
/// pages faulting in again), 3.9 GB after 16 every 4th (about 3% slower), 4.9 GB after 24 every
/// 8th; without trimming 4.8 GB after 12 and 10.6 GB after the epoch.
pub const TRAINING_TRIM_INTERVAL: i64 = 4;

/// Training's hook after optimiser step `step`: [`release_free_memory`] every
/// [`TRAINING_TRIM_INTERVAL`] steps.
pub fn after_training_step(step: i64) {
    if step % TRAINING_TRIM_INTERVAL == 0 {
        release_free_memory();
    }
}

/// Hands the heaps' free pages back to the kernel (glibc's `malloc_trim`). Training calls it
/// every [`TRAINING_TRIM_INTERVAL`] optimiser steps: with [`keep_large_blocks`] a step's
/// activations come from the heap, and the free space between them, its pattern a little
/// different each step, otherwise grew a float32 run on whisper-base by 50-150 MB a step.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory; glibc serialises it with allocations.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes malloc's thresholds; it is called before the threads that
    // allocate much exist, and glibc serialises it against them anyway.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_own_setting_is_kept() {
        assert!(should_tune(|_| None));
        for name in USER_SETTINGS {
            assert!(!should_tune(|asked| (asked == name).then(|| "1".into())));
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_thresholds() {
        assert!(apply());
    }
}
