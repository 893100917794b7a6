//! `asr features --remote`: the same windows, computed by a feature service.

use std::io::Read;

use anyhow::{bail, Context};
use asr_proto::v1 as pb;
use pb::extract_request::Payload;
use pb::extract_response::Event;
use pb::feature_service_client::FeatureServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::features::{FeaturesArgs, FileFeatures, RawFormat};

/// Requests buffered while the file is read.
const REQUEST_BUFFER: usize = 8;

pub async fn extract_remote(addr: &str, args: &FeaturesArgs) -> anyhow::Result<FileFeatures> {
    let mut client = crate::net::connect(addr)
        .await
        .map(FeatureServiceClient::new)
        .with_context(|| format!("the feature service at {addr}"))?
        .max_decoding_message_size(64 * 1024 * 1024);
    let config = pb::ExtractConfig {
        format: Some(audio_format(args)),
        n_mels: args.n_mels,
        max_frames_per_message: 0,
    };
    let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
    tx.send(pb::ExtractRequest {
        payload: Some(Payload::Config(config)),
    })
    .await?;
    let path = args.file.clone();
    let chunk_bytes = args.chunk_bytes.max(1);
    // Read on a blocking thread; a closed channel (server gave up) ends the reading.
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut buf = vec![0u8; chunk_bytes];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let request = pb::ExtractRequest {
                payload: Some(Payload::Audio(buf[..n].to_vec())),
            };
            if tx.blocking_send(request).is_err() {
                return Ok(());
            }
        }
    });
    let mut responses = client.extract(ReceiverStream::new(rx)).await?.into_inner();
    let n_mels = args.n_mels as usize;
    let mut frames = Vec::new();
    let mut summary = None;
    while let Some(response) = responses.message().await? {
        match response.event {
            Some(Event::Info(info)) if info.n_mels as usize != n_mels => {
                bail!(
                    "server answered with {} mels, asked for {n_mels}",
                    info.n_mels
                );
            }
            Some(Event::Info(_)) | None => {}
            Some(Event::Frames(batch)) => {
                let expected = (frames.len() / n_mels) as u64;
                if batch.first_frame_index != expected
                    || batch.values.len() != batch.frame_count as usize * n_mels
                {
                    bail!(
                        "server sent frames out of order (first {} but expected {expected})",
                        batch.first_frame_index
                    );
                }
                frames.extend_from_slice(&batch.values);
            }
            Some(Event::Summary(s)) => summary = Some(s),
        }
    }
    reader.await??;
    let summary = summary.context("the stream ended without a summary")?;
    Ok(FileFeatures {
        n_mels,
        frames,
        windows: summary.window_count as usize,
        duration_seconds: summary.duration_seconds,
    })
}

fn audio_format(args: &FeaturesArgs) -> pb::AudioFormat {
    let format = match args.raw {
        None => pb::audio_format::Format::Encoded(pb::EncodedFormat::default()),
        Some(raw) => pb::audio_format::Format::RawPcm(pb::RawPcmFormat {
            sample_format: match raw {
                RawFormat::S16le => pb::SampleFormat::S16le,
                RawFormat::F32le => pb::SampleFormat::F32le,
            } as i32,
            sample_rate_hz: args.sample_rate,
            channels: args.channels,
            interleaved: None,
        }),
    };
    pb::AudioFormat {
        format: Some(format),
    }
}
