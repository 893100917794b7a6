//! JobSpec::from_request: defaults, and every refusal naming its field.

use super::*;

fn request() -> pb::StartTrainingRequest {
    pb::StartTrainingRequest {
        train_dataset: Some(pb::DatasetRef {
            dataset: "espeak".into(),
            split: "train".into(),
        }),
        output_adapter: "zh".into(),
        ..Default::default()
    }
}

#[test]
fn defaults_are_the_recipe() {
    let spec = JobSpec::from_request(&request()).expect("valid");
    assert_eq!(spec.lora, LoraConfig::default());
    let c = &spec.train_config;
    assert_eq!((c.epochs, c.batch_size, c.grad_accum), (3, 4, 4));
    assert_eq!(c.optimizer.lr, 1e-3);
    let mut r = request();
    r.hyperparameters = Some(pb::TrainingHyperparameters {
        learning_rate: 1e-3,
        ..Default::default()
    });
    assert_eq!(
        JobSpec::from_request(&r)
            .expect("valid")
            .train_config
            .optimizer
            .lr,
        1e-3
    );
    assert_eq!(spec.objective, Objective::default());
    assert!(!spec.predict_with_generate);
}

#[test]
fn bad_fields_are_named() {
    let mut r = request();
    r.lora = Some(pb::LoraConfig {
        target_modules: vec!["conv1".into()],
        ..Default::default()
    });
    match JobSpec::from_request(&r) {
        Err(ModelError::InvalidField { field, .. }) => assert_eq!(field, "lora.target_modules"),
        other => panic!("{other:?}"),
    }
    let mut r = request();
    r.output_adapter = "../x".into();
    match JobSpec::from_request(&r) {
        Err(ModelError::InvalidField { field, .. }) => assert_eq!(field, "output_adapter"),
        other => panic!("{other:?}"),
    }
}

fn field_of(result: Result<JobSpec, ModelError>) -> String {
    match result {
        Err(ModelError::InvalidField { field, .. }) => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

fn guard(name: &str) -> pb::GuardEvalSet {
    pb::GuardEvalSet {
        name: name.into(),
        dataset: Some(pb::DatasetRef {
            dataset: "aishell".into(),
            split: String::new(),
        }),
    }
}

#[test]
fn guard_sets_and_the_objective_are_checked() {
    let mut r = request();
    r.eval_dataset = r.train_dataset.clone();
    r.guard_eval_sets = vec![guard("real"), guard("f2")];
    r.hyperparameters = Some(pb::TrainingHyperparameters {
        max_guard_regression: Some(0.01),
        early_stopping_patience: 2,
        metric_for_best_model: pb::BestModelMetric::Cer as i32,
        ..Default::default()
    });
    let spec = JobSpec::from_request(&r).expect("valid");
    assert_eq!(spec.guards.len(), 2);
    assert_eq!(spec.guards[1].name, "f2");
    assert!(spec.predict_with_generate, "guard sets imply generation");
    assert_eq!(
        spec.objective,
        Objective {
            metric: BestMetric::Cer,
            max_guard_regression: Some(0.01),
            early_stopping_patience: 2,
        }
    );

    let mut bad = r.clone();
    bad.guard_eval_sets[1].name = "eval".into();
    assert_eq!(
        field_of(JobSpec::from_request(&bad)),
        "guard_eval_sets[1].name"
    );
    let mut bad = r.clone();
    bad.guard_eval_sets[1].name = "real".into();
    assert_eq!(
        field_of(JobSpec::from_request(&bad)),
        "guard_eval_sets[1].name"
    );
    let mut bad = r.clone();
    bad.guard_eval_sets[0].dataset = None;
    assert_eq!(
        field_of(JobSpec::from_request(&bad)),
        "guard_eval_sets[0].dataset"
    );
    let mut bad = r.clone();
    bad.guard_eval_sets = (0..9).map(|i| guard(&format!("g{i}"))).collect();
    assert_eq!(field_of(JobSpec::from_request(&bad)), "guard_eval_sets");
    let mut bad = r.clone();
    bad.guard_eval_sets.clear();
    assert_eq!(field_of(JobSpec::from_request(&bad)), "guard_eval_sets");
    let mut bad = r.clone();
    if let Some(h) = bad.hyperparameters.as_mut() {
        h.max_guard_regression = Some(-0.5);
    }
    assert_eq!(
        field_of(JobSpec::from_request(&bad)),
        "hyperparameters.max_guard_regression"
    );
    let mut bad = r.clone();
    if let Some(h) = bad.hyperparameters.as_mut() {
        h.predict_with_generate = Some(false);
        h.metric_for_best_model = pb::BestModelMetric::EvalLoss as i32;
    }
    assert_eq!(
        field_of(JobSpec::from_request(&bad)),
        "hyperparameters.predict_with_generate"
    );
    let mut bad = r.clone();
    bad.eval_dataset = None;
    assert_eq!(field_of(JobSpec::from_request(&bad)), "eval_dataset");
}

#[test]
fn mixing_and_the_adapter_scale_are_checked() {
    let mut r = request();
    r.mix_dataset = Some(pb::DatasetRef {
        dataset: "guard-domain".into(),
        split: "train".into(),
    });
    r.hyperparameters = Some(pb::TrainingHyperparameters {
        mix_fraction: 0.2,
        adapter_scale: Some(0.5),
        ..Default::default()
    });
    let spec = JobSpec::from_request(&r).expect("valid");
    let (data, fraction) = spec.mix.expect("mix");
    assert_eq!((data.dataset.as_str(), fraction), ("guard-domain", 0.2));
    assert_eq!(spec.adapter_scale, 0.5);
    let hyper = |h: pb::TrainingHyperparameters| {
        let mut bad = r.clone();
        bad.hyperparameters = Some(h);
        field_of(JobSpec::from_request(&bad))
    };
    assert_eq!(
        hyper(pb::TrainingHyperparameters {
            mix_fraction: 1.0,
            ..Default::default()
        }),
        "hyperparameters.mix_fraction"
    );
    assert_eq!(
        hyper(pb::TrainingHyperparameters {
            mix_fraction: 0.2,
            adapter_scale: Some(1.5),
            ..Default::default()
        }),
        "hyperparameters.adapter_scale"
    );
    let mut bad = r.clone();
    bad.mix_dataset = None;
    assert_eq!(field_of(JobSpec::from_request(&bad)), "mix_dataset");
    assert_eq!(
        JobSpec::from_request(&request())
            .expect("valid")
            .adapter_scale,
        1.0
    );
}
