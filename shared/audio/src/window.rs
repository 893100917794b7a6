//! Whisper's normalisation of one 30 s window of raw log-mel frames.
//!
//! It needs the window's maximum, so it runs where a whole window is assembled (the model
//! service, the CLI), not in the streaming feature service.

use crate::{SILENT_LOG_MEL, WINDOW_FRAMES};

/// Normalises one window: `frames` holds up to 3000 raw frames of `n_mels` values each
/// (frame-major, as they are streamed); frames past its end are the zero-padding's
/// [`SILENT_LOG_MEL`]. Returns the model input, mel-major `[n_mels][3000]` like HF's
/// `input_features[0]`: `(max(x, max - 8) + 4) / 4`.
///
/// # Panics
/// If `frames` is not a whole number of frames or holds more than 3000.
pub fn normalize_window(frames: &[f32], n_mels: usize) -> Vec<f32> {
    assert!(
        n_mels > 0 && frames.len().is_multiple_of(n_mels),
        "frames must hold whole frames"
    );
    let present = frames.len() / n_mels;
    assert!(
        present <= WINDOW_FRAMES,
        "a window holds at most {WINDOW_FRAMES} frames, got {present}"
    );
    let mut max = frames.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if present < WINDOW_FRAMES {
        max = max.max(SILENT_LOG_MEL);
    }
    let floor = max - 8.0;
    let normalise = |x: f32| (x.max(floor) + 4.0) / 4.0;
    let mut out = vec![normalise(SILENT_LOG_MEL); n_mels * WINDOW_FRAMES];
    for (t, frame) in frames.chunks_exact(n_mels).enumerate() {
        for (m, &x) in frame.iter().enumerate() {
            out[m * WINDOW_FRAMES + t] = normalise(x);
        }
    }
    out
}

/// Splits a stream's raw frames into its normalised 30 s windows: `windows` windows, the
/// last padded as HF's zero padding would.
pub fn windows_from_frames(frames: &[f32], n_mels: usize, windows: usize) -> Vec<Vec<f32>> {
    let per_window = WINDOW_FRAMES * n_mels;
    (0..windows)
        .map(|w| {
            let start = (w * per_window).min(frames.len());
            let end = ((w + 1) * per_window).min(frames.len());
            normalize_window(&frames[start..end], n_mels)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_eight_below_the_max_and_rescales() {
        let n_mels = 2;
        let frames = vec![2.0, -7.0, 0.0, -20.0];
        let out = normalize_window(&frames, n_mels);
        assert_eq!(out.len(), 2 * WINDOW_FRAMES);
        // mel 0: frames 2.0, 0.0 then padding clamped to 2 - 8 = -6.
        assert_eq!(out[0], 1.5);
        assert_eq!(out[1], 1.0);
        assert_eq!(out[2], (-6.0 + 4.0) / 4.0);
        // mel 1: -7.0, -20.0 -> clamped to -6.
        assert_eq!(out[WINDOW_FRAMES], (-6.0 + 4.0) / 4.0);
        assert_eq!(out[WINDOW_FRAMES + 1], (-6.0 + 4.0) / 4.0);
    }

    #[test]
    fn splits_into_windows() {
        let frames = vec![0.0; 3001 * 80];
        let windows = windows_from_frames(&frames, 80, 2);
        assert_eq!(windows.len(), 2);
        assert!(windows.iter().all(|w| w.len() == 80 * WINDOW_FRAMES));
    }
}
