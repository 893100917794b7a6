//! The linear layer of the network. A separate type so that the base weights can be held in
//! other forms (int8 with per-channel scales, LoRA-wrapped) without touching the network.

use tch::Tensor;

use crate::weights::Weights;

#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`, as PyTorch stores it.
    weight: Tensor,
    bias: Option<Tensor>,
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
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, self.bias.as_ref())
    }
}

/// Layer norm with learned scale and shift (eps 1e-5 as in Whisper).
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
}

impl LayerNorm {
    pub fn load(weights: &mut Weights, prefix: &str, dim: i64) -> anyhow::Result<Self> {
        Ok(Self {
            weight: weights.take(&format!("{prefix}.weight"), &[dim])?,
            bias: weights.take(&format!("{prefix}.bias"), &[dim])?,
            dim,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            1e-5,
            false,
        )
    }
}
