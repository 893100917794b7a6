//! The dataset RPCs: IngestExamples, ListDatasets, GetDataset, DeleteDataset.

use asr_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Streaming};

use super::{page_size, trim_page, ModelServer, ResponseStream, RpcResult, EVENTS_BUFFERED};
use crate::error::ModelError;
use crate::ingest::{self, IngestContext};
use crate::registry::validate_name;

/// IngestExamples: the config message checked, then each example stored and acknowledged.
pub(super) async fn ingest_examples(
    server: &ModelServer,
    request: Request<Streaming<pb::IngestExamplesRequest>>,
) -> RpcResult<ResponseStream<pb::IngestAck>> {
    let engine = server.engine()?;
    let model = engine.ready()?;
    let labels = server.labels.clone().ok_or(ModelError::NoModel)?;
    let context = IngestContext {
        store: server.datasets.clone(),
        model,
        labels: labels.clone(),
        ingesting: server.ingesting.clone(),
        max_dataset_examples: server.config.max_dataset_examples,
    };
    let deadline = asr_runtime::deadline::of(request.metadata());
    let mut inbound = request.into_inner();
    let (split, guard) = ingest::open(&context, &mut inbound).await?;
    let (acks, responses) = mpsc::channel(EVENTS_BUFFERED);
    tokio::spawn(ingest::run(labels, split, guard, inbound, acks));
    let stream: ResponseStream<pb::IngestAck> =
        asr_runtime::deadline::until(Box::pin(ReceiverStream::new(responses)), deadline);
    Ok(Response::new(stream))
}

/// ListDatasets: one page in name order.
pub(super) async fn list_datasets(
    server: &ModelServer,
    request: Request<pb::ListDatasetsRequest>,
) -> RpcResult<pb::ListDatasetsResponse> {
    let request = request.into_inner();
    let page_size = page_size(request.page_size);
    if !request.page_token.is_empty() {
        validate_name(&request.page_token, "page_token")?;
    }
    let store = server.datasets.clone();
    let token = request.page_token.clone();
    let mut datasets =
        tokio::task::spawn_blocking(move || -> Result<Vec<pb::Dataset>, ModelError> {
            store
                .names()?
                .into_iter()
                .filter(|n| token.is_empty() || *n > token)
                .take(page_size + 1)
                .map(|n| store.get(&n).map(|d| d.to_proto()))
                .collect()
        })
        .await
        .map_err(ModelError::internal)??;
    let next_page_token = trim_page(&mut datasets, page_size, |d| d.name.clone());
    Ok(Response::new(pb::ListDatasetsResponse {
        datasets,
        next_page_token,
    }))
}

/// GetDataset: the stored dataset's description.
pub(super) async fn get_dataset(
    server: &ModelServer,
    request: Request<pb::GetDatasetRequest>,
) -> RpcResult<pb::Dataset> {
    let name = request.into_inner().name;
    let store = server.datasets.clone();
    let dataset = tokio::task::spawn_blocking(move || store.get(&name))
        .await
        .map_err(ModelError::internal)??;
    Ok(Response::new(dataset.to_proto()))
}

/// DeleteDataset, refused while the dataset is being ingested or a job uses it.
pub(super) async fn delete_dataset(
    server: &ModelServer,
    request: Request<pb::DeleteDatasetRequest>,
) -> RpcResult<pb::DeleteDatasetResponse> {
    let name = request.into_inner().name;
    server.datasets.get(&name)?;
    if server.ingesting.is_active(&name) {
        return Err(
            ModelError::FailedPrecondition(format!("dataset {name:?} is being ingested")).into(),
        );
    }
    if server.jobs.as_ref().is_some_and(|j| j.uses_dataset(&name)) {
        return Err(ModelError::FailedPrecondition(format!(
            "dataset {name:?} is used by a queued or running training job"
        ))
        .into());
    }
    server.datasets.delete(&name)?;
    tracing::info!(dataset = %name, "dataset deleted");
    Ok(Response::new(pb::DeleteDatasetResponse {}))
}
