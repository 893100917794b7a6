//! Encoded containers (wav, flac, mp3, ogg/vorbis, mp4/aac, ...) to interleaved `f32` samples
//! with symphonia, pulling from any blocking `Read` source.

use std::io::Read;

use symphonia::core::codecs::audio::{AudioDecoder, AudioDecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSourceStream, ReadOnlySource};
use symphonia::core::meta::MetadataOptions;

use crate::format::Container;
use crate::AudioError;

/// An opened audio track, decoded packet by packet.
pub struct EncodedDecoder {
    format: Box<dyn FormatReader>,
    decoder: Box<dyn AudioDecoder>,
    track_id: u32,
    sample_rate: u32,
    channels: u32,
    codec: &'static str,
    /// Frames the container announced (wav data size, flac STREAMINFO), if any.
    announced_frames: Option<u64>,
    decoded_frames: u64,
    packet_buf: Vec<f32>,
}

impl EncodedDecoder {
    /// Probes `source` (already identified as `container`) and opens its first audio track.
    pub fn open<R: Read + Send + Sync + 'static>(
        source: R,
        container: Container,
    ) -> Result<Self, AudioError> {
        let stream =
            MediaSourceStream::new(Box::new(ReadOnlySource::new(source)), Default::default());
        let mut hint = Hint::new();
        hint.with_extension(container.name());
        let format = symphonia::default::get_probe()
            .probe(
                &hint,
                stream,
                FormatOptions::default(),
                MetadataOptions::default(),
            )
            .map_err(|e| match e {
                SymphoniaError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                    AudioError::Decode(format!(
                        "{} stream ends before its first audio packet",
                        container.name()
                    ))
                }
                other => AudioError::NoAudioTrack(format!(
                    "{} container could not be read: {other}",
                    container.name()
                )),
            })?;
        let track = format.default_track(TrackType::Audio).ok_or_else(|| {
            AudioError::NoAudioTrack(format!("{} container has no audio track", container.name()))
        })?;
        let params = track
            .codec_params
            .as_ref()
            .and_then(|p| p.audio())
            .ok_or_else(|| {
                AudioError::NoAudioTrack("audio track has no codec parameters".into())
            })?;
        let decoder = symphonia::default::get_codecs()
            .make_audio_decoder(params, &AudioDecoderOptions::default())
            .map_err(|e| AudioError::NoAudioTrack(format!("unsupported codec: {e}")))?;
        let sample_rate = params
            .sample_rate
            .ok_or_else(|| AudioError::NoAudioTrack("audio track has no sample rate".into()))?;
        let channels = params.channels.as_ref().map_or(0, |c| c.count() as u32);
        let codec = decoder.codec_info().short_name;
        let track_id = track.id;
        let announced_frames = track.num_frames;
        Ok(Self {
            format,
            decoder,
            track_id,
            sample_rate,
            channels,
            codec,
            announced_frames,
            decoded_frames: 0,
            packet_buf: Vec::new(),
        })
    }

    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Channel count from the codec parameters (0 when the container does not say; the first
    /// decoded packet then tells).
    pub fn channels(&self) -> u32 {
        self.channels
    }

    pub fn codec(&self) -> &'static str {
        self.codec
    }

    /// Decodes the next packet of the track, appending interleaved samples to `out`. Returns
    /// the packet's channel count, or `None` at the end of the stream.
    pub fn next_packet(&mut self, out: &mut Vec<f32>) -> Result<Option<u32>, AudioError> {
        loop {
            let packet = match self.format.next_packet() {
                Ok(Some(packet)) => packet,
                Ok(None) => return self.check_complete().map(|()| None),
                Err(SymphoniaError::IoError(e))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    if self.announced_frames.is_none() && self.decoded_frames > 0 {
                        // Formats without a length (mp3, ogg) end at EOF; a cut inside the last
                        // packet loses only that packet.
                        return Ok(None);
                    }
                    return Err(self.truncated());
                }
                Err(SymphoniaError::IoError(e)) => return Err(AudioError::Io(e)),
                Err(e) => {
                    return Err(AudioError::Decode(format!(
                        "{} stream is corrupt after {} frames: {e}",
                        self.codec, self.decoded_frames
                    )))
                }
            };
            if packet.track_id != self.track_id {
                continue;
            }
            let decoded = self.decoder.decode(&packet).map_err(|e| {
                AudioError::Decode(format!(
                    "{} packet after {} frames could not be decoded: {e}",
                    self.codec, self.decoded_frames
                ))
            })?;
            let channels = decoded.spec().channels().count() as u32;
            if channels == 0 {
                return Err(AudioError::Decode("decoded packet has no channels".into()));
            }
            decoded.copy_to_vec_interleaved(&mut self.packet_buf);
            // Float codecs (wav, aiff) carry NaN and inf as they are: refused as for raw PCM.
            if let Some(pos) = self.packet_buf.iter().position(|v| !v.is_finite()) {
                return Err(AudioError::Decode(format!(
                    "{} sample {} is not finite ({})",
                    self.codec,
                    self.decoded_frames * u64::from(channels) + pos as u64,
                    self.packet_buf[pos]
                )));
            }
            self.decoded_frames += decoded.frames() as u64;
            out.extend_from_slice(&self.packet_buf);
            return Ok(Some(channels));
        }
    }

    fn check_complete(&self) -> Result<(), AudioError> {
        match self.announced_frames {
            Some(expected) if self.decoded_frames < expected => Err(self.truncated()),
            _ => Ok(()),
        }
    }

    fn truncated(&self) -> AudioError {
        let expected = self
            .announced_frames
            .map_or_else(String::new, |n| format!(" of the {n} the header announces"));
        AudioError::Decode(format!(
            "{} stream is truncated: it ends after {} frames{expected}",
            self.codec, self.decoded_frames
        ))
    }
}
