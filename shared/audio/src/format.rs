//! What the input bytes are: raw PCM described by the client, or a container detected from its
//! first bytes.

use crate::AudioError;

/// Lowest and highest raw PCM sample rates accepted.
pub const MIN_SAMPLE_RATE: u32 = 1_000;
pub const MAX_SAMPLE_RATE: u32 = 384_000;
/// Highest channel count accepted for raw PCM.
pub const MAX_CHANNELS: u32 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    /// Signed 16-bit little-endian, scaled by 1/32768 as soundfile and HF do.
    S16Le,
    /// 32-bit IEEE float little-endian; must be finite.
    F32Le,
}

impl SampleFormat {
    pub fn bytes_per_sample(self) -> usize {
        match self {
            SampleFormat::S16Le => 2,
            SampleFormat::F32Le => 4,
        }
    }
}

/// A validated description of headerless interleaved PCM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcmSpec {
    pub sample_format: SampleFormat,
    pub sample_rate: u32,
    pub channels: u32,
}

impl PcmSpec {
    pub fn new(
        sample_format: SampleFormat,
        sample_rate: u32,
        channels: u32,
    ) -> Result<Self, AudioError> {
        if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&sample_rate) {
            return Err(AudioError::InvalidSampleRate {
                got: sample_rate,
                max: MAX_SAMPLE_RATE,
            });
        }
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(AudioError::InvalidChannels {
                got: channels,
                max: MAX_CHANNELS,
            });
        }
        Ok(Self {
            sample_format,
            sample_rate,
            channels,
        })
    }

    pub fn frame_bytes(&self) -> usize {
        self.sample_format.bytes_per_sample() * self.channels as usize
    }
}

/// How to interpret the input bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    RawPcm(PcmSpec),
    /// A container (wav, flac, mp3, ogg, mp4/m4a, ...) recognised from its first bytes.
    Encoded,
}

/// Containers recognised from their leading bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Wav,
    Flac,
    Mp3,
    Ogg,
    Mp4,
    Mkv,
    Aiff,
}

impl Container {
    /// Bytes needed to tell containers apart (an ID3v2 header or an MP4 `ftyp` box fits).
    pub const SNIFF_LEN: usize = 12;

    /// Recognises a container from its first bytes. `None` when the bytes match nothing we
    /// decode; callers that hold fewer than [`Self::SNIFF_LEN`] bytes at end of stream pass
    /// what they have.
    pub fn sniff(head: &[u8]) -> Option<Container> {
        let starts = |magic: &[u8]| head.len() >= magic.len() && &head[..magic.len()] == magic;
        if starts(b"RIFF") && head.len() >= 12 && (&head[8..12] == b"WAVE") {
            return Some(Container::Wav);
        }
        if starts(b"RIFX") || starts(b"RF64") || starts(b"BW64") {
            return Some(Container::Wav);
        }
        if starts(b"FORM")
            && head.len() >= 12
            && (&head[8..12] == b"AIFF" || &head[8..12] == b"AIFC")
        {
            return Some(Container::Aiff);
        }
        if starts(b"fLaC") {
            return Some(Container::Flac);
        }
        if starts(b"OggS") {
            return Some(Container::Ogg);
        }
        if starts(b"ID3") {
            // ID3v2 tag: MP3 by far the most common payload (also what Common Voice ships).
            return Some(Container::Mp3);
        }
        if head.len() >= 8 && &head[4..8] == b"ftyp" {
            return Some(Container::Mp4);
        }
        if starts(&[0x1A, 0x45, 0xDF, 0xA3]) {
            return Some(Container::Mkv);
        }
        if head.len() >= 2
            && head[0] == 0xFF
            && (head[1] & 0xE0) == 0xE0
            && is_mpeg_audio_header(head)
        {
            return Some(Container::Mp3);
        }
        None
    }

    pub fn name(self) -> &'static str {
        match self {
            Container::Wav => "wav",
            Container::Flac => "flac",
            Container::Mp3 => "mp3",
            Container::Ogg => "ogg",
            Container::Mp4 => "mp4",
            Container::Mkv => "mkv",
            Container::Aiff => "aiff",
        }
    }
}

/// Checks the fields of an MPEG audio frame header that are never all-ones or reserved, so
/// that random bytes starting with 0xFF 0xE? are not taken for MP3.
fn is_mpeg_audio_header(head: &[u8]) -> bool {
    if head.len() < 4 {
        return false;
    }
    let version = (head[1] >> 3) & 0b11; // 01 is reserved
    let layer = (head[1] >> 1) & 0b11; // 00 is reserved
    let bitrate = head[2] >> 4; // 1111 is invalid
    let sample_rate = (head[2] >> 2) & 0b11; // 11 is reserved
    version != 0b01 && layer != 0 && bitrate != 0b1111 && sample_rate != 0b11
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_common_containers() {
        assert_eq!(
            Container::sniff(b"RIFF\0\0\0\0WAVEfmt "),
            Some(Container::Wav)
        );
        assert_eq!(Container::sniff(b"fLaC\0\0\0\x22"), Some(Container::Flac));
        assert_eq!(Container::sniff(b"OggS\0\x02"), Some(Container::Ogg));
        assert_eq!(
            Container::sniff(b"ID3\x04\0\0\0\0\0\0"),
            Some(Container::Mp3)
        );
        assert_eq!(
            Container::sniff(&[0xFF, 0xFB, 0x90, 0x64]),
            Some(Container::Mp3)
        );
        assert_eq!(
            Container::sniff(b"\0\0\0\x20ftypM4A "),
            Some(Container::Mp4)
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Container::sniff(b"hello world, not audio"), None);
        assert_eq!(Container::sniff(&[0xFF, 0xFF, 0xFF, 0xFF]), None);
        assert_eq!(Container::sniff(b""), None);
    }

    #[test]
    fn validates_pcm_spec() {
        assert!(matches!(
            PcmSpec::new(SampleFormat::S16Le, 0, 1),
            Err(AudioError::InvalidSampleRate { got: 0, .. })
        ));
        assert!(matches!(
            PcmSpec::new(SampleFormat::F32Le, 16_000, 0),
            Err(AudioError::InvalidChannels { got: 0, .. })
        ));
        assert_eq!(
            PcmSpec::new(SampleFormat::F32Le, 48_000, 2)
                .unwrap()
                .frame_bytes(),
            8
        );
    }
}
