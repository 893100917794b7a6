//! A fake ModelService for the relay tests: GetModelInfo reports a scripted n_mels,
//! Transcribe records what it receives (config, frames) and answers with scripted events or
//! errors; IngestExamples records the config and examples and acks each in order (accepted,
//! or EMPTY_TEXT for a blank transcript, as the real one), or refuses the stream with a
//! scripted status; GetDataset reports what was stored. Every other RPC is UNIMPLEMENTED.
//!
//! How a Transcribe input ended is watched on the wire, below tonic ([`super::wire_watch`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use asr_proto::v1 as pb;
use bytes::Bytes;
use futures::Stream;
use pb::model_service_server::{ModelService, ModelServiceServer};
use pb::transcribe_frames_request::Payload;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

use super::wire_watch::WireWatch;
use tonic::{Code, Request, Response, Status, Streaming};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
type RpcResult<T> = Result<Response<T>, Status>;

/// What the fake answers.
#[derive(Default)]
pub struct Script {
    /// ModelInfo.n_mels (0 = unset).
    pub n_mels: u32,
    /// Transcribe: sent as soon as the config arrived.
    pub early: Vec<pb::TranscribeResponse>,
    /// Transcribe: sent once the input ended cleanly.
    pub late: Vec<pb::TranscribeResponse>,
    /// Transcribe: the status to end with after `late` (else OK).
    pub fail_after: Option<Status>,
    /// Transcribe: refuse the call with this status right after reading the config.
    pub reject: Option<Status>,
    /// IngestExamples: refuse the call with this status right after reading the config.
    pub ingest_reject: Option<Status>,
}

fn copy(status: &Status) -> Status {
    Status::with_details(
        status.code(),
        status.message(),
        Bytes::copy_from_slice(status.details()),
    )
}

impl Clone for Script {
    fn clone(&self) -> Self {
        Self {
            n_mels: self.n_mels,
            early: self.early.clone(),
            late: self.late.clone(),
            fail_after: self.fail_after.as_ref().map(copy),
            reject: self.reject.as_ref().map(copy),
            ingest_reject: self.ingest_reject.as_ref().map(copy),
        }
    }
}

/// How the last Transcribe call's request stream ended on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// END_STREAM: the input is complete.
    Complete,
    /// Reset (RST_STREAM) or broken, with the code tonic gives it (Cancelled for CANCEL).
    Failed(Code),
    /// A message a model service would reject (described).
    Unexpected(String),
}

/// What the fake received; Transcribe fields are those of the last call.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub model_info_calls: usize,
    pub traceparent: Option<String>,
    pub config: Option<pb::TranscribeFramesConfig>,
    pub frames: Vec<pb::MelFrames>,
    pub ending: Option<Ending>,
    /// IngestExamples: the config of the last call.
    pub ingest_config: Option<pb::IngestExamplesConfig>,
    /// IngestExamples: every example received, in order, over all calls.
    pub examples: Vec<pb::DatasetExample>,
    /// IngestExamples: examples accepted (stored), over all calls.
    pub stored: u64,
    /// IngestExamples: calls whose input ended cleanly.
    pub ingest_completed: usize,
    /// GetDataset: the names asked for.
    pub dataset_requests: Vec<String>,
}

#[derive(Clone)]
struct Fake {
    script: Arc<Script>,
    seen: Arc<Mutex<Seen>>,
}

impl Fake {
    fn record(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.seen.lock().expect("lock"));
    }
}

/// A running fake; stop it with [`FakeModel::stop`].
pub struct FakeModel {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Seen>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl FakeModel {
    pub async fn start_on(listener: TcpListener, script: Script) -> Self {
        let addr = listener.local_addr().expect("addr");
        let fake = Fake {
            script: Arc::new(script),
            seen: Arc::default(),
        };
        let seen = fake.seen.clone();
        let watch_seen = seen.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .layer(tower::layer::layer_fn(move |inner| {
                WireWatch::new(inner, watch_seen.clone())
            }))
            .add_service(ModelServiceServer::new(fake))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = rx.await;
            });
        let task = tokio::spawn(async move {
            server.await.expect("fake model service");
        });
        Self {
            addr,
            seen,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().expect("lock").clone()
    }

    /// Waits until the last Transcribe call's input ended, and returns what was seen.
    pub async fn wait_for_ending(&self) -> Seen {
        for _ in 0..1500 {
            let seen = self.seen();
            if seen.ending.is_some() {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "the fake model service's Transcribe input never ended: {:?}",
            self.seen()
        );
    }

    /// Stops the server (gracefully, then by force) and frees its port.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unimplemented<T>(rpc: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!("{rpc}: not in the fake")))
}

#[tonic::async_trait]
impl ModelService for Fake {
    type TranscribeStream = ResponseStream<pb::TranscribeResponse>;
    type IngestExamplesStream = ResponseStream<pb::IngestAck>;
    type WatchTrainingStream = ResponseStream<pb::TrainingEvent>;

    async fn transcribe(
        &self,
        request: Request<Streaming<pb::TranscribeFramesRequest>>,
    ) -> RpcResult<Self::TranscribeStream> {
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        // A new Transcribe call: its fields start afresh.
        self.record(|seen| {
            seen.traceparent = traceparent;
            seen.config = None;
            seen.frames.clear();
            seen.ending = None;
        });
        let mut inbound = request.into_inner();
        match inbound.message().await {
            Ok(Some(pb::TranscribeFramesRequest {
                payload: Some(Payload::Config(config)),
            })) => self.record(|seen| seen.config = Some(config)),
            other => {
                let what = format!("first message {other:?}");
                self.record(|seen| {
                    seen.ending.get_or_insert(Ending::Unexpected(what));
                });
                return Err(Status::invalid_argument("config must come first"));
            }
        }
        if let Some(status) = &self.script.reject {
            return Err(copy(status));
        }
        let (tx, rx) = mpsc::channel(16);
        for event in &self.script.early {
            let _ = tx.send(Ok(event.clone())).await;
        }
        let fake = self.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::TranscribeFramesRequest {
                        payload: Some(Payload::Frames(frames)),
                    })) => fake.record(|seen| seen.frames.push(frames)),
                    Ok(Some(other)) => {
                        let what = format!("{other:?}");
                        fake.record(|seen| {
                            seen.ending.get_or_insert(Ending::Unexpected(what));
                        });
                        return;
                    }
                    // The wire watch recorded how the input ended.
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            for event in &fake.script.late {
                if tx.send(Ok(event.clone())).await.is_err() {
                    return;
                }
            }
            if let Some(status) = &fake.script.fail_after {
                let _ = tx.send(Err(copy(status))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_model_info(
        &self,
        _: Request<pb::GetModelInfoRequest>,
    ) -> RpcResult<pb::ModelInfo> {
        self.record(|seen| seen.model_info_calls += 1);
        Ok(Response::new(pb::ModelInfo {
            model_name: "fake/whisper".into(),
            n_mels: self.script.n_mels,
            ..Default::default()
        }))
    }

    async fn ingest_examples(
        &self,
        request: Request<Streaming<pb::IngestExamplesRequest>>,
    ) -> RpcResult<Self::IngestExamplesStream> {
        use pb::ingest_examples_request::Payload as Ingest;
        let mut inbound = request.into_inner();
        let config = match inbound.message().await {
            Ok(Some(pb::IngestExamplesRequest {
                payload: Some(Ingest::Config(config)),
            })) => config,
            _ => return Err(Status::invalid_argument("config must come first")),
        };
        self.record(|seen| seen.ingest_config = Some(config.clone()));
        if let Some(status) = &self.script.ingest_reject {
            return Err(copy(status));
        }
        let (tx, rx) = mpsc::channel(4);
        let fake = self.clone();
        tokio::spawn(async move {
            loop {
                let example = match inbound.message().await {
                    Ok(Some(pb::IngestExamplesRequest {
                        payload: Some(Ingest::Example(example)),
                    })) => example,
                    Ok(None) => break,
                    Ok(Some(_)) => {
                        let _ = tx
                            .send(Err(Status::invalid_argument("config sent twice")))
                            .await;
                        return;
                    }
                    Err(_) => return,
                };
                let split = [&example.split, &config.split]
                    .into_iter()
                    .find(|s| !s.is_empty())
                    .cloned()
                    .unwrap_or_else(|| "train".into());
                let mut ack = pb::IngestAck {
                    example_id: example.id.clone(),
                    split,
                    ..Default::default()
                };
                fake.record(|seen| {
                    if example.text.trim().is_empty() {
                        ack.status = pb::ExampleStatus::Rejected as i32;
                        ack.rejection = pb::RejectionReason::EmptyText as i32;
                        ack.message = "empty transcript".into();
                    } else {
                        ack.status = pb::ExampleStatus::Accepted as i32;
                        ack.index = seen.stored;
                        seen.stored += 1;
                    }
                    seen.examples.push(example);
                });
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
            fake.record(|seen| seen.ingest_completed += 1);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_datasets(
        &self,
        _: Request<pb::ListDatasetsRequest>,
    ) -> RpcResult<pb::ListDatasetsResponse> {
        unimplemented("ListDatasets")
    }

    async fn get_dataset(&self, request: Request<pb::GetDatasetRequest>) -> RpcResult<pb::Dataset> {
        let name = request.into_inner().name;
        let seen = self.seen.lock().expect("lock").clone();
        self.record(|seen| seen.dataset_requests.push(name.clone()));
        let config = seen.ingest_config.unwrap_or_default();
        Ok(Response::new(pb::Dataset {
            name,
            description: config.description,
            language: config.language,
            n_mels: config.n_mels,
            example_count: seen.stored,
            ..Default::default()
        }))
    }

    async fn delete_dataset(
        &self,
        _: Request<pb::DeleteDatasetRequest>,
    ) -> RpcResult<pb::DeleteDatasetResponse> {
        unimplemented("DeleteDataset")
    }

    async fn start_training(
        &self,
        _: Request<pb::StartTrainingRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        unimplemented("StartTraining")
    }

    async fn watch_training(
        &self,
        _: Request<pb::WatchTrainingRequest>,
    ) -> RpcResult<Self::WatchTrainingStream> {
        unimplemented("WatchTraining")
    }

    async fn list_training_jobs(
        &self,
        _: Request<pb::ListTrainingJobsRequest>,
    ) -> RpcResult<pb::ListTrainingJobsResponse> {
        unimplemented("ListTrainingJobs")
    }

    async fn get_training_job(
        &self,
        _: Request<pb::GetTrainingJobRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        unimplemented("GetTrainingJob")
    }

    async fn cancel_training(
        &self,
        _: Request<pb::CancelTrainingRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        unimplemented("CancelTraining")
    }

    async fn list_adapters(
        &self,
        _: Request<pb::ListAdaptersRequest>,
    ) -> RpcResult<pb::ListAdaptersResponse> {
        unimplemented("ListAdapters")
    }

    async fn get_adapter(&self, _: Request<pb::GetAdapterRequest>) -> RpcResult<pb::AdapterInfo> {
        unimplemented("GetAdapter")
    }

    async fn load_adapter(&self, _: Request<pb::LoadAdapterRequest>) -> RpcResult<pb::AdapterInfo> {
        unimplemented("LoadAdapter")
    }

    async fn unload_adapter(
        &self,
        _: Request<pb::UnloadAdapterRequest>,
    ) -> RpcResult<pb::AdapterInfo> {
        unimplemented("UnloadAdapter")
    }

    async fn delete_adapter(
        &self,
        _: Request<pb::DeleteAdapterRequest>,
    ) -> RpcResult<pb::DeleteAdapterResponse> {
        unimplemented("DeleteAdapter")
    }

    async fn merge_adapters(
        &self,
        _: Request<pb::MergeAdaptersRequest>,
    ) -> RpcResult<pb::AdapterInfo> {
        unimplemented("MergeAdapters")
    }
}
