//! The whole feature path from one blocking `Read` source: bytes -> samples -> mono ->
//! 16 kHz -> raw log-mel frames. The result does not depend on how the source chunks its
//! bytes, so a gRPC stream and a file give bit-identical frames.

use std::io::{Cursor, Read};
use std::sync::Arc;

use crate::decode::EncodedDecoder;
use crate::format::{Container, InputFormat, PcmSpec};
use crate::mel::{LogMelExtractor, MelConfig, MelFilterBank};
use crate::pcm::{downmix, PcmParser};
use crate::resample::Resampler16k;
use crate::{AudioError, SAMPLE_RATE};

/// Limits and output shape of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineConfig {
    pub mel: MelConfig,
    /// Audio longer than this (in seconds of source audio) is refused with
    /// [`AudioError::TooLong`] as soon as it is seen.
    pub max_audio_seconds: f64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            mel: MelConfig::default(),
            max_audio_seconds: 4.0 * 3600.0,
        }
    }
}

/// What the input turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInfo {
    /// `None` for raw PCM.
    pub container: Option<Container>,
    /// Codec short name (`pcm_s16le`, `mp3`, `flac`, `vorbis`, ...).
    pub codec: String,
    pub source_sample_rate: u32,
    pub source_channels: u32,
    pub n_mels: usize,
}

/// Where the stream ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamSummary {
    /// 16 kHz mono samples.
    pub samples: u64,
    pub duration_seconds: f64,
    pub frames_emitted: u64,
    /// 30 s windows the audio occupies.
    pub windows: u64,
}

/// Events handed to the pipeline's sink, in order: one `Started`, then `Frames` as they are
/// complete.
#[derive(Debug)]
pub enum PipelineEvent<'a> {
    Started(StreamInfo),
    /// Raw log10 mel frames, frame-major, `n_mels` values each, starting at frame index
    /// `first_frame` of the stream.
    Frames {
        first_frame: u64,
        values: &'a [f32],
    },
}

/// Runs audio streams through the feature path; cheap to share between streams.
#[derive(Debug, Clone)]
pub struct FeaturePipeline {
    config: PipelineConfig,
    bank: Arc<MelFilterBank>,
}

const READ_CHUNK: usize = 64 * 1024;

impl FeaturePipeline {
    pub fn new(config: PipelineConfig) -> Self {
        Self {
            bank: Arc::new(MelFilterBank::new(config.mel)),
            config,
        }
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Reads `source` to its end, calling `sink` with the stream info and then with frames as
    /// soon as they are complete. A sink error (e.g. [`AudioError::Cancelled`]) stops the
    /// pipeline and is returned.
    pub fn run<R, S>(
        &self,
        mut source: R,
        format: InputFormat,
        mut sink: S,
    ) -> Result<StreamSummary, AudioError>
    where
        R: Read + Send + Sync + 'static,
        S: FnMut(PipelineEvent<'_>) -> Result<(), AudioError>,
    {
        let mut stage = Stages::new(self);
        match format {
            InputFormat::RawPcm(spec) => {
                sink(PipelineEvent::Started(self.info(
                    None,
                    pcm_codec_name(spec),
                    spec.sample_rate,
                    spec.channels,
                )))?;
                stage.start(spec.sample_rate, spec.channels)?;
                let mut parser = PcmParser::new(spec);
                let mut bytes = vec![0u8; READ_CHUNK];
                let mut samples = Vec::new();
                loop {
                    let n = read_some(&mut source, &mut bytes)?;
                    if n == 0 {
                        break;
                    }
                    samples.clear();
                    parser.push(&bytes[..n], &mut samples)?;
                    stage.push_interleaved(&samples, spec.channels, &mut sink)?;
                }
                parser.finish()?;
            }
            InputFormat::Encoded => {
                let mut head = Vec::with_capacity(Container::SNIFF_LEN);
                (&mut source)
                    .take(Container::SNIFF_LEN as u64)
                    .read_to_end(&mut head)?;
                if head.is_empty() {
                    return Err(AudioError::Empty);
                }
                let container = Container::sniff(&head)
                    .ok_or_else(|| AudioError::UnrecognisedContainer(hex_prefix(&head)))?;
                let mut decoder = EncodedDecoder::open(Cursor::new(head).chain(source), container)?;
                let mut samples = Vec::new();
                let mut started = false;
                loop {
                    samples.clear();
                    let Some(channels) = decoder.next_packet(&mut samples)? else {
                        break;
                    };
                    if !started {
                        let info = self.info(
                            Some(container),
                            decoder.codec().to_string(),
                            decoder.sample_rate(),
                            channels,
                        );
                        sink(PipelineEvent::Started(info))?;
                        stage.start(decoder.sample_rate(), channels)?;
                        started = true;
                    }
                    stage.push_interleaved(&samples, channels, &mut sink)?;
                }
                if !started {
                    return Err(AudioError::Empty);
                }
            }
        }
        stage.finish(&mut sink)
    }

    fn info(
        &self,
        container: Option<Container>,
        codec: String,
        rate: u32,
        channels: u32,
    ) -> StreamInfo {
        StreamInfo {
            container,
            codec,
            source_sample_rate: rate,
            source_channels: channels,
            n_mels: self.config.mel.n_mels,
        }
    }
}

/// Downmix -> resample -> mel, with the duration limit.
struct Stages {
    mel: LogMelExtractor,
    resampler: Option<Resampler16k>,
    source_rate: u32,
    max_source_frames: u64,
    source_frames: u64,
    max_seconds: f64,
    mono: Vec<f32>,
    resampled: Vec<f32>,
    frames: Vec<f32>,
}

impl Stages {
    fn new(pipeline: &FeaturePipeline) -> Self {
        Self {
            mel: LogMelExtractor::with_bank(pipeline.bank.clone()),
            resampler: None,
            source_rate: SAMPLE_RATE,
            max_source_frames: 0,
            source_frames: 0,
            max_seconds: pipeline.config.max_audio_seconds,
            mono: Vec::new(),
            resampled: Vec::new(),
            frames: Vec::new(),
        }
    }

    fn start(&mut self, source_rate: u32, channels: u32) -> Result<(), AudioError> {
        // Validates rate and channel count for decoded streams too.
        PcmSpec::new(crate::SampleFormat::F32Le, source_rate, channels)?;
        self.source_rate = source_rate;
        self.max_source_frames = (self.max_seconds * f64::from(source_rate)).floor() as u64;
        self.resampler = Some(Resampler16k::new(source_rate)?);
        Ok(())
    }

    fn push_interleaved<S>(
        &mut self,
        interleaved: &[f32],
        channels: u32,
        sink: &mut S,
    ) -> Result<(), AudioError>
    where
        S: FnMut(PipelineEvent<'_>) -> Result<(), AudioError>,
    {
        let frames = interleaved.len() as u64 / u64::from(channels);
        self.source_frames += frames;
        if self.source_frames > self.max_source_frames {
            return Err(AudioError::TooLong {
                limit_seconds: self.max_seconds,
            });
        }
        self.mono.clear();
        downmix(interleaved, channels as usize, &mut self.mono);
        self.resampled.clear();
        let resampler = self.resampler.as_mut().ok_or(AudioError::Empty)?;
        resampler.push(&self.mono, &mut self.resampled)?;
        self.emit_frames(sink)
    }

    fn emit_frames<S>(&mut self, sink: &mut S) -> Result<(), AudioError>
    where
        S: FnMut(PipelineEvent<'_>) -> Result<(), AudioError>,
    {
        let first_frame = self.mel.frames_emitted();
        self.frames.clear();
        if self.mel.push(&self.resampled, &mut self.frames) > 0 {
            sink(PipelineEvent::Frames {
                first_frame,
                values: &self.frames,
            })?;
        }
        Ok(())
    }

    fn finish<S>(mut self, sink: &mut S) -> Result<StreamSummary, AudioError>
    where
        S: FnMut(PipelineEvent<'_>) -> Result<(), AudioError>,
    {
        let resampler = self.resampler.as_mut().ok_or(AudioError::Empty)?;
        self.resampled.clear();
        resampler.finish(&mut self.resampled)?;
        self.emit_frames(sink)?;
        let first_frame = self.mel.frames_emitted();
        self.frames.clear();
        let end = self.mel.finish(&mut self.frames)?;
        if !self.frames.is_empty() {
            sink(PipelineEvent::Frames {
                first_frame,
                values: &self.frames,
            })?;
        }
        Ok(StreamSummary {
            samples: end.samples,
            duration_seconds: end.samples as f64 / f64::from(SAMPLE_RATE),
            frames_emitted: end.frames_emitted,
            windows: end.windows,
        })
    }
}

fn pcm_codec_name(spec: PcmSpec) -> String {
    match spec.sample_format {
        crate::SampleFormat::S16Le => "pcm_s16le".into(),
        crate::SampleFormat::F32Le => "pcm_f32le".into(),
    }
}

/// `read` that retries on `Interrupted`.
fn read_some<R: Read>(source: &mut R, buf: &mut [u8]) -> Result<usize, AudioError> {
    loop {
        match source.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(AudioError::Io(e)),
        }
    }
}

fn hex_prefix(head: &[u8]) -> String {
    let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("starts with {}", hex.join(" "))
}

/// Convenience for callers that hold the whole input: runs the pipeline and collects every
/// frame. Returns the info, the frames (frame-major) and the summary.
pub fn extract_all(
    pipeline: &FeaturePipeline,
    source: impl Read + Send + Sync + 'static,
    format: InputFormat,
) -> Result<(StreamInfo, Vec<f32>, StreamSummary), AudioError> {
    let mut info = None;
    let mut frames = Vec::new();
    let summary = pipeline.run(source, format, |event| {
        match event {
            PipelineEvent::Started(i) => info = Some(i),
            PipelineEvent::Frames { values, .. } => frames.extend_from_slice(values),
        }
        Ok(())
    })?;
    let info = info.ok_or(AudioError::Empty)?;
    Ok((info, frames, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::SampleFormat;

    fn pcm_bytes(samples: &[f32]) -> Vec<u8> {
        samples
            .iter()
            .flat_map(|v| ((v * 32767.0) as i16).to_le_bytes())
            .collect()
    }

    #[test]
    fn raw_pcm_end_to_end() {
        let samples: Vec<f32> = (0..16_000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let spec = PcmSpec::new(SampleFormat::S16Le, 16_000, 1).unwrap();
        let pipeline = FeaturePipeline::new(PipelineConfig::default());
        let (info, frames, summary) = extract_all(
            &pipeline,
            Cursor::new(pcm_bytes(&samples)),
            InputFormat::RawPcm(spec),
        )
        .unwrap();
        assert_eq!(info.codec, "pcm_s16le");
        assert_eq!(summary.samples, 16_000);
        assert_eq!(summary.frames_emitted, 102);
        assert_eq!(frames.len(), 102 * 80);
    }

    #[test]
    fn too_long_is_refused() {
        let spec = PcmSpec::new(SampleFormat::S16Le, 16_000, 1).unwrap();
        let config = PipelineConfig {
            max_audio_seconds: 0.5,
            ..Default::default()
        };
        let pipeline = FeaturePipeline::new(config);
        let result = extract_all(
            &pipeline,
            Cursor::new(vec![0u8; 32_002]),
            InputFormat::RawPcm(spec),
        );
        assert!(
            matches!(result, Err(AudioError::TooLong { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn garbage_is_unrecognised() {
        let pipeline = FeaturePipeline::new(PipelineConfig::default());
        let result = extract_all(
            &pipeline,
            Cursor::new(b"this is not audio at all".to_vec()),
            InputFormat::Encoded,
        );
        assert!(
            matches!(result, Err(AudioError::UnrecognisedContainer(_))),
            "{result:?}"
        );
    }

    #[test]
    fn empty_input_is_refused() {
        let pipeline = FeaturePipeline::new(PipelineConfig::default());
        let spec = PcmSpec::new(SampleFormat::F32Le, 16_000, 1).unwrap();
        assert!(matches!(
            extract_all(
                &pipeline,
                Cursor::new(Vec::new()),
                InputFormat::RawPcm(spec)
            ),
            Err(AudioError::Empty)
        ));
        assert!(matches!(
            extract_all(&pipeline, Cursor::new(Vec::new()), InputFormat::Encoded),
            Err(AudioError::Empty)
        ));
    }
}
