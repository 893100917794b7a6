//! `asr bench guard`: does fine-tuning learn the new domain without forgetting the old one?
//! whisper-base (int8) is trained on the espeak-ng training split twice, each run in its own
//! `asr train --local` process: the recipe's defaults, and the project's recommended guarded
//! settings ([`GUARDED`]). Both evaluate the in-domain test split and every guard set (real
//! AISHELL-1 speech, clean and at 10 dB SNR; espeak in other voices, speeds and with noise)
//! by greedy CER. The guarded run's zero-shot pass serves both (the default run skips its
//! own). Goals: guarded in-domain CER within 2 points of the default's, and no guard set
//! more than 1 point worse than zero-shot.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use crate::process::run_child;

/// The recommended guarded settings (README, "Fine-tuning without forgetting").
pub const GUARDED: &[&str] = &[
    "--adapter-scale",
    "0.7",
    "--warmup-steps",
    "15",
    "--weight-decay",
    "0.01",
    "--mix",
    "assets/guard/mix-espeak.jsonl",
    "--mix-fraction",
    "0.2",
    "--max-guard-regression",
    "0.01",
];

/// The guard sets scripts/setup.sh makes (name, manifest).
const GUARD_SETS: &[(&str, &str)] = &[
    ("aishell", "assets/aishell/manifest.jsonl"),
    ("aishell-noisy", "assets/guard/aishell-noisy.jsonl"),
    ("espeak-f2", "assets/guard/espeak-f2.jsonl"),
    ("espeak-slow", "assets/guard/espeak-slow.jsonl"),
    ("espeak-fast", "assets/guard/espeak-fast.jsonl"),
    ("espeak-noisy", "assets/guard/espeak-noisy.jsonl"),
];

#[derive(Args)]
pub struct GuardBenchArgs {
    #[arg(long, default_value = "assets/corpus/espeak/train.jsonl")]
    train: PathBuf,
    #[arg(long, default_value = "assets/corpus/espeak/test.jsonl")]
    test: PathBuf,
    #[arg(long, default_value = "assets/whisper-base")]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Use only the first N training clips.
    #[arg(long)]
    max_train: Option<usize>,
    /// Use only the first N clips of the test split and of each guard set.
    #[arg(long)]
    max_eval: Option<usize>,
    /// The guarded run's flags instead of the recommended ones (one string, split at spaces).
    #[arg(long, allow_hyphen_values = true)]
    guarded_flags: Option<String>,
    /// Where runs are written (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Summary {
    baseline: Vec<Figures>,
    epochs: Vec<Epoch>,
    best_epoch: usize,
    #[serde(default)]
    within_guard_bound: bool,
    #[serde(default)]
    mix_examples: usize,
}

#[derive(Deserialize)]
struct Epoch {
    epoch: usize,
    evals: Vec<Figures>,
}

#[derive(Deserialize, Clone)]
struct Figures {
    name: String,
    cer: Option<f64>,
}

impl Summary {
    fn kept(&self) -> anyhow::Result<&Epoch> {
        self.epochs
            .iter()
            .find(|e| e.epoch == self.best_epoch)
            .context("the kept epoch has no figures")
    }
}

fn cer_of(figures: &[Figures], name: &str) -> Option<f64> {
    figures.iter().find(|f| f.name == name).and_then(|f| f.cer)
}

fn train_run(
    args: &GuardBenchArgs,
    work: &Path,
    name: &str,
    extra: &[String],
) -> anyhow::Result<Summary> {
    let output = work.join(name);
    let mut command = Command::new(std::env::current_exe()?);
    command
        .env("OMP_NUM_THREADS", args.threads.to_string())
        .args(["train", "--local", "--eval-cer", "--grad-accum", "1"])
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
    for (set, manifest) in GUARD_SETS {
        command.arg("--guard").arg(format!("{set}={manifest}"));
    }
    if let Some(n) = args.max_train {
        command.args(["--max-train-examples", &n.to_string()]);
    }
    if let Some(n) = args.max_eval {
        command.args(["--max-eval-examples", &n.to_string()]);
    }
    command.args(extra);
    // A run already in the work directory with the same arguments is reused (training is
    // deterministic given them), so a benchmark can be re-run with one side changed.
    let arguments: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let record = output.join("bench-arguments.txt");
    let summary = output.join("train_summary.json");
    let same = std::fs::read_to_string(&record).is_ok_and(|r| r.trim() == arguments.join(" "));
    if same && summary.exists() {
        println!("== {name}: reusing {} (same arguments)", output.display());
    } else {
        println!("== {name}: asr train --local ... {}", extra.join(" "));
        let log = run_child(&mut command, None, true)?;
        print!("{log}");
        std::fs::write(&record, arguments.join(" "))?;
    }
    let text = std::fs::read_to_string(&summary)
        .with_context(|| format!("reading the {name} run's train_summary.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn cell(cer: Option<f64>, before: Option<f64>) -> String {
    match (cer, before) {
        (Some(c), Some(b)) => format!("{:.2}% ({:+.2})", c * 100.0, (c - b) * 100.0),
        (Some(c), None) => format!("{:.2}%", c * 100.0),
        _ => "-".into(),
    }
}

pub fn run_bench(args: GuardBenchArgs) -> anyhow::Result<()> {
    let temporary = tempfile::tempdir()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    for (set, manifest) in GUARD_SETS {
        anyhow::ensure!(
            Path::new(manifest).exists(),
            "guard set {set}: {manifest} is missing (scripts/setup.sh makes it)"
        );
    }
    let guarded_flags: Vec<String> = match &args.guarded_flags {
        Some(flags) => flags.split_whitespace().map(str::to_string).collect(),
        None => GUARDED.iter().map(|s| s.to_string()).collect(),
    };
    let guarded = train_run(&args, &work, "guarded", &guarded_flags)?;
    // The zero-shot pass is the same model on the same sets: the guarded run's serves both.
    let default = train_run(&args, &work, "default", &["--no-baseline-eval".to_string()])?;

    println!();
    println!(
        "Fine-tuning without forgetting: whisper-base int8, LoRA r=4 on q_proj,v_proj, {} epoch(s) on {}, batch 4, {} threads; greedy CER (change from zero-shot, points)",
        args.epochs,
        args.train.display(),
        args.threads
    );
    println!("default: the recipe (lr 1e-3, alpha 64, no warmup, no weight decay)");
    println!(
        "guarded: {} ({} mixed-in examples)",
        guarded_flags.join(" "),
        guarded.mix_examples
    );
    println!(
        "{:<14} {:>6} {:>10} {:>18} {:>18}",
        "eval set", "kind", "zero-shot", "default", "guarded"
    );
    let (default_kept, guarded_kept) = (default.kept()?, guarded.kept()?);
    let names = std::iter::once("eval").chain(GUARD_SETS.iter().map(|(n, _)| *n));
    let mut worst = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for name in names {
        let before = cer_of(&guarded.baseline, name);
        let (d, g) = (
            cer_of(&default_kept.evals, name),
            cer_of(&guarded_kept.evals, name),
        );
        if name != "eval" {
            if let (Some(b), Some(d), Some(g)) = (before, d, g) {
                worst = (worst.0.max(d - b), worst.1.max(g - b));
            }
        }
        println!(
            "{:<14} {:>6} {:>10} {:>18} {:>18}",
            if name == "eval" { "espeak test" } else { name },
            if name == "eval" { "domain" } else { "guard" },
            before.map_or("-".into(), |b| format!("{:.2}%", b * 100.0)),
            cell(d, before),
            cell(g, before)
        );
    }
    let domain = (
        cer_of(&default_kept.evals, "eval").unwrap_or(f64::NAN),
        cer_of(&guarded_kept.evals, "eval").unwrap_or(f64::NAN),
    );
    println!(
        "in-domain CER, guarded - default: {:+.2} points (goal <= +2.00)",
        (domain.1 - domain.0) * 100.0
    );
    println!(
        "worst guard change from zero-shot: guarded {:+.2} points (goal <= +1.00), default {:+.2}",
        worst.1 * 100.0,
        worst.0 * 100.0
    );
    if !guarded.within_guard_bound {
        println!("the guarded run found no checkpoint within its bound (kept the least regressed)");
    }
    Ok(())
}
