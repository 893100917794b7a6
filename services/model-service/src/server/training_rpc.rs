//! The training-job RPCs: StartTraining, WatchTraining, ListTrainingJobs, GetTrainingJob,
//! CancelTraining.

use asr_proto::v1 as pb;
use tonic::{Request, Response};

use super::{page_size, ModelServer, ResponseStream, RpcResult};
use crate::error::ModelError;
use crate::training::{check_inputs, JobSpec};

/// StartTraining: the request checked against the model, datasets and registry, then queued.
pub(super) async fn start_training(
    server: &ModelServer,
    request: Request<pb::StartTrainingRequest>,
) -> RpcResult<pb::TrainingJob> {
    let jobs = server.jobs.as_ref().ok_or(ModelError::NoModel)?;
    let request = request.into_inner();
    let spec = JobSpec::from_request(&request)?;
    let model = server.engine()?.ready()?;
    check_inputs(&spec, &server.datasets, model.n_mels)?;
    if !spec.language.is_empty() && !model.languages.contains(&spec.language) {
        return Err(ModelError::invalid(
            "hyperparameters.language",
            format!("{:?} is not a language this model knows", spec.language),
        )
        .into());
    }
    spec.mixed_precision(server.device)?;
    if server.registry.exists(&spec.output_adapter) {
        return Err(ModelError::AlreadyExists {
            what: "adapter",
            name: spec.output_adapter.clone(),
        }
        .into());
    }
    let job = jobs.start(request)?;
    tracing::info!(job = %job.id, "training job queued");
    Ok(Response::new(job))
}

/// WatchTraining: the job's events from `from_event_index`, until the deadline.
pub(super) async fn watch_training(
    server: &ModelServer,
    request: Request<pb::WatchTrainingRequest>,
) -> RpcResult<ResponseStream<pb::TrainingEvent>> {
    let jobs = server.jobs.as_ref().ok_or(ModelError::NoModel)?;
    let deadline = asr_runtime::deadline::of(request.metadata());
    let request = request.into_inner();
    let stream: ResponseStream<pb::TrainingEvent> = asr_runtime::deadline::until(
        Box::pin(jobs.watch(&request.job_id, request.from_event_index)?),
        deadline,
    );
    Ok(Response::new(stream))
}

/// ListTrainingJobs: one page, optionally filtered by state.
pub(super) async fn list_training_jobs(
    server: &ModelServer,
    request: Request<pb::ListTrainingJobsRequest>,
) -> RpcResult<pb::ListTrainingJobsResponse> {
    let request = request.into_inner();
    let Some(jobs) = &server.jobs else {
        return Ok(Response::new(pb::ListTrainingJobsResponse::default()));
    };
    let page_size = page_size(request.page_size);
    let all = jobs.list(&request.states)?;
    let start = if request.page_token.is_empty() {
        0
    } else {
        all.iter()
            .position(|j| j.id == request.page_token)
            .map(|i| i + 1)
            .ok_or_else(|| ModelError::invalid("page_token", "not a job id of this listing"))?
    };
    let page: Vec<pb::TrainingJob> = all.iter().skip(start).take(page_size).cloned().collect();
    let next_page_token = if start + page.len() < all.len() {
        page.last().map(|j| j.id.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok(Response::new(pb::ListTrainingJobsResponse {
        jobs: page,
        next_page_token,
    }))
}

/// GetTrainingJob.
pub(super) async fn get_training_job(
    server: &ModelServer,
    request: Request<pb::GetTrainingJobRequest>,
) -> RpcResult<pb::TrainingJob> {
    let jobs = server.jobs.as_ref().ok_or(ModelError::NoModel)?;
    Ok(Response::new(jobs.get(&request.into_inner().job_id)?))
}

/// CancelTraining.
pub(super) async fn cancel_training(
    server: &ModelServer,
    request: Request<pb::CancelTrainingRequest>,
) -> RpcResult<pb::TrainingJob> {
    let jobs = server.jobs.as_ref().ok_or(ModelError::NoModel)?;
    let id = request.into_inner().job_id;
    let job = jobs.cancel(&id)?;
    tracing::info!(job = %id, "training job cancelled");
    Ok(Response::new(job))
}
