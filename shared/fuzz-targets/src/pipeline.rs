//! The whole feature path, as the feature service runs it on a client's bytes.

use std::io::Cursor;

use asr_audio::{
    AudioError, FeaturePipeline, InputFormat, MelConfig, PcmSpec, PipelineConfig, PipelineEvent,
    SampleFormat,
};

use crate::input::Input;

/// Audio seconds accepted: small, so that even 1 kHz PCM stays cheap, and so that the
/// TooLong path is reached by inputs of a few tens of kilobytes.
const MAX_AUDIO_SECONDS: f64 = 20.0;

/// `FeaturePipeline::run` on the input after its first byte, as a detected container (first
/// byte < 128) or as raw PCM whose spec the first bytes choose. Checks that the frames come
/// in order, whole, finite, and add up to the summary.
pub fn audio_pipeline(data: &[u8]) {
    let mut input = Input::new(data);
    let choice = input.u8();
    let n_mels = if choice & 1 == 0 { 80 } else { 128 };
    let format = if choice < 128 {
        InputFormat::Encoded
    } else {
        let sample_format = if choice & 2 == 0 {
            SampleFormat::S16Le
        } else {
            SampleFormat::F32Le
        };
        let rate = input.pick_or_any(&[8_000, 16_000, 22_050, 44_100, 48_000]);
        let channels = u32::from(input.u8() % 4);
        match PcmSpec::new(sample_format, rate, channels) {
            Ok(spec) => InputFormat::RawPcm(spec),
            Err(_) => return,
        }
    };
    let Ok(mel) = MelConfig::new(n_mels) else {
        unreachable!("80 and 128 are valid mel counts");
    };
    let pipeline = FeaturePipeline::new(PipelineConfig {
        mel,
        max_audio_seconds: MAX_AUDIO_SECONDS,
    });
    let n_mels = n_mels as usize;
    let mut next_frame = 0u64;
    let mut started = false;
    let sink = |event: PipelineEvent<'_>| -> Result<(), AudioError> {
        match event {
            PipelineEvent::Started(info) => {
                assert!(!started, "Started twice");
                assert_eq!(info.n_mels, n_mels);
                started = true;
            }
            PipelineEvent::Frames {
                first_frame,
                values,
            } => {
                assert!(started, "frames before Started");
                assert_eq!(first_frame, next_frame, "frames out of order");
                assert!(
                    !values.is_empty() && values.len() % n_mels == 0,
                    "whole frames"
                );
                if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                    panic!("non-finite log-mel value {bad} at frame {first_frame}..");
                }
                next_frame += (values.len() / n_mels) as u64;
            }
        }
        Ok(())
    };
    if let Ok(summary) = pipeline.run(Cursor::new(input.rest().to_vec()), format, sink) {
        assert_eq!(
            summary.frames_emitted, next_frame,
            "summary counts the frames sent"
        );
        assert!(summary.duration_seconds <= MAX_AUDIO_SECONDS * 1.01 + 1.0);
    }
}
