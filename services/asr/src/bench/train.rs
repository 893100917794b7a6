//! `asr bench train`: the recipe's learning, ours against HF PEFT on the same machine in one
//! run. Whisper-base with LoRA r=4/alpha 64/dropout 0.05 on q_proj,v_proj, one epoch over the
//! espeak-ng training split, batch 4 without accumulation, lr 1e-3; ours on the int8 base
//! (`asr train --local`, mixed precision auto unless `--mixed-precision` lists others), PEFT on the fp32 model with Seq2SeqTrainer
//! (`tests/reference/peft_train.py`). Each runs in its own process so that its peak RSS is
//! its own. Reported: training samples/s, peak RSS, greedy CER on the test split before and
//! after, and the AISHELL clips' transcripts before and after.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use asr_whisper::dataset::read_manifest;
use clap::Args;
use serde::Deserialize;

use crate::process::run_child;

#[derive(Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value = "assets/corpus/espeak/train.jsonl")]
    train: PathBuf,
    #[arg(long, default_value = "assets/corpus/espeak/test.jsonl")]
    test: PathBuf,
    /// Real recordings transcribed before and after (a manifest).
    #[arg(long, default_value = "assets/aishell/manifest.jsonl")]
    extra: PathBuf,
    #[arg(long, default_value = "assets/whisper-base")]
    model: PathBuf,
    /// Use only the first N training clips (default: all).
    #[arg(long)]
    max_train: Option<usize>,
    /// Use only the first N test clips (default: all).
    #[arg(long)]
    max_test: Option<usize>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Our training's `--mixed-precision`, one run of ours for each (e.g. `auto,bf16`).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    mixed_precision: Vec<String>,
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Where runs are written (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// What each side reports (`peft_train.py` prints it as JSON).
#[derive(Deserialize)]
struct Outcome {
    samples_per_second: f64,
    peak_rss_bytes: u64,
    cer_before: f64,
    cer_after: f64,
    extra_before: Vec<String>,
    extra_after: Vec<String>,
}

#[derive(Deserialize)]
struct OursSummary {
    peak_rss_bytes: u64,
    mixed_precision: String,
    baseline: Vec<EvalFigures>,
    epochs: Vec<EpochFigures>,
}

#[derive(Deserialize)]
struct EvalFigures {
    cer: Option<f64>,
}

#[derive(Deserialize)]
struct EpochFigures {
    samples_per_second: f64,
    evals: Vec<EvalFigures>,
}

#[derive(Deserialize)]
struct Transcribed {
    text: String,
}

fn transcribe(
    exe: &Path,
    args: &TrainBenchArgs,
    files: &[PathBuf],
    adapter: Option<&Path>,
) -> anyhow::Result<Vec<String>> {
    let mut command = Command::new(exe);
    command
        .args([
            "transcribe",
            "--local",
            "--language",
            "zh",
            "--format",
            "json",
        ])
        .arg("--model")
        .arg(&args.model)
        .args(files);
    if let Some(adapter) = adapter {
        command.arg("--adapter").arg(adapter);
    }
    // One file prints an object, several an array.
    let value: serde_json::Value = serde_json::from_str(&run_child(&mut command, None, true)?)?;
    let results: Vec<Transcribed> = match value {
        serde_json::Value::Array(_) => serde_json::from_value(value)?,
        single => vec![serde_json::from_value(single)?],
    };
    Ok(results.into_iter().map(|r| r.text).collect())
}

fn ours(
    args: &TrainBenchArgs,
    work: &Path,
    extra: &[PathBuf],
    mixed_precision: &str,
) -> anyhow::Result<(Outcome, String)> {
    let exe = std::env::current_exe()?;
    let output = work.join(format!("ours-{mixed_precision}"));
    let mut command = Command::new(&exe);
    command
        .env("OMP_NUM_THREADS", args.threads.to_string())
        .args(["train", "--local", "--eval-cer", "--grad-accum", "1"])
        .args(["--mixed-precision", mixed_precision])
        .args(["--batch-size", "4", "--logging-steps", "25"])
        .args(["--epochs", &args.epochs.to_string()])
        .arg("--train")
        .arg(&args.train)
        .arg("--eval")
        .arg(&args.test)
        .arg("--model")
        .arg(&args.model)
        .arg("--output")
        .arg(&output)
        .arg("--feature-cache")
        .arg(work.join("features"));
    if let Some(n) = args.max_train {
        command.args(["--max-train-examples", &n.to_string()]);
    }
    if let Some(n) = args.max_test {
        command.args(["--max-eval-examples", &n.to_string()]);
    }
    let log = run_child(&mut command, None, true)?;
    print!("{log}");
    let summary: OursSummary = serde_json::from_str(
        &std::fs::read_to_string(output.join("train_summary.json"))
            .context("reading our train_summary.json")?,
    )?;
    let cer_of = |evals: &[EvalFigures]| evals.first().and_then(|e| e.cer).unwrap_or(f64::NAN);
    let last = summary.epochs.last().context("no epoch ran")?;
    let outcome = Outcome {
        samples_per_second: summary
            .epochs
            .iter()
            .map(|e| e.samples_per_second)
            .sum::<f64>()
            / summary.epochs.len() as f64,
        peak_rss_bytes: summary.peak_rss_bytes,
        cer_before: cer_of(&summary.baseline),
        cer_after: cer_of(&last.evals),
        extra_before: transcribe(&exe, args, extra, None)?,
        extra_after: transcribe(&exe, args, extra, Some(&output.join("adapter")))?,
    };
    Ok((outcome, summary.mixed_precision))
}

fn peft(args: &TrainBenchArgs, extra: &[PathBuf]) -> anyhow::Result<Outcome> {
    let job = serde_json::json!({
        "model": args.model, "train": args.train, "test": args.test, "extra": extra,
        "max_train": args.max_train, "max_test": args.max_test, "epochs": args.epochs,
        "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "r": 4, "alpha": 64, "dropout": 0.05,
        "seed": 42, "threads": args.threads, "generation_max_length": 96,
    });
    let stdout = run_child(
        Command::new(&args.python).arg("tests/reference/peft_train.py"),
        Some(&job.to_string()),
        true,
    )?;
    let line = stdout
        .lines()
        .last()
        .context("no output from peft_train.py")?;
    Ok(serde_json::from_str(line)?)
}

pub fn run_bench(args: TrainBenchArgs) -> anyhow::Result<()> {
    let temporary = tempfile::tempdir()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let extra_entries = read_manifest(&args.extra)?;
    let extra: Vec<PathBuf> = extra_entries.iter().map(|e| e.audio.clone()).collect();
    let train_clips = read_manifest(&args.train)?
        .len()
        .min(args.max_train.unwrap_or(usize::MAX));
    let test_clips = read_manifest(&args.test)?
        .len()
        .min(args.max_test.unwrap_or(usize::MAX));

    let mut runs = Vec::new();
    for mixed_precision in &args.mixed_precision {
        let (outcome, resolved) = ours(&args, &work, &extra, mixed_precision)?;
        runs.push((format!("ours int8 base, {resolved} products"), outcome));
    }
    let peft = peft(&args, &extra)?;

    println!();
    println!(
        "LoRA training benchmark: whisper-base, r=4 alpha=64 dropout 0.05 on q_proj,v_proj, {train_clips} training clips x {} epoch(s), batch 4, lr 1e-3, {} threads; greedy CER on {test_clips} test clips",
        args.epochs, args.threads
    );
    println!(
        "{:<34} {:>10} {:>12} {:>11} {:>10}",
        "engine", "samples/s", "peak RSS MB", "CER before", "CER after"
    );
    let peft_row = ("HF PEFT fp32 (Seq2SeqTrainer)".to_string(), peft);
    for (name, o) in runs.iter().chain([&peft_row]) {
        println!(
            "{name:<34} {:>10.3} {:>12.0} {:>10.2}% {:>9.2}%",
            o.samples_per_second,
            o.peak_rss_bytes as f64 / 1e6,
            o.cer_before * 100.0,
            o.cer_after * 100.0
        );
    }
    let peft = &peft_row.1;
    for (name, ours) in &runs {
        println!("{name}:");
        println!(
            "  samples/s ours / PEFT: {:.2}x (goal >= 1.5x)",
            ours.samples_per_second / peft.samples_per_second
        );
        println!(
            "  peak RSS ours / PEFT:  {:.2} (goal < 1)",
            ours.peak_rss_bytes as f64 / peft.peak_rss_bytes as f64
        );
        println!(
            "  CER after, ours - PEFT: {:+.2} points (goal <= 0)",
            (ours.cer_after - peft.cer_after) * 100.0
        );
    }
    for (i, entry) in extra_entries.iter().enumerate() {
        let name = entry
            .audio
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        println!("{name} reference:   {}", entry.text);
        let sides = runs
            .iter()
            .map(|(name, o)| (name.as_str(), o))
            .chain([("HF PEFT", peft)]);
        for (side, o) in sides {
            let at = |texts: &[String]| texts.get(i).cloned().unwrap_or_default();
            println!(
                "  {side}\n    before: {}\n    after:  {}",
                at(&o.extra_before).trim(),
                at(&o.extra_after).trim()
            );
        }
    }
    Ok(())
}
