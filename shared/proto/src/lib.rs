//! Rust bindings of the `asr.v1` gRPC API defined in `proto/asr/v1/*.proto`:
//! message types (prost), `feature_service_{client,server}` and
//! `model_service_{client,server}` (tonic).
//!
//! The `.proto` files are the contract; their comments document units,
//! defaults, valid ranges and error codes.

/// Package `asr.v1`.
pub mod v1 {
    tonic::include_proto!("asr.v1");
}

/// Serialized `google.protobuf.FileDescriptorSet` of all `asr.v1` files (and
/// their imports), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/asr_v1_descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn descriptor_set_has_both_services() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<String> = set
            .file
            .iter()
            .filter(|f| f.package() == "asr.v1")
            .flat_map(|f| f.service.iter().map(|s| s.name().to_owned()))
            .collect();
        assert!(
            services.contains(&"FeatureService".to_owned()),
            "{services:?}"
        );
        assert!(
            services.contains(&"ModelService".to_owned()),
            "{services:?}"
        );
    }

    #[test]
    fn extract_request_round_trips() {
        use v1::extract_request::Payload;
        let req = v1::ExtractRequest {
            payload: Some(Payload::Config(v1::ExtractConfig {
                format: Some(v1::AudioFormat {
                    format: Some(v1::audio_format::Format::RawPcm(v1::RawPcmFormat {
                        sample_format: v1::SampleFormat::F32le as i32,
                        sample_rate_hz: 48_000,
                        channels: 2,
                        interleaved: None,
                    })),
                }),
                n_mels: 128,
                max_frames_per_message: 0,
            })),
        };
        let bytes = req.encode_to_vec();
        assert_eq!(v1::ExtractRequest::decode(bytes.as_slice()).unwrap(), req);
    }
}
