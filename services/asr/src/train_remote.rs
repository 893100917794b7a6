//! `asr train --train NAME [--eval NAME] --output-adapter NAME [--watch]`: the recipe as a
//! training job of the model service, on datasets it stores (`asr ingest`). The flags are
//! those of `--local`, read as dataset names and splits instead of paths.

use asr_proto::v1 as pb;

use crate::remote::{connect, watch, ModelServiceArg};
use crate::train::{BiasArg, LoraArgs};
use crate::train_local::{MetricArg, MixedPrecisionArg, RecipeArgs};
use crate::transcribe::TaskArg;

fn dataset_ref(name: &std::path::Path, split: &str) -> pb::DatasetRef {
    pb::DatasetRef {
        dataset: name.display().to_string(),
        split: split.to_string(),
    }
}

/// `DATASET` or `DATASET:SPLIT` (`default_split` when none is given).
fn named_split(data: &std::path::Path, default_split: &str) -> pb::DatasetRef {
    let data = data.display().to_string();
    let (dataset, split) = data.split_once(':').unwrap_or((&data, default_split));
    pb::DatasetRef {
        dataset: dataset.to_string(),
        split: split.to_string(),
    }
}

/// The StartTrainingRequest the flags describe.
pub fn request(
    lora: &LoraArgs,
    args: &RecipeArgs,
    output_adapter: &str,
) -> anyhow::Result<pb::StartTrainingRequest> {
    let train = args.train.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "--train DATASET is needed (a dataset of the model service; see asr ingest)"
        )
    })?;
    anyhow::ensure!(
        lora.target_regex.is_none() && !lora.use_rslora,
        "--target-regex and --use-rslora are not supported by the model service's jobs"
    );
    args.guard.validate()?;
    let guard_eval_sets = args
        .guard
        .guards
        .iter()
        .map(|g| pb::GuardEvalSet {
            name: g.name.clone(),
            dataset: Some(named_split(&g.data, &args.guard.guard_split)),
        })
        .collect();
    Ok(pb::StartTrainingRequest {
        train_dataset: Some(dataset_ref(train, &args.train_split)),
        eval_dataset: args.eval.as_ref().map(|e| dataset_ref(e, &args.eval_split)),
        guard_eval_sets,
        lora: Some(pb::LoraConfig {
            r: lora.lora_r as u32,
            alpha: lora.lora_alpha as f32,
            dropout: Some(lora.lora_dropout as f32),
            target_modules: lora.target_modules.clone(),
            bias: match lora.lora_bias {
                BiasArg::None => pb::LoraBias::None,
                BiasArg::All => pb::LoraBias::All,
                BiasArg::LoraOnly => pb::LoraBias::LoraOnly,
            } as i32,
        }),
        hyperparameters: Some(pb::TrainingHyperparameters {
            learning_rate: args.lr as f32,
            epochs: args.epochs as f32,
            max_steps: args.max_steps.unwrap_or(0).max(0) as u32,
            per_device_batch_size: args.batch_size as u32,
            gradient_accumulation_steps: args.grad_accum as u32,
            warmup_steps: Some(args.warmup_steps.max(0) as u32),
            weight_decay: args.weight_decay as f32,
            max_grad_norm: Some(args.max_grad_norm as f32),
            precision: match args.mixed_precision {
                MixedPrecisionArg::Auto => pb::TrainingPrecision::Auto,
                MixedPrecisionArg::No => pb::TrainingPrecision::Fp32,
                MixedPrecisionArg::Bf16 => pb::TrainingPrecision::Bf16,
                MixedPrecisionArg::Fp16 => pb::TrainingPrecision::Fp16,
            } as i32,
            seed: Some(args.seed),
            logging_steps: args.logging_steps.max(1) as u32,
            save_total_limit: args.save_total_limit.unwrap_or(0) as u32,
            metric_for_best_model: match args.metric_for_best {
                MetricArg::Loss => pb::BestModelMetric::EvalLoss,
                MetricArg::Cer => pb::BestModelMetric::Cer,
            } as i32,
            // Unset with guard sets: the service then evaluates by generation, as they need.
            predict_with_generate: (args.eval_cer || args.guard.guards.is_empty())
                .then_some(args.eval_cer),
            max_guard_regression: args.guard.max_guard_regression.map(|v| v as f32),
            early_stopping_patience: args.guard.early_stopping_patience as u32,
            mix_fraction: args.guard.mix_fraction as f32,
            eval_steps: args.eval_steps.unwrap_or(0).max(0) as u32,
            adapter_scale: (args.guard.adapter_scale != 1.0)
                .then_some(args.guard.adapter_scale as f32),
            generation_max_length: args.generation_max_length as u32,
            language: args.language.clone(),
            task: match args.task {
                TaskArg::Transcribe => pb::Task::Transcribe,
                TaskArg::Translate => pb::Task::Translate,
            } as i32,
            ..Default::default()
        }),
        output_adapter: output_adapter.to_string(),
        mix_dataset: args
            .guard
            .mix
            .as_ref()
            .map(|m| named_split(m, &args.guard.mix_split)),
        ..Default::default()
    })
}

pub fn run(
    lora: &LoraArgs,
    args: &RecipeArgs,
    output_adapter: &str,
    follow: bool,
    server: &ModelServiceArg,
) -> anyhow::Result<()> {
    let request = request(lora, args, output_adapter)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut client = connect(&server.model_service).await?;
            let job = client.start_training(request).await?.into_inner();
            println!("job {} queued (asr jobs watch {})", job.id, job.id);
            if follow {
                watch(&mut client, &job.id).await?;
            }
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        lora: LoraArgs,
        #[command(flatten)]
        recipe: RecipeArgs,
    }

    #[test]
    fn the_recipe_flags_become_the_job_request() {
        let flags = Flags::parse_from([
            "asr",
            "--train",
            "espeak",
            "--eval",
            "espeak",
            "--eval-split",
            "eval",
        ]);
        let r = request(&flags.lora, &flags.recipe, "zh-lora").expect("request");
        let train = r.train_dataset.expect("train");
        assert_eq!(
            (train.dataset.as_str(), train.split.as_str()),
            ("espeak", "train")
        );
        assert_eq!(r.eval_dataset.expect("eval").split, "eval");
        let lora = r.lora.expect("lora");
        assert_eq!((lora.r, lora.alpha, lora.dropout), (4, 64.0, Some(0.05)));
        assert_eq!(lora.target_modules, ["q_proj", "v_proj"]);
        let h = r.hyperparameters.expect("hyperparameters");
        assert_eq!(
            (
                h.epochs,
                h.per_device_batch_size,
                h.gradient_accumulation_steps
            ),
            (3.0, 4, 4)
        );
        assert_eq!((h.learning_rate, h.language.as_str()), (1e-3, "zh"));
        assert_eq!(r.output_adapter, "zh-lora");
        assert!(r.guard_eval_sets.is_empty());
        assert_eq!(h.predict_with_generate, Some(false));
    }

    #[test]
    fn guard_flags_become_guard_eval_sets() {
        let flags = Flags::parse_from([
            "asr",
            "--train",
            "espeak",
            "--eval",
            "espeak",
            "--guard",
            "real=aishell",
            "--guard",
            "f2=espeak-guard:f2",
            "--max-guard-regression",
            "0.01",
            "--early-stopping-patience",
            "2",
        ]);
        let r = request(&flags.lora, &flags.recipe, "zh-lora").expect("request");
        let sets: Vec<(&str, &str, &str)> = r
            .guard_eval_sets
            .iter()
            .map(|g| {
                let d = g.dataset.as_ref().expect("dataset");
                (g.name.as_str(), d.dataset.as_str(), d.split.as_str())
            })
            .collect();
        assert_eq!(
            sets,
            [("real", "aishell", "test"), ("f2", "espeak-guard", "f2")]
        );
        let h = r.hyperparameters.expect("hyperparameters");
        assert_eq!(h.max_guard_regression, Some(0.01));
        assert_eq!(h.early_stopping_patience, 2);
        assert_eq!(h.predict_with_generate, None);
        assert_eq!((h.mix_fraction, h.adapter_scale), (0.0, None));
        assert!(r.mix_dataset.is_none());
        let mixed = Flags::parse_from([
            "asr",
            "--train",
            "espeak",
            "--mix",
            "voices",
            "--mix-fraction",
            "0.2",
            "--adapter-scale",
            "0.5",
        ]);
        let r = request(&mixed.lora, &mixed.recipe, "zh-lora").expect("request");
        let mix = r.mix_dataset.expect("mix");
        assert_eq!(
            (mix.dataset.as_str(), mix.split.as_str()),
            ("voices", "train")
        );
        let h = r.hyperparameters.expect("hyperparameters");
        assert_eq!((h.mix_fraction, h.adapter_scale), (0.2, Some(0.5)));
    }
}
