//! `asr train --local` end to end on whisper-base: a manifest with a clip over 30 s (skipped
//! and counted), two epochs with evaluation by generation, the best checkpoint by CER kept,
//! the summary written, the adapter usable by `asr transcribe --adapter`, and a run resumed
//! from its first checkpoint ending with the same figures.

use std::path::Path;
use std::process::Command;

use e2e_support::whisper_base::{model_dir, test_clips};
use e2e_support::{assets, read_audio, wav_i16};

fn asr(args: &[&str], extra: &[&Path]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_asr"))
        .args(args)
        .args(extra)
        .output()
        .expect("running asr");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "asr {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn local_training_runs_the_recipe_and_keeps_the_best_adapter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = assets().join("corpus/espeak");
    // Six training clips and a 31 s one made of a clip repeated.
    let train: Vec<String> = std::fs::read_to_string(corpus.join("train.jsonl"))
        .expect("manifest")
        .lines()
        .take(6)
        .map(|line| {
            let mut entry: serde_json::Value = serde_json::from_str(line).expect("json");
            let audio = corpus.join(entry["audio"].as_str().expect("audio"));
            entry["audio"] = audio.display().to_string().into();
            entry.to_string()
        })
        .collect();
    let first: serde_json::Value = serde_json::from_str(&train[0]).expect("json");
    let (samples, rate, _) = read_audio(Path::new(first["audio"].as_str().expect("audio")));
    let long: Vec<f32> = samples
        .iter()
        .copied()
        .cycle()
        .take(31 * rate as usize)
        .collect();
    std::fs::write(dir.path().join("long.wav"), wav_i16(&long, rate, 1)).expect("write");
    let mut manifest = train.join("\n");
    manifest.push_str("\n{\"audio\": \"long.wav\", \"text\": \"太长了\"}\n");
    let train_manifest = dir.path().join("train.jsonl");
    std::fs::write(&train_manifest, manifest).expect("write");
    let eval: Vec<String> = test_clips(3)
        .iter()
        .map(|c| serde_json::json!({"audio": c.path, "text": c.text}).to_string())
        .collect();
    let eval_manifest = dir.path().join("eval.jsonl");
    std::fs::write(&eval_manifest, eval.join("\n")).expect("write");

    let output = dir.path().join("run");
    let cache = dir.path().join("features");
    let model = model_dir();
    let common = |out: &Path| -> Vec<std::path::PathBuf> {
        vec![
            "--train".into(),
            train_manifest.clone(),
            "--eval".into(),
            eval_manifest.clone(),
            "--model".into(),
            model.clone(),
            "--feature-cache".into(),
            cache.clone(),
            "--output".into(),
            out.to_path_buf(),
        ]
    };
    let recipe = [
        "train",
        "--local",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--eval-cer",
        "--metric-for-best",
        "cer",
        "--logging-steps",
        "1",
    ];
    let paths = common(&output);
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let log = asr(&recipe, &refs);
    println!("{log}");
    assert!(
        log.contains("train: 6 examples") && log.contains("1 clips over 30 s skipped"),
        "{log}"
    );
    assert!(log.contains("trainable params: 147,456 || all params: 72,741,376"));
    assert!(log.contains("zero-shot eval: loss"), "{log}");
    assert!(log.contains("step     6"), "{log}");

    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output.join("train_summary.json")).expect("summary"),
    )
    .expect("json");
    assert_eq!(summary["skipped_over_30s"], 1);
    let epochs = summary["epochs"].as_array().expect("epochs");
    assert_eq!(epochs.len(), 2);
    let cer = |e: &serde_json::Value| e["evals"][0]["cer"].as_f64().expect("cer");
    let best = summary["best_epoch"].as_u64().expect("best") as usize;
    let lowest = epochs.iter().map(cer).fold(f64::INFINITY, f64::min);
    assert_eq!(cer(&epochs[best - 1]), lowest);
    let baseline = summary["baseline"][0]["cer"]
        .as_f64()
        .expect("baseline cer");
    println!("CER zero-shot {baseline:.3}, best epoch {best}: {lowest:.3}");
    for epoch in 1..=2 {
        assert!(output.join(format!("checkpoint-epoch-{epoch}")).exists());
    }
    let adapter = output.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").exists());
    let clip = &test_clips(1)[0].path;
    let text = asr(
        &["transcribe", "--local", "--language", "zh", "--model"],
        &[&model, Path::new("--adapter"), &adapter, clip],
    );
    assert!(!text.trim().is_empty());
    // Merged and stored int8: the linear weights take a quarter of their float bytes (the
    // 51865 x 512 embedding stays float: 0.55 of the file in all), and it transcribes.
    let merged = dir.path().join("merged-int8");
    asr(
        &["adapters", "merge", "--quantize", "int8", "--model"],
        &[
            &model,
            Path::new("--adapter"),
            &adapter,
            Path::new("--output"),
            &merged,
        ],
    );
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .expect("model")
            .len()
    };
    let ratio = size(&merged) as f64 / size(&model) as f64;
    println!("merged int8 model: {ratio:.2} of the float file");
    assert!(ratio < 0.6, "{ratio}");
    let merged_text = asr(
        &["transcribe", "--local", "--language", "zh", "--model"],
        &[&merged, clip],
    );
    println!("with the adapter: {text}merged int8: {merged_text}");
    assert!(!merged_text.trim().is_empty());

    // Resumed from epoch 1 into another directory, keeping one checkpoint: the second
    // epoch's figures are the straight run's, the same best is chosen, and the checkpoints
    // are pruned to the best and the latest.
    let resumed_dir = dir.path().join("resumed");
    let paths = common(&resumed_dir);
    let mut refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let checkpoint = output.join("checkpoint-epoch-1");
    for extra in ["--save-total-limit", "1", "--resume-from"] {
        refs.push(Path::new(extra));
    }
    refs.push(&checkpoint);
    let log = asr(&recipe, &refs);
    assert!(log.contains("resumed from"), "{log}");
    let resumed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(resumed_dir.join("train_summary.json")).expect("summary"),
    )
    .expect("json");
    let (a, b) = (&epochs[1], &resumed["epochs"][1]);
    assert_eq!(a["train_loss"], b["train_loss"]);
    assert_eq!(a["evals"][0]["loss"], b["evals"][0]["loss"]);
    assert_eq!(resumed["best_epoch"], summary["best_epoch"]);
    for epoch in 1..=2 {
        assert_eq!(
            resumed_dir
                .join(format!("checkpoint-epoch-{epoch}"))
                .exists(),
            epoch == best || epoch == 2
        );
    }
}
