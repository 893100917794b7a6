//! Proto messages to the typed requests the service works with, and back. Validation happens
//! here, once, with errors naming the offending field.

use asr_audio::{
    Container, InputFormat, MelConfig, PcmSpec, SampleFormat, StreamInfo, StreamSummary,
};
use asr_proto::v1 as pb;

use crate::error::FeatureError;
use crate::FeatureServiceConfig;

/// How each audio message's bytes must be rearranged before parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteLayout {
    /// Passed through as they come (containers, interleaved PCM).
    AsIs,
    /// Planar PCM: each message holds `channels` equal blocks of `bytes_per_sample` samples.
    PlanarPerMessage {
        channels: usize,
        bytes_per_sample: usize,
    },
}

/// A validated Extract stream config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtractSpec {
    pub input: InputFormat,
    pub layout: ByteLayout,
    pub mel: MelConfig,
    pub frames_per_message: usize,
}

impl ExtractSpec {
    pub fn from_proto(
        config: pb::ExtractConfig,
        service: &FeatureServiceConfig,
    ) -> Result<Self, FeatureError> {
        let (input, layout) = input_format(config.format)?;
        let n_mels = if config.n_mels == 0 {
            80
        } else {
            config.n_mels
        };
        let mel = MelConfig::new(n_mels)?;
        let frames_per_message = match config.max_frames_per_message {
            0 => service.default_frames_per_message,
            n if n as usize <= asr_audio::WINDOW_FRAMES => n as usize,
            n => {
                return Err(FeatureError::invalid(
                    "config.max_frames_per_message",
                    format!("must be 0..=3000, got {n}"),
                ))
            }
        };
        Ok(Self {
            input,
            layout,
            mel,
            frames_per_message,
        })
    }
}

/// Validates an `AudioFormat` (unset = encoded, detected from the bytes).
pub fn input_format(
    format: Option<pb::AudioFormat>,
) -> Result<(InputFormat, ByteLayout), FeatureError> {
    match format.and_then(|f| f.format) {
        None => Ok((InputFormat::Encoded, ByteLayout::AsIs)),
        Some(pb::audio_format::Format::Encoded(encoded)) => {
            if encoded.container_hint == pb::Container::RawPcm as i32 {
                return Err(FeatureError::invalid(
                    "config.format.encoded.container_hint",
                    "CONTAINER_RAW_PCM is not a container; send raw_pcm instead",
                ));
            }
            Ok((InputFormat::Encoded, ByteLayout::AsIs))
        }
        Some(pb::audio_format::Format::RawPcm(raw)) => {
            let sample_format = match pb::SampleFormat::try_from(raw.sample_format) {
                Ok(pb::SampleFormat::Unspecified | pb::SampleFormat::S16le) => SampleFormat::S16Le,
                Ok(pb::SampleFormat::F32le) => SampleFormat::F32Le,
                Err(_) => {
                    return Err(FeatureError::invalid(
                        "config.format.raw_pcm.sample_format",
                        format!("unknown sample format {}", raw.sample_format),
                    ))
                }
            };
            let channels = if raw.channels == 0 { 1 } else { raw.channels };
            let spec = PcmSpec::new(sample_format, raw.sample_rate_hz, channels)?;
            let layout = if raw.interleaved.unwrap_or(true) || channels == 1 {
                ByteLayout::AsIs
            } else {
                ByteLayout::PlanarPerMessage {
                    channels: channels as usize,
                    bytes_per_sample: sample_format.bytes_per_sample(),
                }
            };
            Ok((InputFormat::RawPcm(spec), layout))
        }
    }
}

impl ByteLayout {
    /// Rearranges one audio message into interleaved order.
    pub fn to_interleaved(self, bytes: Vec<u8>) -> Result<Vec<u8>, FeatureError> {
        match self {
            ByteLayout::AsIs => Ok(bytes),
            ByteLayout::PlanarPerMessage {
                channels,
                bytes_per_sample,
            } => {
                let frame = channels * bytes_per_sample;
                if !bytes.len().is_multiple_of(frame) {
                    return Err(FeatureError::invalid(
                        "audio",
                        format!(
                            "planar PCM messages must hold whole frames: {} bytes is not a multiple of {frame}",
                            bytes.len()
                        ),
                    ));
                }
                let frames = bytes.len() / frame;
                let mut out = vec![0u8; bytes.len()];
                for c in 0..channels {
                    let plane =
                        &bytes[c * frames * bytes_per_sample..(c + 1) * frames * bytes_per_sample];
                    for (f, sample) in plane.chunks_exact(bytes_per_sample).enumerate() {
                        let at = f * frame + c * bytes_per_sample;
                        out[at..at + bytes_per_sample].copy_from_slice(sample);
                    }
                }
                Ok(out)
            }
        }
    }
}

pub fn stream_info(info: &StreamInfo) -> pb::MelStreamInfo {
    pb::MelStreamInfo {
        container: info.container.map_or(pb::Container::RawPcm, container) as i32,
        codec: codec(&info.codec) as i32,
        source_sample_rate_hz: info.source_sample_rate,
        source_channels: info.source_channels,
        declared_duration_seconds: None,
        n_mels: info.n_mels as u32,
        sample_rate_hz: asr_audio::SAMPLE_RATE,
        hop_length: asr_audio::HOP_LENGTH as u32,
        n_fft: asr_audio::N_FFT as u32,
        frames_per_second: (asr_audio::SAMPLE_RATE as usize / asr_audio::HOP_LENGTH) as u32,
        frames_per_window: asr_audio::WINDOW_FRAMES as u32,
        floor_value: asr_audio::SILENT_LOG_MEL,
    }
}

pub fn summary(summary: &StreamSummary) -> pb::ExtractSummary {
    pb::ExtractSummary {
        total_samples: summary.samples,
        duration_seconds: summary.duration_seconds,
        total_frames: summary.frames_emitted,
        window_count: summary.windows as u32,
    }
}

pub fn container(container: Container) -> pb::Container {
    match container {
        Container::Wav => pb::Container::Wav,
        Container::Flac => pb::Container::Flac,
        Container::Mp3 => pb::Container::Mp3,
        Container::Ogg => pb::Container::Ogg,
        Container::Mp4 => pb::Container::Mp4,
        Container::Mkv => pb::Container::Mkv,
        Container::Aiff => pb::Container::Aiff,
    }
}

/// Maps symphonia's codec short names (and ours for raw PCM) to the proto enum.
pub fn codec(name: &str) -> pb::Codec {
    match name {
        "flac" => pb::Codec::Flac,
        "mp3" | "mp2" | "mp1" => pb::Codec::Mp3,
        "vorbis" => pb::Codec::Vorbis,
        "opus" => pb::Codec::Opus,
        "aac" => pb::Codec::Aac,
        "alac" => pb::Codec::Alac,
        "pcm_alaw" => pb::Codec::Alaw,
        "pcm_mulaw" => pb::Codec::Mulaw,
        n if n.starts_with("adpcm") => pb::Codec::Adpcm,
        n if n.starts_with("pcm") => pb::Codec::Pcm,
        _ => pb::Codec::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(sample_rate_hz: u32, channels: u32, interleaved: Option<bool>) -> pb::ExtractConfig {
        pb::ExtractConfig {
            format: Some(pb::AudioFormat {
                format: Some(pb::audio_format::Format::RawPcm(pb::RawPcmFormat {
                    sample_format: pb::SampleFormat::S16le as i32,
                    sample_rate_hz,
                    channels,
                    interleaved,
                })),
            }),
            n_mels: 0,
            max_frames_per_message: 0,
        }
    }

    #[test]
    fn defaults_apply() {
        let spec = ExtractSpec::from_proto(raw(44_100, 0, None), &FeatureServiceConfig::default())
            .unwrap();
        assert_eq!(spec.mel.n_mels, 80);
        assert_eq!(spec.frames_per_message, 100);
        assert!(matches!(
            spec.input,
            InputFormat::RawPcm(PcmSpec {
                channels: 1,
                sample_rate: 44_100,
                ..
            })
        ));
    }

    #[test]
    fn rejects_bad_fields() {
        let service = FeatureServiceConfig::default();
        assert!(ExtractSpec::from_proto(raw(0, 1, None), &service).is_err());
        let mut config = raw(16_000, 1, None);
        config.n_mels = 81;
        assert!(matches!(
            ExtractSpec::from_proto(config, &service),
            Err(FeatureError::Audio(asr_audio::AudioError::InvalidMelCount(
                81
            )))
        ));
        let mut config = raw(16_000, 1, None);
        config.max_frames_per_message = 3001;
        assert!(matches!(
            ExtractSpec::from_proto(config, &service),
            Err(FeatureError::InvalidField {
                field: "config.max_frames_per_message",
                ..
            })
        ));
    }

    #[test]
    fn planar_messages_are_interleaved() {
        let spec = ExtractSpec::from_proto(
            raw(16_000, 2, Some(false)),
            &FeatureServiceConfig::default(),
        )
        .unwrap();
        // L = [1, 2], R = [3, 4] as s16le.
        let planar: Vec<u8> = [1i16, 2, 3, 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let interleaved: Vec<u8> = [1i16, 3, 2, 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(spec.layout.to_interleaved(planar).unwrap(), interleaved);
        assert!(spec.layout.to_interleaved(vec![0; 6]).is_err());
    }
}
