//! Training jobs: persisted under `<data_root>/jobs/<id>/` (`job.json` with state and
//! progress, `request.pb` as sent, `events.pb` the length-delimited event log, `output/` the
//! trainer's checkpoints), queued on a bounded queue and run one at a time by the runner
//! thread. Jobs that were queued or running when the service stopped are queued again when
//! it starts, and a running one resumes from its last checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use asr_proto::v1 as pb;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::error::ModelError;
use crate::store::{now, timestamp, write_synced};
use crate::training::spec::JobSpec;

const RECORD_FILE: &str = "job.json";
const REQUEST_FILE: &str = "request.pb";
const EVENTS_FILE: &str = "events.pb";

/// What `job.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// A `pb::TrainingJobState` value.
    pub state: i32,
    pub created: i64,
    pub updated: i64,
    pub started: Option<i64>,
    pub finished: Option<i64>,
    pub error: String,
    pub adapter: String,
    pub global_step: u64,
    pub max_steps: u64,
    pub epoch: f32,
    pub latest_loss: Option<f32>,
    pub best_metric: Option<f32>,
    pub best_checkpoint: String,
}

impl JobRecord {
    pub fn state(&self) -> pb::TrainingJobState {
        pb::TrainingJobState::try_from(self.state).unwrap_or(pb::TrainingJobState::Unspecified)
    }

    fn is_final(&self) -> bool {
        matches!(
            self.state(),
            pb::TrainingJobState::Succeeded
                | pb::TrainingJobState::Failed
                | pb::TrainingJobState::Cancelled
        )
    }
}

struct JobEntry {
    record: JobRecord,
    request: pb::StartTrainingRequest,
    events: Vec<pb::TrainingEvent>,
    stop: Arc<AtomicBool>,
    /// Event count, for watchers.
    notify: watch::Sender<usize>,
}

/// The job table; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    root: PathBuf,
    table: Arc<Mutex<HashMap<String, JobEntry>>>,
    queue: mpsc::Sender<String>,
    queue_capacity: usize,
}

impl Jobs {
    /// Opens the job store; returns the table and the receiver of job ids to run (jobs left
    /// queued or running by an earlier process are on it already, oldest first).
    pub fn open(
        data_root: &Path,
        queue_capacity: usize,
    ) -> Result<(Self, mpsc::Receiver<String>), ModelError> {
        let root = data_root.join("jobs");
        std::fs::create_dir_all(&root)
            .map_err(|e| ModelError::Config(format!("cannot create {}: {e}", root.display())))?;
        let mut table = HashMap::new();
        let mut pending = Vec::new();
        for entry in std::fs::read_dir(&root)
            .map_err(ModelError::internal)?
            .flatten()
        {
            let dir = entry.path();
            match load_job(&dir) {
                Ok((mut record, request, events)) => {
                    if !record.is_final() {
                        record.state = pb::TrainingJobState::Queued as i32;
                        pending.push((record.created, record.id.clone()));
                    }
                    let (notify, _) = watch::channel(events.len());
                    table.insert(
                        record.id.clone(),
                        JobEntry {
                            record,
                            request,
                            events,
                            stop: Arc::default(),
                            notify,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "skipping an unreadable job")
                }
            }
        }
        pending.sort();
        let (queue, receiver) = mpsc::channel(queue_capacity.max(pending.len()).max(1));
        for (_, id) in pending {
            tracing::info!(job = %id, "job queued again after a restart");
            let _ = queue.try_send(id);
        }
        Ok((
            Self {
                root,
                table: Arc::new(Mutex::new(table)),
                queue,
                queue_capacity,
            },
            receiver,
        ))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, JobEntry>>, ModelError> {
        self.table
            .lock()
            .map_err(|_| ModelError::Internal("job table poisoned".into()))
    }

    pub fn dir_of(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Queues a validated job (or returns the job an earlier request with the same
    /// request_id created).
    pub fn start(&self, request: pb::StartTrainingRequest) -> Result<pb::TrainingJob, ModelError> {
        let mut table = self.lock()?;
        if !request.request_id.is_empty() {
            if let Some(entry) = table
                .values()
                .find(|e| e.request.request_id == request.request_id)
            {
                return Ok(to_proto(entry));
            }
        }
        let output = &request.output_adapter;
        if table.values().any(|e| {
            &e.request.output_adapter == output
                && !matches!(
                    e.record.state(),
                    pb::TrainingJobState::Failed | pb::TrainingJobState::Cancelled
                )
        }) {
            return Err(ModelError::AlreadyExists {
                what: "output adapter of a training job",
                name: output.clone(),
            });
        }
        let queued = table
            .values()
            .filter(|e| e.record.state() == pb::TrainingJobState::Queued)
            .count();
        if queued >= self.queue_capacity {
            return Err(ModelError::LimitReached {
                limit: "training job queue",
                value: self.queue_capacity.to_string(),
                hint: "wait for queued jobs to finish",
            });
        }
        let created = now();
        let mut id = format!("job-{created}");
        let mut n = 1;
        while table.contains_key(&id) || self.dir_of(&id).exists() {
            n += 1;
            id = format!("job-{created}-{n}");
        }
        let record = JobRecord {
            id: id.clone(),
            state: pb::TrainingJobState::Queued as i32,
            created,
            updated: created,
            ..Default::default()
        };
        let dir = self.dir_of(&id);
        std::fs::create_dir_all(&dir).map_err(ModelError::internal)?;
        write_synced(&dir.join(REQUEST_FILE), &request.encode_to_vec())?;
        write_record(&dir, &record)?;
        let (notify, _) = watch::channel(0);
        let entry = JobEntry {
            record,
            request,
            events: Vec::new(),
            stop: Arc::default(),
            notify,
        };
        let job = to_proto(&entry);
        table.insert(id.clone(), entry);
        drop(table);
        self.queue
            .try_send(id)
            .map_err(|_| ModelError::LimitReached {
                limit: "training job queue",
                value: self.queue_capacity.to_string(),
                hint: "wait for queued jobs to finish",
            })?;
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Result<pb::TrainingJob, ModelError> {
        let table = self.lock()?;
        table.get(id).map(to_proto).ok_or_else(|| not_found(id))
    }

    /// The job's request, spec and stop flag, for the runner.
    pub fn for_run(&self, id: &str) -> Result<(JobRecord, JobSpec, Arc<AtomicBool>), ModelError> {
        let table = self.lock()?;
        let entry = table.get(id).ok_or_else(|| not_found(id))?;
        Ok((
            entry.record.clone(),
            JobSpec::from_request(&entry.request)?,
            entry.stop.clone(),
        ))
    }

    /// Jobs newest first, optionally only in `states`.
    pub fn list(&self, states: &[i32]) -> Result<Vec<pb::TrainingJob>, ModelError> {
        let table = self.lock()?;
        let mut jobs: Vec<&JobEntry> = table
            .values()
            .filter(|e| states.is_empty() || states.contains(&e.record.state))
            .collect();
        jobs.sort_by(|a, b| {
            (b.record.created, &b.record.id).cmp(&(a.record.created, &a.record.id))
        });
        Ok(jobs.into_iter().map(to_proto).collect())
    }

    /// Whether a queued or running job reads `dataset`.
    pub fn uses_dataset(&self, dataset: &str) -> bool {
        self.lock().is_ok_and(|table| {
            table.values().any(|e| {
                matches!(
                    e.record.state(),
                    pb::TrainingJobState::Queued | pb::TrainingJobState::Running
                ) && (e
                    .request
                    .train_dataset
                    .as_ref()
                    .is_some_and(|d| d.dataset == dataset)
                    || e.request
                        .eval_dataset
                        .as_ref()
                        .is_some_and(|d| d.dataset == dataset))
            })
        })
    }

    /// Cancels a queued job at once, a running one at its next step.
    pub fn cancel(&self, id: &str) -> Result<pb::TrainingJob, ModelError> {
        let state = {
            let table = self.lock()?;
            let entry = table.get(id).ok_or_else(|| not_found(id))?;
            entry.record.state()
        };
        match state {
            pb::TrainingJobState::Queued => {
                self.update(id, |r| {
                    r.state = pb::TrainingJobState::Cancelled as i32;
                    r.finished = Some(now());
                })?;
                self.push_event(
                    id,
                    pb::training_event::Event::JobCancelled(pb::training_event::JobCancelled {
                        global_step: 0,
                    }),
                )?;
            }
            pb::TrainingJobState::Running => {
                if let Some(entry) = self.lock()?.get(id) {
                    entry.stop.store(true, Ordering::Relaxed);
                }
            }
            other => {
                return Err(ModelError::FailedPrecondition(format!(
                    "job {id} is already {}",
                    other.as_str_name()
                )))
            }
        }
        self.get(id)
    }

    /// Changes a job's record and persists it.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut JobRecord),
    ) -> Result<JobRecord, ModelError> {
        let mut table = self.lock()?;
        let entry = table.get_mut(id).ok_or_else(|| not_found(id))?;
        change(&mut entry.record);
        entry.record.updated = now();
        write_record(&self.dir_of(id), &entry.record)?;
        Ok(entry.record.clone())
    }

    /// Appends an event to the job's log (memory and disk) and wakes its watchers.
    pub fn push_event(&self, id: &str, event: pb::training_event::Event) -> Result<(), ModelError> {
        let mut table = self.lock()?;
        let entry = table.get_mut(id).ok_or_else(|| not_found(id))?;
        let event = pb::TrainingEvent {
            index: entry.events.len() as u64,
            time: Some(timestamp(now())),
            job_id: id.to_string(),
            event: Some(event),
        };
        let path = self.dir_of(id).join(EVENTS_FILE);
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&event.encode_length_delimited_to_vec())?;
                f.sync_data()
            });
        if let Err(e) = appended {
            return Err(ModelError::internal(format!(
                "writing {}: {e}",
                path.display()
            )));
        }
        entry.events.push(event);
        entry.notify.send_replace(entry.events.len());
        Ok(())
    }

    /// Replays events from `from`, then follows new ones until the job's final event.
    pub fn watch(
        &self,
        id: &str,
        from: u64,
    ) -> Result<ReceiverStream<Result<pb::TrainingEvent, Status>>, ModelError> {
        let mut changes = {
            let table = self.lock()?;
            table
                .get(id)
                .ok_or_else(|| not_found(id))?
                .notify
                .subscribe()
        };
        let (tx, rx) = mpsc::channel(64);
        let jobs = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let mut next = from as usize;
            loop {
                let (batch, done) = match jobs.lock() {
                    Ok(table) => match table.get(&id) {
                        Some(entry) => (
                            entry
                                .events
                                .get(next..)
                                .map(<[_]>::to_vec)
                                .unwrap_or_default(),
                            entry.record.is_final()
                                && entry.events.last().is_some_and(is_final_event),
                        ),
                        None => return,
                    },
                    Err(_) => return,
                };
                for event in batch {
                    next += 1;
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if done || changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

fn is_final_event(event: &pb::TrainingEvent) -> bool {
    matches!(
        event.event,
        Some(
            pb::training_event::Event::JobFinished(_)
                | pb::training_event::Event::JobFailed(_)
                | pb::training_event::Event::JobCancelled(_)
        )
    )
}

fn not_found(id: &str) -> ModelError {
    ModelError::NotFound {
        what: "training job",
        name: id.to_string(),
    }
}

fn write_record(dir: &Path, record: &JobRecord) -> Result<(), ModelError> {
    let bytes = serde_json::to_vec_pretty(record).map_err(ModelError::internal)?;
    write_synced(&dir.join(RECORD_FILE), &bytes)
}

fn load_job(
    dir: &Path,
) -> anyhow::Result<(JobRecord, pb::StartTrainingRequest, Vec<pb::TrainingEvent>)> {
    let record: JobRecord = serde_json::from_slice(&std::fs::read(dir.join(RECORD_FILE))?)?;
    let request =
        pb::StartTrainingRequest::decode(std::fs::read(dir.join(REQUEST_FILE))?.as_slice())?;
    let bytes = std::fs::read(dir.join(EVENTS_FILE)).unwrap_or_default();
    let mut events = Vec::new();
    let mut rest = bytes.as_slice();
    // A torn last event (killed mid-write) is dropped.
    while !rest.is_empty() {
        match pb::TrainingEvent::decode_length_delimited(&mut rest) {
            Ok(event) => events.push(event),
            Err(_) => break,
        }
    }
    Ok((record, request, events))
}

fn to_proto(entry: &JobEntry) -> pb::TrainingJob {
    let r = &entry.record;
    pb::TrainingJob {
        id: r.id.clone(),
        state: r.state,
        request: Some(entry.request.clone()),
        progress: Some(pb::TrainingProgress {
            global_step: r.global_step,
            max_steps: r.max_steps,
            epoch: r.epoch,
            latest_loss: r.latest_loss,
            best_metric: r.best_metric,
            best_checkpoint: r.best_checkpoint.clone(),
            latest_event_index: entry.events.len().saturating_sub(1) as u64,
            eta_seconds: None,
        }),
        created_time: Some(timestamp(r.created)),
        updated_time: Some(timestamp(r.updated)),
        started_time: r.started.map(timestamp),
        finished_time: r.finished.map(timestamp),
        error: r.error.clone(),
        adapter: r.adapter.clone(),
    }
}
