//! FeatureService requests: the bytes decoded as each request message, then every
//! proto -> domain conversion the service runs on it (services/feature-service/src/convert.rs
//! and the Ingest config check).

use asr_proto::v1 as pb;
use feature_service::convert::{input_format, ByteLayout, ExtractSpec};
use feature_service::{FeatureError, FeatureServiceConfig};
use prost::Message;

/// Planar layouts an audio message may meet (a config chooses one; here every audio
/// payload is tried against each).
const LAYOUTS: [ByteLayout; 4] = [
    ByteLayout::AsIs,
    ByteLayout::PlanarPerMessage {
        channels: 2,
        bytes_per_sample: 2,
    },
    ByteLayout::PlanarPerMessage {
        channels: 3,
        bytes_per_sample: 4,
    },
    ByteLayout::PlanarPerMessage {
        channels: 32,
        bytes_per_sample: 4,
    },
];

pub fn feature_requests(data: &[u8]) {
    let service = FeatureServiceConfig::default();
    if let Ok(request) = pb::ExtractRequest::decode(data) {
        use pb::extract_request::Payload;
        match request.payload {
            Some(Payload::Config(config)) => {
                if let Ok(spec) = checked(ExtractSpec::from_proto(config, &service)) {
                    assert!((1..=asr_audio::WINDOW_FRAMES).contains(&spec.frames_per_message));
                }
            }
            Some(Payload::Audio(bytes)) => audio(bytes),
            None => {}
        }
    }
    if let Ok(request) = pb::TranscribeAudioRequest::decode(data) {
        use pb::transcribe_audio_request::Payload;
        match request.payload {
            Some(Payload::Config(config)) => {
                let _ = checked(input_format(config.format));
            }
            Some(Payload::Audio(bytes)) => audio(bytes),
            None => {}
        }
    }
    if let Ok(request) = pb::IngestAudioRequest::decode(data) {
        use pb::ingest_audio_request::Payload;
        match request.payload {
            Some(Payload::Config(config)) => {
                let _ = checked(feature_service::ingest_default_format(
                    config.default_format,
                ));
            }
            // As ingest_examples.rs does: a format without a format set is unset.
            Some(Payload::Example(header)) => {
                if let Some(format) = header.format.filter(|f| f.format.is_some()) {
                    let _ = checked(input_format(Some(format)));
                }
            }
            Some(Payload::Audio(bytes)) => audio(bytes),
            None => {}
        }
    }
    let _ = pb::GetInfoRequest::decode(data);
}

/// An audio payload rearranged by every layout; a planar result keeps its length.
fn audio(bytes: Vec<u8>) {
    for layout in LAYOUTS {
        if let Ok(interleaved) = checked(layout.to_interleaved(bytes.clone())) {
            assert_eq!(interleaved.len(), bytes.len());
        }
    }
}

/// Errors also go through their mapping to a gRPC status, as the service sends them.
fn checked<T>(result: Result<T, FeatureError>) -> Result<T, ()> {
    result.map_err(|err| {
        let _ = tonic::Status::from(err);
    })
}
