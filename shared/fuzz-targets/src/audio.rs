//! The audio library's stages one at a time: container decoding, raw PCM parsing,
//! resampling and log-mel extraction.

use std::io::Cursor;

use asr_audio::decode::EncodedDecoder;
use asr_audio::format::{MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE};
use asr_audio::pcm::PcmParser;
use asr_audio::resample::Resampler16k;
use asr_audio::{
    normalize_window, windows_from_frames, Container, LogMelExtractor, MelConfig, PcmSpec,
    SampleFormat, WINDOW_FRAMES,
};

use crate::input::{chunks, f32s, Input};

/// Decoded samples after which the container target stops: a few minutes of stereo audio,
/// enough to reach every packet of any corpus file while keeping one run bounded.
const MAX_DECODED_SAMPLES: usize = 8_000_000;

const CONTAINERS: [Container; 7] = [
    Container::Wav,
    Container::Flac,
    Container::Mp3,
    Container::Ogg,
    Container::Mp4,
    Container::Mkv,
    Container::Aiff,
];

/// Sample rates at and around the edges of what is accepted, and common ones.
const RATES: [u32; 16] = [
    0,
    1,
    MIN_SAMPLE_RATE - 1,
    MIN_SAMPLE_RATE,
    8_000,
    11_025,
    16_000,
    22_050,
    32_000,
    44_100,
    48_000,
    96_000,
    192_000,
    MAX_SAMPLE_RATE,
    MAX_SAMPLE_RATE + 1,
    u32::MAX,
];

/// `Container::sniff` on the head, then symphonia on the whole input, every packet decoded.
pub fn audio_container(data: &[u8]) {
    let head = &data[..data.len().min(Container::SNIFF_LEN)];
    // Unrecognised bytes are refused before decoding in the service; here they still go to
    // the decoder under some hint, since symphonia probes by content anyway.
    let container = Container::sniff(head)
        .unwrap_or(CONTAINERS[usize::from(data.first().copied().unwrap_or(0)) % 7]);
    let Ok(mut decoder) = EncodedDecoder::open(Cursor::new(data.to_vec()), container) else {
        return;
    };
    let mut total = 0;
    let mut out = Vec::new();
    while total < MAX_DECODED_SAMPLES {
        out.clear();
        match decoder.next_packet(&mut out) {
            Ok(Some(channels)) => {
                assert!(channels > 0, "a decoded packet has no channels");
                total += out.len();
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// A raw PCM spec chosen by the first bytes (invalid ones included: the constructor must
/// refuse exactly those), then the rest parsed in chunks.
pub fn audio_pcm(data: &[u8]) {
    let mut input = Input::new(data);
    let format = if input.u8() & 1 == 0 {
        SampleFormat::S16Le
    } else {
        SampleFormat::F32Le
    };
    let rate = input.pick_or_any(&RATES);
    let channels = input.pick_or_any(&[0, 1, 2, 3, 6, MAX_CHANNELS, MAX_CHANNELS + 1]);
    let sizes = input.chunk_sizes();
    let bytes = input.rest();
    let valid = (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate)
        && (1..=MAX_CHANNELS).contains(&channels);
    let spec = match PcmSpec::new(format, rate, channels) {
        Ok(spec) => spec,
        Err(_) => {
            assert!(
                !valid,
                "PcmSpec::new refused rate {rate}, {channels} channels"
            );
            return;
        }
    };
    assert!(
        valid,
        "PcmSpec::new accepted rate {rate}, {channels} channels"
    );
    let mut parser = PcmParser::new(spec);
    let mut out = Vec::new();
    let mut pushed = 0;
    for chunk in chunks(bytes, &sizes) {
        if parser.push(chunk, &mut out).is_err() {
            return;
        }
        pushed += chunk.len();
    }
    let whole = pushed / spec.frame_bytes();
    assert_eq!(
        out.len(),
        whole * channels as usize,
        "samples of whole frames"
    );
    let trailing = pushed % spec.frame_bytes();
    assert_eq!(
        parser.finish().is_err(),
        trailing != 0,
        "a partial frame is an error"
    );
}

/// The resampler at a rate chosen by the first bytes, fed arbitrary f32 bit patterns.
pub fn audio_resample(data: &[u8]) {
    let mut input = Input::new(data);
    let rate = input.pick_or_any(&RATES);
    let sizes = input.chunk_sizes();
    let samples = f32s(input.rest());
    let Ok(mut resampler) = Resampler16k::new(rate) else {
        return;
    };
    let mut out = Vec::new();
    for chunk in chunks(&samples, &sizes) {
        if resampler.push(chunk, &mut out).is_err() {
            return;
        }
    }
    if resampler.finish(&mut out).is_err() {
        return;
    }
    let expected = (samples.len() as u64 * 16_000).div_ceil(u64::from(rate));
    assert_eq!(out.len() as u64, expected, "ceil(n * 16000 / rate) samples");
}

/// The log-mel extractor on arbitrary samples, then Whisper's window normalisation on what
/// it emitted.
pub fn audio_mel(data: &[u8]) {
    let mut input = Input::new(data);
    let n_mels = if input.u8() & 1 == 0 { 80 } else { 128 };
    let sizes = input.chunk_sizes();
    let samples = f32s(input.rest());
    let Ok(config) = MelConfig::new(n_mels) else {
        unreachable!("80 and 128 are valid mel counts");
    };
    let mut extractor = LogMelExtractor::new(config);
    let mut frames = Vec::new();
    for chunk in chunks(&samples, &sizes) {
        extractor.push(chunk, &mut frames);
    }
    let Ok(end) = extractor.finish(&mut frames) else {
        assert!(samples.is_empty(), "finish fails only on an empty stream");
        return;
    };
    let n_mels = n_mels as usize;
    assert_eq!(frames.len() as u64, end.frames_emitted * n_mels as u64);
    let windows = windows_from_frames(&frames, n_mels, end.windows as usize);
    assert!(windows.iter().all(|w| w.len() == n_mels * WINDOW_FRAMES));
    let first = &frames[..frames.len().min(WINDOW_FRAMES * n_mels)];
    assert_eq!(
        normalize_window(first, n_mels).len(),
        n_mels * WINDOW_FRAMES
    );
}
