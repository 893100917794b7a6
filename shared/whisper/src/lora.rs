//! LoRA adapters on the network's linear layers, with HF PEFT's semantics: `r`, `lora_alpha`
//! (scaling `alpha / r`, or `alpha / sqrt(r)` with rsLoRA), `lora_dropout` on the adapter's
//! input while training, `target_modules` matched against module names as PEFT matches them
//! (a list: the name or its last dotted parts; a string: a regex over the whole name), bias
//! `none` / `all` / `lora_only`, A initialised kaiming-uniform(a = sqrt(5)) and B with zeros.
//!
//! An [`Adapter`] owns its trainable tensors, keyed by module name; attaching it to a
//! [`crate::Whisper`] makes the targeted layers add `B(A(dropout(x))) * scaling` to their
//! output. The base weights are never modified, so adapters can be swapped on one base.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Which modules get an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches when its name is one of these or ends with `.` + one of these.
    Names(Vec<String>),
    /// A module matches when the regex matches its whole name.
    Regex(String),
}

impl TargetModules {
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::Names(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            TargetModules::Regex(pattern) => {
                regex::Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(module))
            }
        }
    }
}

/// Which biases train along with the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    #[default]
    None,
    /// Every bias of the model: linear layers, layer norms and convolutions, as PEFT.
    All,
    /// The biases of the adapted layers.
    LoraOnly,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub bias: LoraBias,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    /// The recipe's: r 4, alpha 64, dropout 0.05, q_proj and v_proj, no bias.
    fn default() -> Self {
        Self {
            r: 4,
            alpha: 64.0,
            dropout: 0.05,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            bias: LoraBias::None,
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.r > 0, "lora r must be positive, got {}", self.r);
        anyhow::ensure!(
            (0.0..1.0).contains(&self.dropout),
            "lora dropout must be in [0, 1), got {}",
            self.dropout
        );
        if let TargetModules::Regex(pattern) = &self.target_modules {
            regex::Regex::new(pattern)
                .map_err(|e| anyhow::anyhow!("target_modules regex {pattern:?}: {e}"))?;
        }
        Ok(())
    }
}

/// A layer as the adapter sees it: a linear layer (LoRA and its bias), or a layer norm or
/// convolution, whose bias alone can train (bias "all").
#[derive(Debug)]
pub struct LinearSite {
    /// HF module name, e.g. `model.encoder.layers.0.self_attn.q_proj`.
    pub name: String,
    pub in_dim: i64,
    pub out_dim: i64,
    pub bias: Option<Tensor>,
    /// Not a linear layer: never targeted, its bias trains only with bias "all".
    pub bias_only: bool,
}

/// One adapted layer's tensors: A `[r, in]`, B `[out, r]` (f32).
#[derive(Debug)]
pub struct LoraWeights {
    pub a: Tensor,
    pub b: Tensor,
}

/// What a linear layer holds while an adapter is attached (shares the adapter's tensors).
#[derive(Debug)]
pub struct LoraLayer {
    /// A and B; `None` on a layer that only has a trainable bias.
    weights: Option<(Tensor, Tensor)>,
    scaling: f64,
    dropout: f64,
    training: Arc<AtomicBool>,
    /// A trainable bias that replaces the base one (bias `all` / `lora_only`).
    pub(crate) bias: Option<Tensor>,
}

impl LoraLayer {
    /// `B(A(dropout(x))) * scaling` for `x [.., in]`, in f32.
    pub fn delta(&self, xs: &Tensor) -> Option<Tensor> {
        let (a, b) = self.weights.as_ref()?;
        let xs = xs.to_kind(Kind::Float);
        let train = self.training.load(Ordering::Relaxed);
        let xs = if train && self.dropout > 0.0 {
            crate::lora_dropout::dropout(&xs, self.dropout)
        } else {
            xs
        };
        Some(xs.matmul(&a.tr()).matmul(&b.tr()) * self.scaling)
    }
}

/// A set of LoRA tensors for one model.
#[derive(Debug)]
pub struct Adapter {
    pub config: LoraConfig,
    /// Adapted module name -> A, B.
    pub layers: BTreeMap<String, LoraWeights>,
    /// Trainable biases (`{module}.bias` -> tensor) when `bias` is not `none`.
    pub biases: BTreeMap<String, Tensor>,
    training: Arc<AtomicBool>,
}

impl Adapter {
    /// A fresh adapter for the layers of `sites` that `config` targets: A kaiming-uniform
    /// (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B zeros, as PEFT initialises them.
    /// After `tch::manual_seed(s)`, A holds what PEFT draws after `torch.manual_seed(s)`.
    pub fn init(config: LoraConfig, sites: &[LinearSite], device: Device) -> anyhow::Result<Self> {
        config.validate()?;
        let mut layers = BTreeMap::new();
        let mut biases = BTreeMap::new();
        for site in sites {
            let targeted = !site.bias_only && config.target_modules.matches(&site.name);
            if targeted {
                let bound = 1.0 / (site.in_dim as f64).sqrt();
                // PEFT builds A and B as nn.Linear on the CPU, whose default initialisation
                // draws from the generator, and then re-draws A: drawing the same keeps a
                // seed's A identical to PEFT's for that seed (sites come in HF's module order).
                let cpu = (Kind::Float, Device::Cpu);
                let _ = Tensor::empty([config.r, site.in_dim], cpu).uniform_(-bound, bound);
                let b_bound = 1.0 / (config.r as f64).sqrt();
                let _ = Tensor::empty([site.out_dim, config.r], cpu).uniform_(-b_bound, b_bound);
                let a = Tensor::empty([config.r, site.in_dim], cpu)
                    .uniform_(-bound, bound)
                    .to_device(device)
                    .set_requires_grad(true);
                let b = Tensor::zeros([site.out_dim, config.r], (Kind::Float, device))
                    .set_requires_grad(true);
                layers.insert(site.name.clone(), LoraWeights { a, b });
            }
            let train_bias = match config.bias {
                LoraBias::None => false,
                LoraBias::All => true,
                LoraBias::LoraOnly => targeted,
            };
            if let (true, Some(bias)) = (train_bias, &site.bias) {
                biases.insert(
                    format!("{}.bias", site.name),
                    bias.to_kind(Kind::Float)
                        .detach()
                        .copy()
                        .set_requires_grad(true),
                );
            }
        }
        anyhow::ensure!(
            !layers.is_empty(),
            "target_modules {:?} match no linear layer of this model",
            config.target_modules
        );
        Ok(Self {
            config,
            layers,
            biases,
            training: Arc::new(AtomicBool::new(false)),
        })
    }

    /// An adapter from its tensors (inference mode).
    pub(crate) fn from_parts(
        config: LoraConfig,
        layers: BTreeMap<String, LoraWeights>,
        biases: BTreeMap<String, Tensor>,
    ) -> Self {
        Self {
            config,
            layers,
            biases,
            training: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Dropout on (training) or off (inference).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Every trainable tensor (A and B of each layer, then the biases).
    pub fn trainable_tensors(&self) -> Vec<Tensor> {
        self.layers
            .values()
            .flat_map(|w| [w.a.shallow_clone(), w.b.shallow_clone()])
            .chain(self.biases.values().map(Tensor::shallow_clone))
            .collect()
    }

    /// Elements of A and B (the parameters the adapter adds to the model).
    pub fn lora_parameter_count(&self) -> i64 {
        self.layers
            .values()
            .map(|w| (w.a.numel() + w.b.numel()) as i64)
            .sum()
    }

    /// Elements that train: A, B and the trainable biases.
    pub fn trainable_parameter_count(&self) -> i64 {
        self.lora_parameter_count() + self.biases.values().map(|b| b.numel() as i64).sum::<i64>()
    }

    /// This adapter with its effect scaled by `scale` (0: the base model, 1: the adapter as
    /// trained): B scaled, and each trained bias moved that fraction of the way from the base
    /// bias of `sites`. Shares A with `self`; for per-request adapter strength at inference.
    pub fn scaled(&self, scale: f64, sites: &[LinearSite]) -> Adapter {
        let layers = self
            .layers
            .iter()
            .map(|(name, w)| {
                (
                    name.clone(),
                    LoraWeights {
                        a: w.a.shallow_clone(),
                        b: (&w.b * scale).detach(),
                    },
                )
            })
            .collect();
        let biases = self
            .biases
            .iter()
            .map(|(key, trained)| {
                let base = sites
                    .iter()
                    .find(|s| format!("{}.bias", s.name) == *key)
                    .and_then(|s| s.bias.as_ref());
                let value = match base {
                    Some(base) => {
                        let base = base.to_kind(Kind::Float);
                        (&base + (trained - &base) * scale).detach()
                    }
                    None => (trained * scale).detach(),
                };
                (key.clone(), value)
            })
            .collect();
        Adapter {
            config: self.config.clone(),
            layers,
            biases,
            training: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The trainable bias of module `name` (`{name}.bias`), if any.
    pub(crate) fn bias_for(&self, name: &str) -> Option<Tensor> {
        self.biases
            .get(&format!("{name}.bias"))
            .map(Tensor::shallow_clone)
    }

    /// The layer state for module `name`, if adapted or with a trainable bias.
    pub(crate) fn layer_for(&self, name: &str) -> Option<LoraLayer> {
        let bias = self
            .biases
            .get(&format!("{name}.bias"))
            .map(Tensor::shallow_clone);
        let weights = self
            .layers
            .get(name)
            .map(|w| (w.a.shallow_clone(), w.b.shallow_clone()));
        if weights.is_none() && bias.is_none() {
            return None;
        }
        Some(LoraLayer {
            weights,
            scaling: self.config.scaling(),
            dropout: self.config.dropout,
            training: self.training.clone(),
            bias,
        })
    }
}

/// PEFT's `print_trainable_parameters` line.
pub fn trainable_parameters_line(trainable: i64, all: i64) -> String {
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(all),
        100.0 * trainable as f64 / all.max(1) as f64
    )
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_modules_match_as_peft_matches() {
        let names = TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]);
        assert!(names.matches("model.encoder.layers.0.self_attn.q_proj"));
        assert!(names.matches("model.decoder.layers.3.encoder_attn.v_proj"));
        assert!(names.matches("q_proj"));
        assert!(!names.matches("model.decoder.layers.3.encoder_attn.k_proj"));
        assert!(!names.matches("model.decoder.layers.3.self_attn.xq_proj"));
        let regex = TargetModules::Regex(r".*decoder.*\.(q|v)_proj".into());
        assert!(regex.matches("model.decoder.layers.1.self_attn.q_proj"));
        assert!(!regex.matches("model.encoder.layers.1.self_attn.q_proj"));
    }

    #[test]
    fn peft_style_counts() {
        assert_eq!(
            trainable_parameters_line(1_966_080, 1_545_271_040),
            "trainable params: 1,966,080 || all params: 1,545,271,040 || trainable%: 0.1272"
        );
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }

    /// PEFT's own count for the recipe (whisper-large-v2, r 4, q_proj/v_proj), on a model
    /// built from the config alone with uninitialised weights.
    #[test]
    fn large_v2_recipe_counts_as_peft_prints() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/configs/whisper-large-v2.json");
        let config = crate::WhisperConfig::from_file(&path).expect("large-v2 config");
        let weights = crate::Weights::uninitialised(Device::Cpu, Kind::Float);
        let mut model = crate::Whisper::load(weights, &config).expect("model");
        let adapter = Adapter::init(LoraConfig::default(), &model.linear_sites(), Device::Cpu)
            .expect("adapter");
        assert_eq!(adapter.layers.len(), 32 * 2 + 32 * 4);
        model.attach(&adapter);
        let (trainable, all) = model.parameter_counts();
        assert_eq!(
            trainable_parameters_line(trainable, all),
            "trainable params: 1,966,080 || all params: 1,545,271,040 || trainable%: 0.1272"
        );
        model.detach();
        assert_eq!(model.parameter_counts(), (0, 1_543_304_960));
    }

    #[test]
    fn init_follows_peft() {
        tch::manual_seed(0);
        let site = |name: &str| LinearSite {
            name: name.into(),
            in_dim: 64,
            out_dim: 32,
            bias: Some(Tensor::zeros([32], (Kind::Float, Device::Cpu))),
            bias_only: false,
        };
        let sites = [site("a.q_proj"), site("a.k_proj"), site("a.v_proj")];
        let adapter = Adapter::init(LoraConfig::default(), &sites, Device::Cpu).expect("init");
        assert_eq!(adapter.layers.len(), 2);
        let w = &adapter.layers["a.q_proj"];
        assert_eq!(w.a.size(), [4, 64]);
        assert_eq!(w.b.size(), [32, 4]);
        assert!(w.a.abs().max().double_value(&[]) <= 1.0 / 8.0);
        assert_eq!(w.b.abs().max().double_value(&[]), 0.0);
        assert_eq!(adapter.trainable_parameter_count(), 2 * (4 * 64 + 32 * 4));
        let lora_only = LoraConfig {
            bias: LoraBias::LoraOnly,
            ..Default::default()
        };
        let with_bias = Adapter::init(lora_only, &sites, Device::Cpu).expect("init");
        assert_eq!(with_bias.biases.len(), 2);
        let none = LoraConfig {
            target_modules: TargetModules::Names(vec!["out_proj".into()]),
            ..Default::default()
        };
        assert!(Adapter::init(none, &sites, Device::Cpu).is_err());
    }
}
