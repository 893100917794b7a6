//! Adapters on disk in HF PEFT's layout, so that PEFT loads ours and we load PEFT's:
//! `adapter_config.json` and `adapter_model.safetensors` with tensors named
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (and
//! `<module>.base_layer.bias` when biases train).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::lora::{Adapter, LinearSite, LoraBias, LoraConfig, TargetModules};

const PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The fields of PEFT's `LoraConfig` that we write and read (unknown ones are ignored on read;
/// features we do not implement are refused by name).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfigFile {
    peft_type: String,
    r: i64,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: TargetModules,
    #[serde(default)]
    bias: LoraBias,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default = "default_true")]
    inference_mode: bool,
    #[serde(default = "default_true")]
    init_lora_weights: bool,
}

fn default_true() -> bool {
    true
}

/// What `adapter_config.json` says, for listing an adapter without loading its tensors.
#[derive(Debug, Clone)]
pub struct PeftAdapterInfo {
    pub config: LoraConfig,
    /// `base_model_name_or_path`.
    pub base_model: Option<String>,
}

/// Reads and checks `dir/adapter_config.json` (a LoRA config we can serve).
pub fn read_peft_config(dir: &Path) -> anyhow::Result<PeftAdapterInfo> {
    let config_path = dir.join(CONFIG_FILE);
    let file: PeftConfigFile = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    anyhow::ensure!(
        file.peft_type == "LORA",
        "{}: peft_type {} is not LORA",
        config_path.display(),
        file.peft_type
    );
    Ok(PeftAdapterInfo {
        config: LoraConfig {
            r: file.r,
            alpha: file.lora_alpha,
            dropout: file.lora_dropout,
            target_modules: file.target_modules,
            bias: file.bias,
            use_rslora: file.use_rslora,
        },
        base_model: file.base_model_name_or_path,
    })
}

impl Adapter {
    /// Writes the adapter as PEFT does (`base_model` goes to `base_model_name_or_path`).
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = PeftConfigFile {
            peft_type: "LORA".into(),
            r: self.config.r,
            lora_alpha: self.config.alpha,
            lora_dropout: self.config.dropout,
            target_modules: self.config.target_modules.clone(),
            bias: self.config.bias,
            use_rslora: self.config.use_rslora,
            use_dora: false,
            fan_in_fan_out: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            modules_to_save: None,
            base_model_name_or_path: Some(base_model.to_string()),
            task_type: None,
            inference_mode: true,
            init_lora_weights: true,
        };
        std::fs::write(
            dir.join(CONFIG_FILE),
            serde_json::to_string_pretty(&config)?,
        )?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (module, w) in &self.layers {
            let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu).contiguous();
            tensors.push((format!("{PREFIX}{module}.lora_A.weight"), cpu(&w.a)));
            tensors.push((format!("{PREFIX}{module}.lora_B.weight"), cpu(&w.b)));
        }
        for (name, bias) in &self.biases {
            tensors.push((
                peft_bias_name(name, self.layers.contains_key(module_of(name))),
                bias.detach().to_device(Device::Cpu).contiguous(),
            ));
        }
        let path = dir.join(WEIGHTS_FILE);
        Tensor::write_safetensors(&tensors, &path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a PEFT LoRA adapter directory for a model whose linear layers are `sites`.
    pub fn load_peft(dir: &Path, sites: &[LinearSite], device: Device) -> anyhow::Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let file: PeftConfigFile = serde_json::from_str(
            &std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("parsing {}", config_path.display()))?;
        if file.peft_type != "LORA" {
            bail!(
                "{}: peft_type {} is not LORA",
                config_path.display(),
                file.peft_type
            );
        }
        let unsupported = [
            (file.use_dora, "use_dora"),
            (file.fan_in_fan_out, "fan_in_fan_out"),
            (!file.rank_pattern.is_empty(), "rank_pattern"),
            (!file.alpha_pattern.is_empty(), "alpha_pattern"),
            (
                file.layers_to_transform
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
                "layers_to_transform",
            ),
            (
                file.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()),
                "modules_to_save",
            ),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(set, _)| *set) {
            bail!("{}: {name} is not supported", config_path.display());
        }
        let config = LoraConfig {
            r: file.r,
            alpha: file.lora_alpha,
            dropout: file.lora_dropout,
            target_modules: file.target_modules,
            bias: file.bias,
            use_rslora: file.use_rslora,
        };
        let weights_path = dir.join(WEIGHTS_FILE);
        let mut stored: BTreeMap<String, Tensor> = Tensor::read_safetensors(&weights_path)
            .with_context(|| format!("reading {}", weights_path.display()))?
            .into_iter()
            .map(|(name, t)| (strip_adapter_name(&name), t))
            .collect();
        let mut adapter = Adapter::init(config, sites, device)?;
        for (module, w) in adapter.layers.iter_mut() {
            for (part, target) in [("lora_A", &mut w.a), ("lora_B", &mut w.b)] {
                let name = format!("{PREFIX}{module}.{part}.weight");
                let tensor = stored
                    .remove(&name)
                    .with_context(|| format!("{} lacks {name}", weights_path.display()))?;
                anyhow::ensure!(
                    tensor.size() == target.size(),
                    "{name} has shape {:?}, this model needs {:?}",
                    tensor.size(),
                    target.size()
                );
                *target = tensor
                    .to_kind(Kind::Float)
                    .to_device(device)
                    .set_requires_grad(true);
            }
        }
        let adapted: Vec<String> = adapter.layers.keys().cloned().collect();
        for (name, bias) in adapter.biases.iter_mut() {
            let wrapped = adapted.iter().any(|m| m == module_of(name));
            if let Some(tensor) = stored.remove(&peft_bias_name(name, wrapped)) {
                *bias = tensor
                    .to_kind(Kind::Float)
                    .to_device(device)
                    .set_requires_grad(true);
            }
        }
        let unused: Vec<&String> = stored.keys().collect();
        anyhow::ensure!(
            unused.is_empty(),
            "{} has tensors this model has no layer for: {unused:?}",
            weights_path.display()
        );
        Ok(adapter)
    }
}

/// `<module>.bias` -> `<module>`.
fn module_of(bias_name: &str) -> &str {
    bias_name.strip_suffix(".bias").unwrap_or(bias_name)
}

/// PEFT's name for a trainable bias: inside the LoRA wrapper of an adapted layer the base
/// layer is `base_layer`.
fn peft_bias_name(bias_name: &str, adapted: bool) -> String {
    if adapted {
        format!("{PREFIX}{}.base_layer.bias", module_of(bias_name))
    } else {
        format!("{PREFIX}{bias_name}")
    }
}

/// PEFT saves without the adapter name, but files written with it
/// (`lora_A.default.weight`) exist too.
fn strip_adapter_name(name: &str) -> String {
    for part in ["lora_A", "lora_B"] {
        if let Some(start) = name.find(&format!(".{part}.")) {
            let head = &name[..start + part.len() + 1];
            if let Some(rest) = name[start + part.len() + 2..].strip_suffix(".weight") {
                if !rest.is_empty() && !rest.contains('.') {
                    return format!("{head}.weight");
                }
            }
        }
    }
    name.to_string()
}

impl Adapter {
    /// Folds the adapter into float weights named as HF names them: `W += B A * scaling` for
    /// every adapted layer, and trainable biases replace the base ones. The result is a plain
    /// model (PEFT's `merge_and_unload`), which int8 loading then quantises like any other.
    pub fn merge_into(&self, tensors: &mut BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        let scaling = self.config.scaling();
        tch::no_grad(|| {
            for (module, w) in &self.layers {
                let name = format!("{module}.weight");
                let weight = tensors
                    .get_mut(&name)
                    .with_context(|| format!("the model has no {name} to merge into"))?;
                let delta =
                    w.b.to_device(Device::Cpu)
                        .matmul(&w.a.to_device(Device::Cpu))
                        * scaling;
                anyhow::ensure!(
                    delta.size() == weight.size(),
                    "{name} has shape {:?}, the adapter's update {:?}",
                    weight.size(),
                    delta.size()
                );
                let kind = weight.kind();
                *weight = (weight.to_kind(Kind::Float) + delta).to_kind(kind);
            }
            for (name, bias) in &self.biases {
                let base = tensors
                    .get_mut(name)
                    .with_context(|| format!("the model has no {name} to replace"))?;
                *base = bias.detach().to_device(Device::Cpu).to_kind(base.kind());
            }
            Ok(())
        })
    }
}

/// Stores the linear weights named `layers` (`{layer}.weight`) quantised, in bitsandbytes'
/// serialisation: `{layer}.weight` as int8 `[out, in]` and `{layer}.SCB` (each row's absolute
/// maximum), as a model loaded with `load_in_8bit` saves them. About a quarter of the float32
/// bytes; [`crate::Weights`] loads them back directly as int8 layers.
pub fn quantize_linears(
    tensors: &mut BTreeMap<String, Tensor>,
    layers: &[String],
) -> anyhow::Result<()> {
    for layer in layers {
        let name = format!("{layer}.weight");
        let weight = tensors
            .get(&name)
            .with_context(|| format!("the model has no {name} to quantise"))?;
        if weight.kind() == Kind::Int8 {
            continue;
        }
        let (q, absmax) = crate::linear::quantize_rows(weight);
        tensors.insert(name, q);
        tensors.insert(format!("{layer}.SCB"), absmax);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_are_stripped() {
        assert_eq!(
            strip_adapter_name("base_model.model.x.q_proj.lora_A.default.weight"),
            "base_model.model.x.q_proj.lora_A.weight"
        );
        assert_eq!(
            strip_adapter_name("base_model.model.x.q_proj.lora_B.weight"),
            "base_model.model.x.q_proj.lora_B.weight"
        );
    }
}
