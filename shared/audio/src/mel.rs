//! Streaming Whisper log-mel frames, numerically equal to HF's `WhisperFeatureExtractor`.
//!
//! Frame `i` is centred on sample `160 i` and covers samples `[160 i - 200, 160 i + 200)` of a
//! virtual signal: the audio, zero-padded to a whole number of 30 s windows (as HF pads a
//! clip to 480000 samples), reflected at both ends of that padded signal (torch.stft's
//! `center=True, pad_mode="reflect"`). A frame leaves [`LogMelExtractor::push`] as soon as
//! the samples it covers have arrived; [`LogMelExtractor::finish`] computes the frames that
//! touch the end of the audio. Frames past those lie wholly in the zero padding and equal
//! [`SILENT_LOG_MEL`](crate::SILENT_LOG_MEL): they are never computed nor sent.
//!
//! The spectrum is computed in f64 (HF's numpy path does the same; its torch path is f32),
//! and the log in f32, so our frames sit within f32 rounding of either path.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

use crate::{AudioError, HOP_LENGTH, N_FFT, SAMPLE_RATE, WINDOW_SAMPLES};

const HALF_WINDOW: usize = N_FFT / 2;
const N_BINS: usize = N_FFT / 2 + 1;
/// Mel power floor before the log, as in Whisper.
const POWER_FLOOR: f64 = 1e-10;

/// Log-mel settings. Everything but `n_mels` is fixed by Whisper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MelConfig {
    /// 80 for every Whisper up to large-v2, 128 for large-v3.
    pub n_mels: usize,
}

impl Default for MelConfig {
    fn default() -> Self {
        Self { n_mels: 80 }
    }
}

impl MelConfig {
    pub fn new(n_mels: u32) -> Result<Self, AudioError> {
        match n_mels {
            80 | 128 => Ok(Self {
                n_mels: n_mels as usize,
            }),
            other => Err(AudioError::InvalidMelCount(other)),
        }
    }
}

/// Slaney-normalised, slaney-scale triangular filters over the 201 FFT bins, built as HF's
/// `audio_utils.mel_filter_bank(201, n_mels, 0, 8000, 16000, norm="slaney", mel_scale="slaney")`.
/// Stored sparsely: each filter is non-zero on a short run of bins.
#[derive(Debug, Clone)]
pub struct MelFilterBank {
    n_mels: usize,
    /// `(first_bin, weights)` per mel filter.
    filters: Vec<(usize, Vec<f64>)>,
}

impl MelFilterBank {
    pub fn new(config: MelConfig) -> Self {
        let dense = Self::dense(config.n_mels);
        let filters = dense
            .iter()
            .map(|row| {
                let first = row.iter().position(|&w| w > 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&w| w > 0.0).map_or(first, |p| p + 1);
                (first, row[first..last.max(first)].to_vec())
            })
            .collect();
        Self {
            n_mels: config.n_mels,
            filters,
        }
    }

    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// The dense `[n_mels][201]` matrix (HF stores its transpose, `[201][n_mels]`).
    pub fn dense(n_mels: usize) -> Vec<Vec<f64>> {
        let nyquist = f64::from(SAMPLE_RATE / 2);
        let mel_min = hertz_to_mel_slaney(0.0);
        let mel_max = hertz_to_mel_slaney(nyquist);
        let points = n_mels + 2;
        // numpy.linspace: start + i * step, with the last point set to stop exactly.
        let step = (mel_max - mel_min) / (points - 1) as f64;
        let filter_freqs: Vec<f64> = (0..points)
            .map(|i| {
                if i == points - 1 {
                    mel_max
                } else {
                    mel_min + i as f64 * step
                }
            })
            .map(mel_to_hertz_slaney)
            .collect();
        let fft_step = nyquist / (N_BINS - 1) as f64;
        let fft_freqs: Vec<f64> = (0..N_BINS).map(|k| k as f64 * fft_step).collect();
        (0..n_mels)
            .map(|m| {
                let (lower, centre, upper) =
                    (filter_freqs[m], filter_freqs[m + 1], filter_freqs[m + 2]);
                let enorm = 2.0 / (upper - lower);
                fft_freqs
                    .iter()
                    .map(|&f| {
                        let down = -(lower - f) / (centre - lower);
                        let up = (upper - f) / (upper - centre);
                        0.0f64.max(down.min(up)) * enorm
                    })
                    .collect()
            })
            .collect()
    }

    /// `out[m] = log10(max(sum_k filter[m][k] * power[k], 1e-10))`.
    fn apply_log(&self, power: &[f64], out: &mut [f32]) {
        for ((first, weights), slot) in self.filters.iter().zip(out.iter_mut()) {
            let energy: f64 = weights
                .iter()
                .zip(&power[*first..])
                .map(|(w, p)| w * p)
                .sum();
            // Clamped to f32's range: finite but huge samples (float wav, f32 PCM) would
            // otherwise give an infinite frame.
            *slot = (energy.clamp(POWER_FLOOR, f64::from(f32::MAX)) as f32).log10();
        }
    }
}

fn hertz_to_mel_slaney(hz: f64) -> f64 {
    const MIN_LOG_HZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 27.0 / 6.4f64.ln();
    if hz >= MIN_LOG_HZ {
        MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() * logstep
    } else {
        3.0 * hz / 200.0
    }
}

fn mel_to_hertz_slaney(mel: f64) -> f64 {
    const MIN_LOG_HZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HZ * (logstep * (mel - MIN_LOG_MEL)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// Computes one frame: window, real FFT, power, mel, log10.
struct FrameKernel {
    bank: Arc<MelFilterBank>,
    window: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
    input: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    power: Vec<f64>,
}

impl FrameKernel {
    fn new(bank: Arc<MelFilterBank>) -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
        // torch.hann_window(400), periodic.
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
            .collect();
        Self {
            bank,
            window,
            input: fft.make_input_vec(),
            spectrum: fft.make_output_vec(),
            scratch: fft.make_scratch_vec(),
            power: vec![0.0; N_BINS],
            fft,
        }
    }

    /// `samples(j)` gives sample `j` of the 400-sample frame.
    fn compute(&mut self, samples: impl Fn(usize) -> f32, out: &mut [f32]) {
        for (j, (slot, w)) in self.input.iter_mut().zip(&self.window).enumerate() {
            *slot = f64::from(samples(j)) * w;
        }
        self.compute_windowed(out);
    }

    fn compute_slice(&mut self, frame: &[f32], out: &mut [f32]) {
        for ((slot, w), &x) in self.input.iter_mut().zip(&self.window).zip(frame) {
            *slot = f64::from(x) * w;
        }
        self.compute_windowed(out);
    }

    fn compute_windowed(&mut self, out: &mut [f32]) {
        // Lengths are fixed at construction, so process cannot fail.
        let _ =
            self.fft
                .process_with_scratch(&mut self.input, &mut self.spectrum, &mut self.scratch);
        for (p, c) in self.power.iter_mut().zip(&self.spectrum) {
            *p = c.re * c.re + c.im * c.im;
        }
        self.bank.apply_log(&self.power, out);
    }
}

/// Where a finished stream's frames end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MelStreamEnd {
    /// 16 kHz samples received.
    pub samples: u64,
    /// Frames computed and emitted over the whole stream.
    pub frames_emitted: u64,
    /// 30 s windows the audio occupies: `ceil(samples / 480000)`.
    pub windows: u64,
}

/// Streaming log-mel extractor over 16 kHz mono samples. Output frames are `n_mels` raw
/// log10 values each, appended frame after frame.
pub struct LogMelExtractor {
    kernel: FrameKernel,
    n_mels: usize,
    /// Samples from absolute index `buffer_start` on.
    buffer: Vec<f32>,
    buffer_start: u64,
    total: u64,
    next_frame: u64,
}

impl LogMelExtractor {
    pub fn new(config: MelConfig) -> Self {
        Self::with_bank(Arc::new(MelFilterBank::new(config)))
    }

    /// Shares one filter bank between many extractors (one per stream).
    pub fn with_bank(bank: Arc<MelFilterBank>) -> Self {
        let n_mels = bank.n_mels();
        Self {
            kernel: FrameKernel::new(bank),
            n_mels,
            buffer: Vec::with_capacity(8 * N_FFT),
            buffer_start: 0,
            total: 0,
            next_frame: 0,
        }
    }

    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    pub fn samples_received(&self) -> u64 {
        self.total
    }

    pub fn frames_emitted(&self) -> u64 {
        self.next_frame
    }

    /// Adds samples; appends every frame whose 400 samples are now all known to `out` and
    /// returns how many frames were appended.
    pub fn push(&mut self, samples: &[f32], out: &mut Vec<f32>) -> usize {
        self.buffer.extend_from_slice(samples);
        self.total += samples.len() as u64;
        let first = self.next_frame;
        // Frame i needs samples up to 160 i + 199, and the first 201 samples for the reflection
        // at the start.
        while self.total
            >= (self.next_frame * HOP_LENGTH as u64 + HALF_WINDOW as u64)
                .max(HALF_WINDOW as u64 + 1)
        {
            let start = out.len();
            out.resize(start + self.n_mels, 0.0);
            let centre = self.next_frame * HOP_LENGTH as u64;
            if centre >= HALF_WINDOW as u64 {
                let offset = (centre - HALF_WINDOW as u64 - self.buffer_start) as usize;
                self.kernel
                    .compute_slice(&self.buffer[offset..offset + N_FFT], &mut out[start..]);
            } else {
                let (buffer, buffer_start) = (&self.buffer, self.buffer_start);
                self.kernel.compute(
                    |j| {
                        let k = centre as i64 - HALF_WINDOW as i64 + j as i64;
                        buffer[(k.unsigned_abs() - buffer_start) as usize]
                    },
                    &mut out[start..],
                );
            }
            self.next_frame += 1;
        }
        self.discard_consumed();
        (self.next_frame - first) as usize
    }

    /// Ends the stream: appends the frames that touch the end of the audio (computed over the
    /// zero padding and the final reflection) and reports where the stream ended.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> Result<MelStreamEnd, AudioError> {
        let n = self.total;
        if n == 0 {
            return Err(AudioError::Empty);
        }
        let window = WINDOW_SAMPLES as u64;
        let windows = n.div_ceil(window);
        let padded = windows * window;
        // Frames whose window starts before the end of the audio, within the last 30 s window.
        let touching = (n + HALF_WINDOW as u64 - 1) / HOP_LENGTH as u64 + 1;
        let end_frame = touching.min(padded / HOP_LENGTH as u64);
        let (buffer, buffer_start) = (&self.buffer, self.buffer_start);
        let sample_at = |k: i64| -> f32 {
            // Reflect at both ends of the padded signal, then read audio or zero padding.
            let k = if k < 0 { -k } else { k };
            let k = if k >= padded as i64 {
                2 * (padded as i64 - 1) - k
            } else {
                k
            } as u64;
            if k < n {
                buffer[(k - buffer_start) as usize]
            } else {
                0.0
            }
        };
        while self.next_frame < end_frame {
            let start = out.len();
            out.resize(start + self.n_mels, 0.0);
            let first_sample = (self.next_frame * HOP_LENGTH as u64) as i64 - HALF_WINDOW as i64;
            self.kernel
                .compute(|j| sample_at(first_sample + j as i64), &mut out[start..]);
            self.next_frame += 1;
        }
        Ok(MelStreamEnd {
            samples: n,
            frames_emitted: self.next_frame,
            windows,
        })
    }

    /// Drops samples no future frame needs.
    fn discard_consumed(&mut self) {
        let keep_from = (self.next_frame * HOP_LENGTH as u64).saturating_sub(HALF_WINDOW as u64);
        if keep_from > self.buffer_start {
            let drop = (keep_from - self.buffer_start) as usize;
            self.buffer.drain(..drop.min(self.buffer.len()));
            self.buffer_start = keep_from;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SILENT_LOG_MEL, WINDOW_FRAMES};

    fn tone(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| 0.3 * (i as f32 * 0.07).sin() + 0.1 * (i as f32 * 0.31).cos())
            .collect()
    }

    fn extract_in_chunks(samples: &[f32], chunk: usize) -> (Vec<f32>, MelStreamEnd) {
        let mut ex = LogMelExtractor::new(MelConfig::default());
        let mut out = Vec::new();
        for piece in samples.chunks(chunk.max(1)) {
            ex.push(piece, &mut out);
        }
        let end = ex.finish(&mut out).unwrap();
        (out, end)
    }

    #[test]
    fn filters_are_slaney_normalised_triangles() {
        let dense = MelFilterBank::dense(80);
        assert_eq!(dense.len(), 80);
        assert!(dense
            .iter()
            .all(|row| row.len() == 201 && row.iter().all(|w| *w >= 0.0)));
        // Every filter has some weight (201 bins are enough for 80 and 128 mels).
        assert!(MelFilterBank::dense(128)
            .iter()
            .all(|row| row.iter().any(|w| *w > 0.0)));
    }

    #[test]
    fn chunking_gives_bit_identical_frames() {
        let samples = tone(16_000 * 2 + 123);
        let (reference, end) = extract_in_chunks(&samples, samples.len());
        assert_eq!(end.frames_emitted as usize * 80, reference.len());
        for chunk in [1, 7, 160, 401, 4000] {
            let (out, _) = extract_in_chunks(&samples, chunk);
            assert!(out == reference, "chunk {chunk} differs");
        }
    }

    #[test]
    fn frames_stop_where_the_audio_ends() {
        // 1 s of audio: frames 0..=101 touch it (frame 101 starts at sample 15960).
        let (out, end) = extract_in_chunks(&tone(16_000), 512);
        assert_eq!(end.frames_emitted, 102);
        assert_eq!(end.windows, 1);
        assert_eq!(out.len(), 102 * 80);
        // Exactly 30 s: all 3000 frames of the window, the last ones reflected.
        let (_, end) = extract_in_chunks(&tone(WINDOW_SAMPLES), 4096);
        assert_eq!(end.frames_emitted, WINDOW_FRAMES as u64);
        // 31 s: two windows.
        let (_, end) = extract_in_chunks(&tone(WINDOW_SAMPLES + 16_000), 4096);
        assert_eq!((end.frames_emitted, end.windows), (3102, 2));
    }

    #[test]
    fn silence_is_the_floor() {
        let (out, _) = extract_in_chunks(&vec![0.0; 1000], 1000);
        assert!(out.iter().all(|&v| v == SILENT_LOG_MEL));
    }

    #[test]
    fn empty_stream_is_an_error() {
        let mut ex = LogMelExtractor::new(MelConfig::default());
        assert!(matches!(ex.finish(&mut Vec::new()), Err(AudioError::Empty)));
    }

    #[test]
    fn very_short_audio_reflects_its_zero_padding() {
        // 50 samples: frame 0 covers reflected samples 200..1, mostly zero padding.
        let (out, end) = extract_in_chunks(&tone(50), 50);
        assert_eq!(end.frames_emitted, 2);
        assert!(out.iter().all(|v| v.is_finite()));
    }
}
