//! The linear layer of the network. The base weights are held in float or, as bitsandbytes'
//! `load_in_8bit` does, as int8 with one scale per output channel (about 1 byte per
//! parameter), multiplied with an int8 GEMM (`torch._int_mm`) after dynamic per-row
//! quantisation of the activations; activation columns holding an outlier (|x| above the
//! threshold, 6.0 as in LLM.int8) are multiplied in float instead (`int8`). Two departures,
//! each in its own module: past a share of outlier columns the whole layer multiplies in float
//! (`dense`), and the logits projection quantises its activations in two passes (`residual`).

use tch::{Kind, Tensor};

use crate::lora::{Adapter, LinearSite, LoraLayer};
use crate::weights::Weights;

mod dense;
mod int8;
mod residual;

use int8::Int8Storage;
pub use int8::{quantize_rows, Int8Compute, Int8Weight};

/// LLM.int8's default outlier threshold.
pub const DEFAULT_OUTLIER_THRESHOLD: f64 = 6.0;

#[derive(Debug)]
enum LinearWeight {
    /// `[out, in]`, as PyTorch stores it.
    Float(Tensor),
    Int8(Int8Weight),
}

#[derive(Debug)]
pub struct Linear {
    /// HF module name (`model.encoder.layers.0.self_attn.q_proj`), which adapters target.
    name: String,
    in_dim: i64,
    out_dim: i64,
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The attached adapter's part for this layer.
    lora: Option<LoraLayer>,
    /// Kind of a float weight's product when not the activations' (mixed precision).
    compute_kind: Option<Kind>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(
        weights: &mut Weights,
        prefix: &str,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
    ) -> anyhow::Result<Self> {
        let weight = weights.take(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(weights.take(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        let weight = if weight.kind() == Kind::Int8 {
            // Stored quantised (`asr adapters merge --quantize int8`, bitsandbytes' layout).
            let absmax = weights.take(&format!("{prefix}.SCB"), &[out_dim])?;
            let stored = Int8Weight::from_stored(&weight, &absmax, DEFAULT_OUTLIER_THRESHOLD);
            match weights.int8_threshold() {
                Some(threshold) => LinearWeight::Int8(Int8Weight {
                    outlier_threshold: threshold,
                    ..stored
                }),
                None => LinearWeight::Float(stored.dequantize().to_kind(weights.kind())),
            }
        } else {
            match weights.int8_threshold() {
                Some(threshold) => LinearWeight::Int8(Int8Weight::quantize(&weight, threshold)),
                None => LinearWeight::Float(weight),
            }
        };
        Ok(Self {
            name: prefix.to_string(),
            in_dim,
            out_dim,
            weight,
            bias,
            lora: None,
            compute_kind: None,
        })
    }

    fn unnamed(weight: LinearWeight, shape: &[i64]) -> Self {
        Self {
            name: String::new(),
            in_dim: shape[1],
            out_dim: shape[0],
            weight,
            bias: None,
            lora: None,
            compute_kind: None,
        }
    }

    /// What an adapter needs to know of this layer.
    pub fn site(&self) -> LinearSite {
        LinearSite {
            name: self.name.clone(),
            in_dim: self.in_dim,
            out_dim: self.out_dim,
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            bias_only: false,
        }
    }

    /// Attaches `adapter`'s part for this layer (or detaches when it has none).
    pub fn attach(&mut self, adapter: Option<&Adapter>) {
        self.lora = adapter.and_then(|a| a.layer_for(&self.name));
    }

    /// Batch-invariant int8 (see [`Int8Weight`]'s `per_sample_outliers`); float layers ignore it.
    pub fn set_per_sample_outliers(&mut self, on: bool) {
        if let LinearWeight::Int8(weight) = &mut self.weight {
            weight.per_sample_outliers = on;
        }
    }

    /// bitsandbytes' symmetric 8-bit activation quantisation even where fbgemm's 7-bit one
    /// is the CPU's fast path (training: the forward PEFT's recipe computes, at the exact
    /// float32 GEMM's speed); float layers ignore it.
    pub fn set_symmetric_int8(&mut self, on: bool) {
        if let LinearWeight::Int8(weight) = &mut self.weight {
            weight.set_symmetric_activations(on);
        }
    }

    /// The float part of an int8 layer's large CPU products (outlier columns, layers past
    /// the dense share) in bfloat16, for inference on CPUs with AVX512-BF16; float layers
    /// ignore it.
    pub fn set_bf16_float_part(&mut self, on: bool) {
        if let LinearWeight::Int8(weight) = &mut self.weight {
            weight.bf16_float_part = on;
        }
    }

    /// Mixed precision: the base product in `kind` (an int8 weight dequantised to it, see
    /// [`Int8Compute::Dequantized`]), the output and the adapter in float32; `None` goes
    /// back to full precision (and to the int8 GEMM).
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        match &mut self.weight {
            LinearWeight::Int8(weight) => {
                weight.compute = kind.map_or_else(Int8Compute::default, Int8Compute::Dequantized)
            }
            LinearWeight::Float(_) => self.compute_kind = kind,
        }
    }

    /// An int8 layer without bias for an existing float weight `[out, in]` (the tied logits
    /// projection).
    pub fn int8_from(weight: &Tensor, outlier_threshold: f64) -> Self {
        Self::unnamed(
            LinearWeight::Int8(Int8Weight::quantize(weight, outlier_threshold)),
            &weight.size(),
        )
    }

    /// An int8 layer without bias for an existing float weight `[out, in]`, multiplied with
    /// residual activations and no outlier columns (see the `residual` module): the logits
    /// projection, whose input has outliers in most columns.
    pub fn int8_residual_from(weight: &Tensor) -> Self {
        let mut int8 = Int8Weight::quantize(weight, 0.0);
        int8.residual_activations = true;
        Self::unnamed(LinearWeight::Int8(int8), &weight.size())
    }

    /// A float layer without bias for an existing weight `[out, in]`; inputs are cast to the
    /// weight's kind.
    pub fn float_from(weight: &Tensor) -> Self {
        Self::unnamed(LinearWeight::Float(weight.shallow_clone()), &weight.size())
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let lora = self.lora.as_ref();
        // A trainable bias of the adapter replaces the base one.
        let bias = lora.and_then(|l| l.bias.as_ref()).or(self.bias.as_ref());
        let y = match &self.weight {
            LinearWeight::Float(weight) if self.compute_kind.is_some_and(|k| k != xs.kind()) => {
                let kind = self.compute_kind.unwrap_or(Kind::Float);
                let bias = bias.map(|b| b.to_kind(kind));
                xs.to_kind(kind)
                    .linear(&weight.to_kind(kind), bias.as_ref())
                    .to_kind(xs.kind())
            }
            LinearWeight::Float(weight) if weight.kind() != xs.kind() => {
                let bias = bias.map(|b| b.to_kind(weight.kind()));
                xs.to_kind(weight.kind()).linear(weight, bias.as_ref())
            }
            LinearWeight::Float(weight) => {
                let bias = bias.map(|b| b.to_kind(weight.kind()));
                xs.linear(weight, bias.as_ref())
            }
            LinearWeight::Int8(weight) => {
                let shape = xs.size();
                let in_dim = shape[shape.len() - 1];
                // Per-sample outliers need the sample boundaries: `[B, T, in]` is B samples.
                let groups = if weight.per_sample_outliers && shape.len() >= 3 {
                    shape[0]
                } else {
                    1
                };
                let y = weight.matmul_t_with_grad(&xs.reshape([-1, in_dim]), groups);
                let y = match bias {
                    Some(bias) => add_in_place_without_grad(y, &bias.to_kind(Kind::Float)),
                    None => y,
                };
                let mut out_shape = shape.clone();
                let last = out_shape.len() - 1;
                out_shape[last] = y.size()[1];
                y.reshape(out_shape.as_slice()).to_kind(xs.kind())
            }
        };
        match lora.and_then(|l| l.delta(xs)) {
            Some(delta) => (y.to_kind(Kind::Float) + delta).to_kind(xs.kind()),
            None => y,
        }
    }

    /// Bytes the layer's parameters occupy (int8 data + scales, or float data; bias).
    pub fn weight_bytes(&self) -> i64 {
        let weight = match &self.weight {
            LinearWeight::Float(w) => tensor_bytes(w),
            LinearWeight::Int8(w) => {
                let values = match &w.storage {
                    Int8Storage::Plain(q_t) => tensor_bytes(q_t),
                    Int8Storage::Packed(packed) => packed.bytes(),
                };
                values + tensor_bytes(&w.scale)
            }
        };
        weight + self.bias.as_ref().map_or(0, tensor_bytes)
    }
}

/// `a + b`, in `a`'s memory when no gradient is being recorded for either (inference) and
/// `b` broadcasts to `a`'s shape: an activation-sized allocation less, the same bits. `a` must
/// be a fresh result that nothing else holds.
pub(crate) fn add_in_place_without_grad(mut a: Tensor, b: &Tensor) -> Tensor {
    let (a_shape, b_shape) = (a.size(), b.size());
    let broadcasts = b_shape.len() <= a_shape.len()
        && b_shape
            .iter()
            .rev()
            .zip(a_shape.iter().rev())
            .all(|(&bd, &ad)| bd == ad || bd == 1);
    if a.requires_grad() || b.requires_grad() || !broadcasts || a.kind() != b.kind() {
        return a + b;
    }
    a += b;
    a
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> i64 {
    t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
}

/// Layer norm with learned scale and shift (eps 1e-5 as in Whisper).
#[derive(Debug)]
pub struct LayerNorm {
    /// HF module name (`model.encoder.layers.0.final_layer_norm`).
    name: String,
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    /// An adapter's trainable bias that replaces `bias` (bias "all").
    trainable_bias: Option<Tensor>,
}

impl LayerNorm {
    pub fn load(weights: &mut Weights, prefix: &str, dim: i64) -> anyhow::Result<Self> {
        Ok(Self {
            name: prefix.to_string(),
            weight: weights.take(&format!("{prefix}.weight"), &[dim])?,
            bias: weights.take(&format!("{prefix}.bias"), &[dim])?,
            dim,
            trainable_bias: None,
        })
    }

    /// Its bias, as an adapter with bias "all" sees it.
    pub fn site(&self) -> LinearSite {
        bias_site(&self.name, &self.bias)
    }

    /// Takes `adapter`'s trainable bias for this layer, if any.
    pub fn attach(&mut self, adapter: Option<&Adapter>) {
        self.trainable_bias = adapter.and_then(|a| a.bias_for(&self.name));
    }

    pub fn weight_bytes(&self) -> i64 {
        tensor_bytes(&self.weight) + tensor_bytes(&self.bias)
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let trained = self
            .trainable_bias
            .as_ref()
            .map(|b| b.to_kind(self.weight.kind()));
        xs.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(trained.as_ref().unwrap_or(&self.bias)),
            1e-5,
            false,
        )
    }
}

/// The site of a module whose bias alone an adapter can train.
pub fn bias_site(name: &str, bias: &Tensor) -> LinearSite {
    let dim = bias.size()[0];
    LinearSite {
        name: name.to_string(),
        in_dim: dim,
        out_dim: dim,
        bias: Some(bias.shallow_clone()),
        bias_only: true,
    }
}
