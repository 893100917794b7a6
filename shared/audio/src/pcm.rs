//! Headerless interleaved PCM to `f32` samples, independent of how the bytes were chunked.

use crate::format::{PcmSpec, SampleFormat};
use crate::AudioError;

/// Turns byte chunks of any size into whole interleaved frames of `f32` samples, carrying
/// partial samples over to the next chunk.
#[derive(Debug)]
pub struct PcmParser {
    spec: PcmSpec,
    carry: Vec<u8>,
    samples_seen: u64,
}

impl PcmParser {
    pub fn new(spec: PcmSpec) -> Self {
        Self {
            spec,
            carry: Vec::with_capacity(spec.frame_bytes()),
            samples_seen: 0,
        }
    }

    pub fn spec(&self) -> PcmSpec {
        self.spec
    }

    /// Appends the whole frames contained in `carry + bytes` to `out` (interleaved).
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<f32>) -> Result<(), AudioError> {
        let frame_bytes = self.spec.frame_bytes();
        if !self.carry.is_empty() {
            let need = frame_bytes - self.carry.len();
            let take = need.min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() < frame_bytes {
                return Ok(());
            }
            let frame = std::mem::take(&mut self.carry);
            self.convert(&frame, out)?;
            self.carry = frame;
            self.carry.clear();
        }
        let whole = bytes.len() / frame_bytes * frame_bytes;
        self.convert(&bytes[..whole], out)?;
        self.carry.extend_from_slice(&bytes[whole..]);
        Ok(())
    }

    /// Ends the stream: a partial frame left over is an error.
    pub fn finish(&mut self) -> Result<(), AudioError> {
        if self.carry.is_empty() {
            Ok(())
        } else {
            Err(AudioError::TruncatedPcm {
                trailing_bytes: self.carry.len(),
                frame_bytes: self.spec.frame_bytes(),
            })
        }
    }

    fn convert(&mut self, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), AudioError> {
        match self.spec.sample_format {
            SampleFormat::S16Le => {
                out.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0),
                );
            }
            SampleFormat::F32Le => {
                let start = out.len();
                out.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
                if let Some(pos) = out[start..].iter().position(|v| !v.is_finite()) {
                    return Err(AudioError::NonFiniteSample {
                        index: self.samples_seen + pos as u64,
                        value: out[start + pos],
                    });
                }
            }
        }
        self.samples_seen += (bytes.len() / self.spec.sample_format.bytes_per_sample()) as u64;
        Ok(())
    }
}

/// Averages interleaved channels into mono, as HF pipelines and openai-whisper's ffmpeg
/// (`-ac 1`) do.
pub fn downmix(interleaved: &[f32], channels: usize, out: &mut Vec<f32>) {
    if channels == 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let scale = 1.0 / channels as f32;
    out.extend(
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() * scale),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s16_spec(channels: u32) -> PcmSpec {
        PcmSpec::new(SampleFormat::S16Le, 16_000, channels).unwrap()
    }

    #[test]
    fn chunking_does_not_change_samples() {
        let bytes: Vec<u8> = (0..4000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let mut whole = Vec::new();
        let mut parser = PcmParser::new(s16_spec(2));
        parser.push(&bytes, &mut whole).unwrap();
        parser.finish().unwrap();
        for chunk in [1, 3, 5, 160, 999] {
            let mut parser = PcmParser::new(s16_spec(2));
            let mut out = Vec::new();
            for piece in bytes.chunks(chunk) {
                parser.push(piece, &mut out).unwrap();
            }
            parser.finish().unwrap();
            assert_eq!(out, whole, "chunk size {chunk}");
        }
    }

    #[test]
    fn s16_scaling_matches_soundfile() {
        let mut out = Vec::new();
        let mut parser = PcmParser::new(s16_spec(1));
        let bytes: Vec<u8> = [i16::MIN, -1, 0, 1, i16::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        parser.push(&bytes, &mut out).unwrap();
        assert_eq!(
            out,
            vec![-1.0, -1.0 / 32768.0, 0.0, 1.0 / 32768.0, 32767.0 / 32768.0]
        );
    }

    #[test]
    fn rejects_non_finite_f32_with_its_index() {
        let spec = PcmSpec::new(SampleFormat::F32Le, 16_000, 1).unwrap();
        let mut parser = PcmParser::new(spec);
        let mut out = Vec::new();
        parser.push(&0.5f32.to_le_bytes(), &mut out).unwrap();
        let bad: Vec<u8> = [0.1f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        match parser.push(&bad, &mut out) {
            Err(AudioError::NonFiniteSample { index, .. }) => assert_eq!(index, 2),
            other => panic!("expected NonFiniteSample, got {other:?}"),
        }
    }

    #[test]
    fn trailing_partial_frame_is_an_error() {
        let mut parser = PcmParser::new(s16_spec(2));
        let mut out = Vec::new();
        parser.push(&[1, 2, 3], &mut out).unwrap();
        assert!(matches!(
            parser.finish(),
            Err(AudioError::TruncatedPcm {
                trailing_bytes: 3,
                frame_bytes: 4
            })
        ));
    }

    #[test]
    fn downmix_averages_channels() {
        let mut out = Vec::new();
        downmix(&[1.0, 0.0, 0.5, 0.5], 2, &mut out);
        assert_eq!(out, vec![0.5, 0.5]);
    }
}
