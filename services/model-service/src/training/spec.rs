//! StartTrainingRequest validated into a typed job spec; every violation names its field.

use asr_proto::v1 as pb;
use asr_whisper::optim::AdamWConfig;
use asr_whisper::trainer::{BestMetric, MixedPrecision, Objective, TrainConfig};
use asr_whisper::{LoraBias, LoraConfig, TargetModules, Task};

use crate::error::ModelError;
use crate::registry::validate_name;

const LINEAR_MODULES: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// A dataset, or one split of it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataRef {
    pub dataset: String,
    /// Empty = every example.
    pub split: String,
}

/// Most guard eval sets a job may have.
pub const MAX_GUARD_SETS: usize = 8;

/// A guard eval set, named as its results are.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardRef {
    pub name: String,
    pub data: DataRef,
}

/// Everything a job needs, checked.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub train: DataRef,
    pub eval: Option<DataRef>,
    pub guards: Vec<GuardRef>,
    /// Guard-domain data mixed into training, and the share of the training set it makes.
    pub mix: Option<(DataRef, f64)>,
    /// Scale of evaluations and of the exported adapter (1: the recipe).
    pub adapter_scale: f64,
    /// Extra evaluations every N steps within epochs.
    pub eval_steps: Option<i64>,
    pub lora: LoraConfig,
    pub train_config: TrainConfig,
    /// Requested compute precision; AUTO is resolved on the device at run time.
    pub precision: pb::TrainingPrecision,
    /// Empty: the train dataset's language.
    pub language: String,
    pub task: Task,
    pub logging_steps: usize,
    pub save_total_limit: Option<usize>,
    /// metric_for_best_model, max_guard_regression and early_stopping_patience.
    pub objective: Objective,
    pub predict_with_generate: bool,
    pub generation_max_length: usize,
    pub eval_batch_size: usize,
    pub output_adapter: String,
}

/// A proto float as the decimal the client wrote (0.05f32 is 0.05, not 0.05000000074505806),
/// so configs and adapter files carry the intended value.
fn decimal(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

fn invalid(field: &str, description: impl Into<String>) -> ModelError {
    ModelError::invalid(field, description)
}

fn data_ref(field: &str, r: &pb::DatasetRef) -> Result<DataRef, ModelError> {
    validate_name(&r.dataset, &format!("{field}.dataset"))?;
    if !r.split.is_empty() {
        validate_name(&r.split, &format!("{field}.split"))?;
    }
    Ok(DataRef {
        dataset: r.dataset.clone(),
        split: r.split.clone(),
    })
}

fn lora_config(lora: Option<pb::LoraConfig>) -> Result<LoraConfig, ModelError> {
    let lora = lora.unwrap_or_default();
    if lora.r > 256 {
        return Err(invalid("lora.r", format!("at most 256, got {}", lora.r)));
    }
    if !(lora.alpha.is_finite() && lora.alpha >= 0.0) {
        return Err(invalid("lora.alpha", "must be a finite number >= 0"));
    }
    let dropout = lora.dropout.unwrap_or(0.05);
    if !(0.0..1.0).contains(&dropout) {
        return Err(invalid(
            "lora.dropout",
            format!("must be in [0, 1), got {dropout}"),
        ));
    }
    if let Some(bad) = lora
        .target_modules
        .iter()
        .find(|m| !LINEAR_MODULES.contains(&m.as_str()))
    {
        return Err(invalid(
            "lora.target_modules",
            format!("{bad:?} is not one of {LINEAR_MODULES:?}"),
        ));
    }
    let defaults = LoraConfig::default();
    Ok(LoraConfig {
        r: if lora.r == 0 {
            defaults.r
        } else {
            i64::from(lora.r)
        },
        alpha: if lora.alpha == 0.0 {
            defaults.alpha
        } else {
            decimal(lora.alpha)
        },
        dropout: decimal(dropout),
        target_modules: if lora.target_modules.is_empty() {
            defaults.target_modules
        } else {
            TargetModules::Names(lora.target_modules)
        },
        bias: match pb::LoraBias::try_from(lora.bias) {
            Ok(pb::LoraBias::Unspecified | pb::LoraBias::None) => LoraBias::None,
            Ok(pb::LoraBias::All) => LoraBias::All,
            Ok(pb::LoraBias::LoraOnly) => LoraBias::LoraOnly,
            Err(_) => return Err(invalid("lora.bias", format!("unknown value {}", lora.bias))),
        },
        use_rslora: false,
    })
}

/// A setting this version does not implement yet, refused rather than ignored.
fn unsupported(field: &str, what: &str) -> ModelError {
    invalid(field, format!("{what} is not supported by this version"))
}

/// `guard_eval_sets`: at most [`MAX_GUARD_SETS`], each named (a registry-safe name, not
/// "eval", unique) with a dataset.
fn guard_refs(sets: &[pb::GuardEvalSet]) -> Result<Vec<GuardRef>, ModelError> {
    if sets.len() > MAX_GUARD_SETS {
        return Err(invalid(
            "guard_eval_sets",
            format!(
                "at most {MAX_GUARD_SETS} guard eval sets, got {}",
                sets.len()
            ),
        ));
    }
    let mut guards: Vec<GuardRef> = Vec::with_capacity(sets.len());
    for (i, set) in sets.iter().enumerate() {
        let field = format!("guard_eval_sets[{i}]");
        validate_name(&set.name, &format!("{field}.name"))?;
        if set.name == "eval" || guards.iter().any(|g| g.name == set.name) {
            return Err(invalid(
                &format!("{field}.name"),
                format!(
                    "{:?} is taken (\"eval\" names the eval dataset; guard names are unique)",
                    set.name
                ),
            ));
        }
        let data = set
            .dataset
            .as_ref()
            .ok_or_else(|| invalid(&format!("{field}.dataset"), "required"))?;
        guards.push(GuardRef {
            name: set.name.clone(),
            data: data_ref(&format!("{field}.dataset"), data)?,
        });
    }
    Ok(guards)
}

impl JobSpec {
    pub fn from_request(request: &pb::StartTrainingRequest) -> Result<Self, ModelError> {
        let train = request
            .train_dataset
            .as_ref()
            .ok_or_else(|| invalid("train_dataset", "required"))?;
        let train = data_ref("train_dataset", train)?;
        let eval = request
            .eval_dataset
            .as_ref()
            .map(|r| data_ref("eval_dataset", r))
            .transpose()?;
        let guards = guard_refs(&request.guard_eval_sets)?;
        validate_name(&request.output_adapter, "output_adapter")?;
        let lora = lora_config(request.lora.clone())?;
        let h = request.hyperparameters.clone().unwrap_or_default();
        let field = |f: &str| format!("hyperparameters.{f}");
        let lr = match h.learning_rate {
            0.0 => 1e-3,
            v if v.is_finite() && v > 0.0 => decimal(v),
            v => {
                return Err(invalid(
                    &field("learning_rate"),
                    format!("must be > 0, got {v}"),
                ))
            }
        };
        let epochs = match h.epochs {
            0.0 => 3,
            v if v.is_finite() && v > 0.0 && v.fract() == 0.0 => v as usize,
            v => {
                return Err(invalid(
                    &field("epochs"),
                    format!("a whole number of epochs is needed, got {v}"),
                ))
            }
        };
        let batch_size = match h.per_device_batch_size {
            0 => 4,
            n => n as usize,
        };
        let grad_accum = match h.gradient_accumulation_steps {
            0 => 4,
            n => n as usize,
        };
        if !(h.weight_decay.is_finite() && h.weight_decay >= 0.0) {
            return Err(invalid(&field("weight_decay"), "must be >= 0"));
        }
        let max_grad_norm = match h.max_grad_norm {
            None => 1.0,
            Some(v) if v.is_finite() && v >= 0.0 => decimal(v),
            Some(v) => {
                return Err(invalid(
                    &field("max_grad_norm"),
                    format!("must be >= 0, got {v}"),
                ))
            }
        };
        match pb::LrScheduler::try_from(h.lr_scheduler) {
            Ok(pb::LrScheduler::Unspecified | pb::LrScheduler::Linear) => {}
            _ => {
                return Err(unsupported(
                    &field("lr_scheduler"),
                    "a schedule other than linear",
                ))
            }
        }
        for (value, name) in [
            (h.eval_strategy, "eval_strategy"),
            (h.save_strategy, "save_strategy"),
        ] {
            match pb::IntervalStrategy::try_from(value) {
                Ok(pb::IntervalStrategy::Unspecified | pb::IntervalStrategy::Epoch) => {}
                _ => return Err(unsupported(&field(name), "a strategy other than EPOCH")),
            }
        }
        if h.save_steps != 0 {
            return Err(unsupported(&field("save_steps"), "save_steps"));
        }
        if h.eval_steps > 0 && eval.is_none() && guards.is_empty() {
            return Err(invalid(
                &field("eval_steps"),
                "evaluations every eval_steps need an eval dataset or guard eval sets",
            ));
        }
        if h.early_stopping_patience > 0 && eval.is_none() {
            return Err(invalid(
                "eval_dataset",
                "early_stopping_patience needs an eval dataset",
            ));
        }
        let max_guard_regression = match h.max_guard_regression {
            None => None,
            Some(v) if v.is_finite() && (0.0..=1.0).contains(&v) => {
                if guards.is_empty() {
                    return Err(invalid(
                        "guard_eval_sets",
                        "max_guard_regression needs at least one guard eval set",
                    ));
                }
                Some(decimal(v))
            }
            Some(v) => {
                return Err(invalid(
                    &field("max_guard_regression"),
                    format!("must be a CER difference in [0, 1], got {v}"),
                ))
            }
        };
        if h.load_best_model_at_end == Some(false) {
            return Err(unsupported(
                &field("load_best_model_at_end"),
                "keeping the last epoch's adapter",
            ));
        }
        let precision = pb::TrainingPrecision::try_from(h.precision).map_err(|_| {
            invalid(
                &field("precision"),
                format!("unknown value {}", h.precision),
            )
        })?;
        let metric = match pb::BestModelMetric::try_from(h.metric_for_best_model) {
            Ok(pb::BestModelMetric::Unspecified | pb::BestModelMetric::EvalLoss) => {
                BestMetric::EvalLoss
            }
            Ok(pb::BestModelMetric::Cer) => BestMetric::Cer,
            _ => return Err(unsupported(&field("metric_for_best_model"), "this metric")),
        };
        let predict_with_generate = h
            .predict_with_generate
            .unwrap_or(metric == BestMetric::Cer || !guards.is_empty());
        if !guards.is_empty() && !predict_with_generate {
            return Err(invalid(
                &field("predict_with_generate"),
                "guard eval sets are compared by CER, which needs predict_with_generate",
            ));
        }
        if metric == BestMetric::Cer && !predict_with_generate {
            return Err(invalid(
                &field("predict_with_generate"),
                "metric_for_best_model CER needs predict_with_generate",
            ));
        }
        if metric == BestMetric::Cer && eval.is_none() {
            return Err(invalid(
                "eval_dataset",
                "metric_for_best_model CER needs an eval dataset",
            ));
        }
        let generation_max_length = match h.generation_max_length {
            0 => 96,
            n if n <= 448 => n as usize,
            n => {
                return Err(invalid(
                    &field("generation_max_length"),
                    format!("at most 448, got {n}"),
                ))
            }
        };
        if !h.language.is_empty() {
            validate_name(&h.language, &field("language"))?;
        }
        let mix = match (&request.mix_dataset, h.mix_fraction) {
            (None, 0.0) => None,
            (Some(data), f) if f.is_finite() && f > 0.0 && f < 1.0 => {
                Some((data_ref("mix_dataset", data)?, decimal(f)))
            }
            (Some(_), f) => {
                return Err(invalid(
                    &field("mix_fraction"),
                    format!("must be in (0, 1) with a mix_dataset, got {f}"),
                ))
            }
            (None, _) => return Err(invalid("mix_dataset", "mix_fraction needs a mix_dataset")),
        };
        let adapter_scale = match h.adapter_scale {
            None => 1.0,
            Some(v) if (0.0..=1.0).contains(&v) => decimal(v),
            Some(v) => {
                return Err(invalid(
                    &field("adapter_scale"),
                    format!("must be in [0, 1], got {v}"),
                ))
            }
        };
        let task = match pb::Task::try_from(h.task) {
            Ok(pb::Task::Unspecified | pb::Task::Transcribe) => Task::Transcribe,
            Ok(pb::Task::Translate) => Task::Translate,
            Err(_) => return Err(invalid(&field("task"), format!("unknown value {}", h.task))),
        };
        Ok(Self {
            train,
            eval,
            guards,
            mix,
            adapter_scale,
            eval_steps: (h.eval_steps > 0).then_some(i64::from(h.eval_steps)),
            lora,
            train_config: TrainConfig {
                epochs,
                batch_size,
                grad_accum,
                optimizer: AdamWConfig {
                    lr,
                    weight_decay: decimal(h.weight_decay),
                    ..Default::default()
                },
                warmup_steps: i64::from(h.warmup_steps.unwrap_or(50)),
                max_grad_norm,
                seed: h.seed.unwrap_or(42),
                max_steps: (h.max_steps > 0).then_some(i64::from(h.max_steps)),
                mixed_precision: MixedPrecision::No,
            },
            precision,
            language: h.language,
            task,
            logging_steps: match h.logging_steps {
                0 => 25,
                n => n as usize,
            },
            save_total_limit: (h.save_total_limit > 0).then_some(h.save_total_limit as usize),
            objective: Objective {
                metric,
                max_guard_regression,
                early_stopping_patience: h.early_stopping_patience as usize,
            },
            predict_with_generate,
            generation_max_length,
            eval_batch_size: match h.per_device_eval_batch_size {
                0 => batch_size,
                n => n as usize,
            },
            output_adapter: request.output_adapter.clone(),
        })
    }

    /// The compute precision on `device`: AUTO is fp16 on CUDA, fp32 on the CPU.
    pub fn mixed_precision(&self, device: tch::Device) -> Result<MixedPrecision, ModelError> {
        let cuda = device != tch::Device::Cpu;
        match self.precision {
            pb::TrainingPrecision::Unspecified | pb::TrainingPrecision::Auto => Ok(if cuda {
                MixedPrecision::Fp16
            } else {
                MixedPrecision::No
            }),
            pb::TrainingPrecision::Fp32 => Ok(MixedPrecision::No),
            pb::TrainingPrecision::Fp16 if cuda => Ok(MixedPrecision::Fp16),
            pb::TrainingPrecision::Fp16 => Err(ModelError::FailedPrecondition(
                "hyperparameters.precision FP16 needs CUDA".into(),
            )),
            pb::TrainingPrecision::Bf16 => Ok(MixedPrecision::Bf16),
        }
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
