//! What `asr train --local` prints at the end: the epoch table (the zero-shot pass as epoch
//! 0, guard sets with their CER change) and the before/after table of the kept epoch.

use asr_whisper::evaluation::EvalSet;
use asr_whisper::trainer::{EpochSummary, EvalResult, FitSummary};

/// Loss and CER of one eval set; guard sets also get their CER change (points) from the
/// zero-shot pass.
pub fn eval_cell(result: &EvalResult) -> String {
    let cell = match result.cer {
        Some(cer) => format!("{:>9.4} {:>7.2}%", result.loss, cer * 100.0),
        None => format!("{:>9.4} {:>8}", result.loss, "-"),
    };
    if result.guard {
        format!("{cell} {:>7}", regression_cell(result))
    } else {
        cell
    }
}

/// `+0.83` points, or `-` without a figure.
pub fn regression_cell(result: &EvalResult) -> String {
    match result.cer_regression {
        Some(r) => format!("{:+.2}", r * 100.0),
        None => "-".into(),
    }
}

/// The before/after table of every eval set: zero-shot CER, the kept epoch's CER, and the
/// difference in points.
pub fn print_before_after(baseline: &[EvalResult], kept: &EpochSummary, bound: Option<f64>) {
    println!(
        "{:<16} {:>6} {:>11} {:>11} {:>9}",
        "eval set", "kind", "zero-shot", "after", "change"
    );
    for after in &kept.evals {
        let before = baseline.iter().find(|b| b.name == after.name);
        let cer = |r: Option<&EvalResult>| {
            r.and_then(|r| r.cer)
                .map_or("-".to_string(), |c| format!("{:.2}%", c * 100.0))
        };
        let change = match (before.and_then(|b| b.cer), after.cer) {
            (Some(b), Some(a)) => format!("{:+.2}", (a - b) * 100.0),
            _ => "-".into(),
        };
        let flag = match (after.guard, bound, after.cer_regression) {
            (true, Some(bound), Some(r)) if r > bound + 1e-9 => "  over the bound",
            _ => "",
        };
        println!(
            "{:<16} {:>6} {:>11} {:>11} {:>9}{flag}",
            after.name,
            if after.guard { "guard" } else { "domain" },
            cer(before),
            cer(Some(after)),
            change
        );
    }
}

/// One row per epoch (and the zero-shot pass as epoch 0), one column group per eval set.
pub fn print_epoch_table(evals: &[EvalSet], baseline: &[EvalResult], fit: &FitSummary) {
    println!(
        "{:>5} {:>7} {:>10} {:>10}{}",
        "epoch",
        "step",
        "train loss",
        "samples/s",
        evals
            .iter()
            .map(|e| {
                let columns = format!(" {:>9} {:>8}", format!("{} loss", e.name), "CER");
                if e.guard {
                    format!("{columns} {:>7}", "change")
                } else {
                    columns
                }
            })
            .collect::<String>()
    );
    if !baseline.is_empty() {
        println!(
            "{:>5} {:>7} {:>10} {:>10}{}",
            "0",
            "0",
            "-",
            "-",
            baseline
                .iter()
                .map(|e| format!(" {}", eval_cell(e)))
                .collect::<String>()
        );
    }
    for epoch in &fit.epochs {
        println!(
            "{:>5} {:>7} {:>10.4} {:>10.2}{}{}",
            epoch.epoch,
            epoch.steps,
            epoch.train_loss,
            epoch.samples_per_second,
            epoch
                .evals
                .iter()
                .map(|e| format!(" {}", eval_cell(e)))
                .collect::<String>(),
            if epoch.epoch == fit.best_epoch {
                "  <- best"
            } else {
                ""
            }
        );
    }
}
