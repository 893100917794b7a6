//! Named tensors of an HF safetensors directory (single file or sharded), taken by the network
//! as it is built, so that every missing or unused tensor is reported by name.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use tch::{Device, Kind, Tensor};

/// The tensors of a model directory, on `device`, converted to `kind` if floating point.
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    device: Device,
    kind: Kind,
    /// When set, linear layers are quantised to int8 with this outlier threshold.
    int8_threshold: Option<f64>,
    /// How the logits projection (tied to the token embedding) is held.
    output_projection: OutputProjection,
    /// Elements of the tensors taken so far (the model's parameter count, as HF counts it).
    taken_elements: i64,
    /// Tensors not in the map are made uninitialised (building a model from its config alone).
    uninitialised: bool,
    /// With `uninitialised`: fill them with normal noise of this standard deviation instead
    /// (a model to time, whose arithmetic stays finite).
    random_std: Option<f64>,
}

/// How the decoder's logits projection, tied to the token embedding, is held. On the CPU it is
/// the largest matrix read at every decoding step (51865 x d_model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputProjection {
    /// The embedding itself, in the model's kind (bitsandbytes keeps it so in int8 models).
    #[default]
    Tied,
    /// A bfloat16 copy: a float format still, about 4x faster than f32 on CPUs with
    /// AVX512-BF16 / AMX.
    BFloat16,
    /// An int8 copy through the int8 GEMM, as CTranslate2's int8 models do; its input has
    /// outliers in most columns, so it is multiplied with residual activations instead of
    /// LLM.int8's float columns (see `linear::residual`).
    Int8,
}

impl OutputProjection {
    /// For int8 models on the CPU: bfloat16 where the CPU multiplies it natively (AVX512-BF16;
    /// on whisper-base it cut the decoding time of the espeak test clips by about a third and
    /// moved their CER by 0.1 point); else int8 where the CPU has a fast int8 GEMM (a decoder
    /// step of whisper-base at batch 1 took 11 ms instead of 23 ms on an AVX2 CPU); the tied
    /// float embedding elsewhere.
    pub fn cpu_default() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            return Self::BFloat16;
        }
        match crate::int8_gemm::cpu_int8_gemm() {
            crate::int8_gemm::CpuInt8Gemm::ExactFloat => Self::Tied,
            _ => Self::Int8,
        }
    }
}

impl Weights {
    /// Reads `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path, device: Device, kind: Kind) -> anyhow::Result<Self> {
        Ok(Self::from_map(read_model_tensors(dir)?, device, kind))
    }

    pub fn from_map(tensors: BTreeMap<String, Tensor>, device: Device, kind: Kind) -> Self {
        Self {
            tensors,
            device,
            kind,
            int8_threshold: None,
            output_projection: OutputProjection::Tied,
            taken_elements: 0,
            uninitialised: false,
            random_std: None,
        }
    }

    /// Linear layers built from these weights hold int8 weights (LLM.int8 outlier threshold
    /// `threshold`; 0 disables the float path for outliers).
    pub fn with_int8_linears(mut self, threshold: f64) -> Self {
        self.int8_threshold = Some(threshold);
        self
    }

    pub fn int8_threshold(&self) -> Option<f64> {
        self.int8_threshold
    }

    pub fn with_output_projection(mut self, projection: OutputProjection) -> Self {
        self.output_projection = projection;
        self
    }

    pub fn output_projection(&self) -> OutputProjection {
        self.output_projection
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// No stored tensors: every tensor the network takes is allocated uninitialised (to count
    /// parameters or measure memory from an HF config alone).
    pub fn uninitialised(device: Device, kind: Kind) -> Self {
        Self {
            uninitialised: true,
            ..Self::from_map(BTreeMap::new(), device, kind)
        }
    }

    /// No stored tensors: every tensor is normal noise with standard deviation `std` (layer
    /// norm scales around 1), to measure speed and memory from an HF config alone.
    pub fn random(device: Device, kind: Kind, std: f64) -> Self {
        Self {
            random_std: Some(std),
            ..Self::uninitialised(device, kind)
        }
    }

    /// Removes and returns `name`, checking its shape, on the target device and kind.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> anyhow::Result<Tensor> {
        if self.uninitialised && !self.tensors.contains_key(name) {
            self.taken_elements += shape.iter().product::<i64>();
            return Ok(match self.random_std {
                // Layer norm scales (`*_layer_norm.weight`, `layer_norm.weight`) near 1.
                Some(std) if name.ends_with("layer_norm.weight") => {
                    Tensor::randn(shape, (self.kind, self.device)) * std + 1.0
                }
                Some(std) => Tensor::randn(shape, (self.kind, self.device)) * std,
                None => Tensor::empty(shape, (self.kind, self.device)),
            });
        }
        let tensor = self
            .tensors
            .remove(name)
            .with_context(|| format!("weights lack tensor {name}"))?;
        if tensor.size() != shape {
            bail!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                tensor.size()
            );
        }
        self.taken_elements += tensor.numel() as i64;
        let tensor = if tensor.is_floating_point() {
            tensor.to_kind(self.kind)
        } else {
            tensor
        };
        Ok(tensor.to_device(self.device).detach())
    }

    /// Elements of every tensor taken so far.
    pub fn taken_elements(&self) -> i64 {
        self.taken_elements
    }

    /// Names never taken: weights the network does not use (reported, not fatal, for
    /// tied weights such as `proj_out.weight`).
    pub fn remaining(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

/// Every tensor of an HF model directory (`model.safetensors` or its shards), as stored.
pub fn read_model_tensors(dir: &Path) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let files = if single.exists() {
        vec![single]
    } else {
        let index_path = dir.join("model.safetensors.index.json");
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index_path).with_context(|| {
                format!(
                    "{} has neither model.safetensors nor its index",
                    dir.display()
                )
            })?)?;
        let mut shards: Vec<String> = index["weight_map"]
            .as_object()
            .context("index without weight_map")?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    };
    let mut tensors = BTreeMap::new();
    for file in files {
        let named = Tensor::read_safetensors(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        tensors.extend(named);
    }
    Ok(tensors)
}
