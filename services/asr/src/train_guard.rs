//! The flags that keep fine-tuning from forgetting what the base model already reads: guard
//! eval sets compared with the zero-shot pass, a bound on their regression for the kept
//! checkpoint, early stopping, and labelled guard-domain data mixed into training.

use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct GuardArgs {
    /// A guard eval set, NAME=DATA: speech the model must keep reading. Evaluated by
    /// generation before training and after every epoch beside --eval; its CER change from
    /// the zero-shot pass is reported. DATA is a manifest or Common Voice directory (read at
    /// --guard-split) with --local, else a dataset of the model service. Repeatable.
    #[arg(long = "guard", value_name = "NAME=DATA")]
    pub guards: Vec<GuardSpec>,
    /// Split read from each guard's DATA.
    #[arg(long, default_value = "test")]
    pub guard_split: String,
    /// Keep only a checkpoint whose CER on every guard set is at most this much above the
    /// zero-shot CER (absolute: 0.01 = one point); if none is, the one that regresses least
    /// (with a warning). Unset: guard results are only reported.
    #[arg(long, value_name = "CER")]
    pub max_guard_regression: Option<f64>,
    /// Stop after this many evaluations (epochs) without a new best under the objective
    /// (--metric-for-best within --max-guard-regression); 0 never stops early.
    #[arg(long, default_value_t = 0)]
    pub early_stopping_patience: usize,
    /// Labelled speech of the domains to keep (manifest or Common Voice directory at
    /// --mix-split), mixed into the training set (--local only).
    #[arg(long)]
    pub mix: Option<PathBuf>,
    #[arg(long, default_value = "train")]
    pub mix_split: String,
    /// Share of the training set taken from --mix (0.2: one example in five).
    #[arg(long, default_value_t = 0.0)]
    pub mix_fraction: f64,
    /// Scale of the adapter's delta (0..=1) at which every epoch is evaluated and the kept
    /// adapter exported (B multiplied by it, so it serves as evaluated): below 1 the adapter
    /// moves the base model only part of the way. 1 is the recipe (--preset guarded: 0.7).
    #[arg(
        long,
        default_value_t = 1.0,
        default_value_if("preset", "guarded", "0.7")
    )]
    pub adapter_scale: f64,
    /// Defaults for the flags above and the optimiser: `recipe` (the notebook's) or `guarded`
    /// (--adapter-scale 0.7 --warmup-steps 15 --weight-decay 0.01, the settings `asr bench
    /// guard` measures; add --guard sets, --max-guard-regression and --mix data of your
    /// domains). Flags given explicitly win.
    #[arg(long, value_enum, default_value_t = Preset::Recipe)]
    pub preset: Preset,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    #[default]
    Recipe,
    Guarded,
}

impl Default for GuardArgs {
    fn default() -> Self {
        Self {
            guards: Vec::new(),
            guard_split: "test".into(),
            max_guard_regression: None,
            early_stopping_patience: 0,
            mix: None,
            mix_split: "train".into(),
            mix_fraction: 0.0,
            adapter_scale: 1.0,
            preset: Preset::Recipe,
        }
    }
}

/// `--guard NAME=DATA`.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardSpec {
    pub name: String,
    pub data: PathBuf,
}

impl FromStr for GuardSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, data) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=DATA, got {s:?}"))?;
        let name = name.trim();
        if name.is_empty() || data.is_empty() {
            return Err(format!("expected NAME=DATA, got {s:?}"));
        }
        if name == "eval" {
            return Err(
                "\"eval\" names the in-domain eval set; give the guard another name".into(),
            );
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "guard name {name:?}: use letters, digits, '-', '_' and '.'"
            ));
        }
        Ok(GuardSpec {
            name: name.to_string(),
            data: PathBuf::from(data),
        })
    }
}

impl GuardArgs {
    /// Checks what clap cannot: distinct names, bounds in range, what the bound needs.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut names: Vec<&str> = self.guards.iter().map(|g| g.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            anyhow::bail!("--guard {} is given twice", pair[0]);
        }
        if let Some(bound) = self.max_guard_regression {
            anyhow::ensure!(
                bound.is_finite() && bound >= 0.0,
                "--max-guard-regression must be a CER difference >= 0, got {bound}"
            );
            anyhow::ensure!(
                !self.guards.is_empty(),
                "--max-guard-regression needs at least one --guard set"
            );
        }
        anyhow::ensure!(
            (0.0..1.0).contains(&self.mix_fraction),
            "--mix-fraction must be in [0, 1), got {}",
            self.mix_fraction
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.adapter_scale),
            "--adapter-scale must be in 0..=1, got {}",
            self.adapter_scale
        );
        anyhow::ensure!(
            (self.mix_fraction > 0.0) == self.mix.is_some(),
            "--mix DATA and --mix-fraction F > 0 go together"
        );
        Ok(())
    }

    /// Examples to take from --mix for `train` in-domain examples: `train * f / (1 - f)`,
    /// so that they make up the fraction `f` of the mixed set.
    pub fn mix_count(&self, train: usize) -> usize {
        let f = self.mix_fraction;
        if f <= 0.0 {
            return 0;
        }
        (train as f64 * f / (1.0 - f)).round() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_specs_parse_and_refuse_bad_names() {
        let spec: GuardSpec = "espeak-f2=assets/guard/espeak-f2.jsonl".parse().unwrap();
        assert_eq!(spec.name, "espeak-f2");
        assert_eq!(spec.data, PathBuf::from("assets/guard/espeak-f2.jsonl"));
        assert!("eval=x.jsonl".parse::<GuardSpec>().is_err());
        assert!("x.jsonl".parse::<GuardSpec>().is_err());
        assert!("a/b=x.jsonl".parse::<GuardSpec>().is_err());
        assert!("=x.jsonl".parse::<GuardSpec>().is_err());
    }

    #[test]
    fn flags_are_checked_together() {
        let guard = |name: &str| GuardSpec {
            name: name.into(),
            data: "x.jsonl".into(),
        };
        let ok = GuardArgs {
            guards: vec![guard("a"), guard("b")],
            max_guard_regression: Some(0.01),
            ..Default::default()
        };
        ok.validate().unwrap();
        let twice = GuardArgs {
            guards: vec![guard("a"), guard("a")],
            ..Default::default()
        };
        assert!(twice.validate().is_err());
        let no_guard = GuardArgs {
            max_guard_regression: Some(0.01),
            ..Default::default()
        };
        assert!(no_guard.validate().is_err());
        let mix_without_data = GuardArgs {
            mix_fraction: 0.2,
            ..Default::default()
        };
        assert!(mix_without_data.validate().is_err());
    }

    #[test]
    fn the_guarded_preset_sets_defaults_that_flags_override() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            recipe: crate::train_local::RecipeArgs,
        }
        let recipe = Flags::parse_from(["asr"]).recipe;
        assert_eq!(
            (
                recipe.guard.adapter_scale,
                recipe.warmup_steps,
                recipe.weight_decay
            ),
            (1.0, 0, 0.0)
        );
        let guarded = Flags::parse_from(["asr", "--preset", "guarded"]).recipe;
        assert_eq!(
            (
                guarded.guard.adapter_scale,
                guarded.warmup_steps,
                guarded.weight_decay
            ),
            (0.7, 15, 0.01)
        );
        let overridden =
            Flags::parse_from(["asr", "--preset", "guarded", "--adapter-scale", "0.9"]).recipe;
        assert_eq!(overridden.guard.adapter_scale, 0.9);
    }

    #[test]
    fn the_mix_makes_up_its_fraction() {
        let args = GuardArgs {
            mix: Some("m.jsonl".into()),
            mix_fraction: 0.2,
            ..Default::default()
        };
        assert_eq!(args.mix_count(600), 150); // 150 of 750 = 20 %
        assert_eq!(GuardArgs::default().mix_count(600), 0);
    }
}
