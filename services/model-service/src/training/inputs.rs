//! What a job reads, checked when it is started: every dataset must exist, hold features of
//! the model's mel count, and have the split asked for; errors name the request field.

use crate::datasets::DatasetStore;
use crate::error::ModelError;
use crate::training::spec::{DataRef, JobSpec};

/// A StartTraining dataset field, as its errors name it.
#[derive(Clone, Copy)]
struct DataField {
    name: &'static str,
    dataset: &'static str,
    split: &'static str,
}

impl DataField {
    const TRAIN: Self = Self {
        name: "train_dataset",
        dataset: "train_dataset.dataset",
        split: "train_dataset.split",
    };
    const EVAL: Self = Self {
        name: "eval_dataset",
        dataset: "eval_dataset.dataset",
        split: "eval_dataset.split",
    };
    const GUARD: Self = Self {
        name: "guard_eval_sets",
        dataset: "guard_eval_sets.dataset",
        split: "guard_eval_sets.dataset.split",
    };
    const MIX: Self = Self {
        name: "mix_dataset",
        dataset: "mix_dataset.dataset",
        split: "mix_dataset.split",
    };
}

/// Checks every dataset `spec` reads (train, eval, guard sets, mix) against the store and a
/// model taking `n_mels` mel bins.
pub fn check_inputs(
    spec: &JobSpec,
    datasets: &DatasetStore,
    n_mels: usize,
) -> Result<(), ModelError> {
    // Every dataset the job reads must exist, match the model and hold the split.
    let mut inputs: Vec<(&DataRef, DataField)> = vec![(&spec.train, DataField::TRAIN)];
    inputs.extend(spec.eval.iter().map(|d| (d, DataField::EVAL)));
    inputs.extend(spec.guards.iter().map(|g| (&g.data, DataField::GUARD)));
    inputs.extend(spec.mix.iter().map(|(d, _)| (d, DataField::MIX)));
    for (data, field) in inputs {
        let dataset = datasets.get(&data.dataset).map_err(|e| match e {
            ModelError::NotFound { .. } => ModelError::NotFound {
                what: field.dataset,
                name: data.dataset.clone(),
            },
            other => other,
        })?;
        if dataset.meta.n_mels != n_mels {
            return Err(ModelError::FailedPrecondition(format!(
                "{}: dataset {:?} holds {}-mel features; the model takes {}",
                field.name, data.dataset, dataset.meta.n_mels, n_mels
            )));
        }
        if dataset.split(&data.split).next().is_none() {
            return Err(if dataset.examples.is_empty() {
                ModelError::FailedPrecondition(format!(
                    "{}: dataset {:?} is empty",
                    field.name, data.dataset
                ))
            } else {
                ModelError::NotFound {
                    what: field.split,
                    name: data.split.clone(),
                }
            });
        }
        if field.name == DataField::TRAIN.name
            && spec.language.is_empty()
            && dataset.meta.language.is_empty()
        {
            return Err(ModelError::invalid(
                "hyperparameters.language",
                "required: the train dataset records no language",
            ));
        }
    }
    Ok(())
}
