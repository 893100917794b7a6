//! The decoder (HF `WhisperDecoder`): its layers, the caches a batch of sequences keeps
//! between steps, and the logits projection.

use tch::{Kind, Tensor};

use super::{feed_forward, Attention};
use crate::attention_bf16::PackedKv;
use crate::config::WhisperConfig;
use crate::kv_cache::GrowingKv;
use crate::linear::{tensor_bytes, LayerNorm, Linear};
use crate::projection_bf16::PackedProjection;
use crate::weights::{OutputProjection, Weights};

#[derive(Debug)]
pub(super) struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl DecoderLayer {
    fn load(weights: &mut Weights, prefix: &str, config: &WhisperConfig) -> anyhow::Result<Self> {
        let (d, ffn, heads) = (
            config.d_model as i64,
            config.decoder_ffn_dim as i64,
            config.decoder_attention_heads as i64,
        );
        Ok(Self {
            self_attn: Attention::load(weights, &format!("{prefix}.self_attn"), d, heads)?,
            self_attn_layer_norm: LayerNorm::load(
                weights,
                &format!("{prefix}.self_attn_layer_norm"),
                d,
            )?,
            encoder_attn: Attention::load(weights, &format!("{prefix}.encoder_attn"), d, heads)?,
            encoder_attn_layer_norm: LayerNorm::load(
                weights,
                &format!("{prefix}.encoder_attn_layer_norm"),
                d,
            )?,
            fc1: Linear::load(weights, &format!("{prefix}.fc1"), d, ffn, true)?,
            fc2: Linear::load(weights, &format!("{prefix}.fc2"), ffn, d, true)?,
            final_layer_norm: LayerNorm::load(weights, &format!("{prefix}.final_layer_norm"), d)?,
        })
    }

    fn weight_bytes(&self) -> i64 {
        self.self_attn.weight_bytes()
            + self.self_attn_layer_norm.weight_bytes()
            + self.encoder_attn.weight_bytes()
            + self.encoder_attn_layer_norm.weight_bytes()
            + self.fc1.weight_bytes()
            + self.fc2.weight_bytes()
            + self.final_layer_norm.weight_bytes()
    }

    pub(super) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears: Vec<&mut Linear> = self.self_attn.linears_mut().into();
        linears.extend(self.encoder_attn.linears_mut());
        linears.extend([&mut self.fc1, &mut self.fc2]);
        linears
    }

    pub(super) fn norms_mut(&mut self) -> [&mut LayerNorm; 3] {
        [
            &mut self.self_attn_layer_norm,
            &mut self.encoder_attn_layer_norm,
            &mut self.final_layer_norm,
        ]
    }

    fn forward(&self, xs: &Tensor, cache: &mut LayerCache) -> Tensor {
        let h = self.self_attn_layer_norm.forward(xs);
        let (k, v) = self.self_attn.keys_values(&h);
        let (k, v) = match &mut cache.self_kv {
            Some(past) => past.append(&k, &v),
            None => cache.self_kv.insert(GrowingKv::new(k, v)).filled(),
        };
        let new_tokens = xs.size()[1];
        let past = k.size()[2] - new_tokens;
        let attn = if past == 0 || new_tokens == 1 {
            self.self_attn
                .attend(&h, &k, &v, None, past == 0 && new_tokens > 1)
        } else {
            let mask = causal_mask_with_past(new_tokens, past, xs);
            self.self_attn.attend(&h, &k, &v, Some(&mask), false)
        };
        let xs = xs + attn;
        let h = self.encoder_attn_layer_norm.forward(&xs);
        let cross = match &cache.cross {
            CrossKv::Float { keys, values } => {
                self.encoder_attn.attend(&h, keys, values, None, false)
            }
            CrossKv::Bf16(packed) => self.encoder_attn.attend_packed(&h, packed),
        };
        let xs = &xs + cross;
        let h = feed_forward(&self.final_layer_norm, &self.fc1, &self.fc2, &xs);
        xs + h
    }
}

/// Boolean mask `[T, past + T]`: token i sees every past token and new tokens up to i.
fn causal_mask_with_past(new_tokens: i64, past: i64, like: &Tensor) -> Tensor {
    let rows = Tensor::arange(new_tokens, (Kind::Int64, like.device())).unsqueeze(1);
    let cols = Tensor::arange(past + new_tokens, (Kind::Int64, like.device())).unsqueeze(0);
    cols.le_tensor(&(rows + past))
}

/// Keys and values a decoder layer keeps between steps.
#[derive(Debug)]
pub struct LayerCache {
    self_kv: Option<GrowingKv>,
    cross: CrossKv,
}

/// A decoder layer's cross-attention keys/values, computed once per window.
#[derive(Debug)]
enum CrossKv {
    /// `[B, H, S, hd]`, contiguous.
    Float { keys: Tensor, values: Tensor },
    /// In the bfloat16 kernel's layout (see [`Decoder::set_bf16_cross_attention`]).
    Bf16(PackedKv),
}

impl CrossKv {
    fn select(&self, indices: &Tensor) -> Self {
        match self {
            CrossKv::Float { keys, values } => CrossKv::Float {
                keys: keys.index_select(0, indices),
                values: values.index_select(0, indices),
            },
            CrossKv::Bf16(packed) => CrossKv::Bf16(packed.select(indices)),
        }
    }
}

/// The decoder state of a batch of sequences: self-attention KV cache and the cross-attention
/// keys/values of their encoder output.
#[derive(Debug)]
pub struct DecoderCache {
    layers: Vec<LayerCache>,
    /// Tokens already decoded (the position of the next one).
    offset: i64,
}

impl DecoderCache {
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Keeps the rows `indices` (beam search reordering, dropping finished sequences).
    pub fn select(&mut self, indices: &Tensor) {
        for layer in &mut self.layers {
            if let Some(kv) = &mut layer.self_kv {
                kv.select(indices);
            }
            layer.cross = layer.cross.select(indices);
        }
    }
}

/// HF `WhisperDecoder` plus the tied output projection.
#[derive(Debug)]
pub struct Decoder {
    embed_tokens: Tensor,
    /// The logits projection when it is not `embed_tokens` itself (tied).
    pub(super) proj_out: Option<Linear>,
    /// The bfloat16 projection in the kernel's layout, where the CPU has AVX512-BF16 (it
    /// then stands for `proj_out`).
    packed_proj_out: Option<PackedProjection>,
    embed_positions: Tensor,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) layer_norm: LayerNorm,
    /// New caches pack their cross-attention keys/values for the bfloat16 kernel where it
    /// applies (see [`Self::set_bf16_cross_attention`]).
    bf16_cross_attention: bool,
}

impl Decoder {
    pub(super) fn load(weights: &mut Weights, config: &WhisperConfig) -> anyhow::Result<Self> {
        let d = config.d_model as i64;
        let embed_tokens = weights.take(
            "model.decoder.embed_tokens.weight",
            &[config.vocab_size as i64, d],
        )?;
        let packed_proj_out = match weights.output_projection() {
            OutputProjection::BFloat16 => PackedProjection::pack(&embed_tokens),
            _ => None,
        };
        let proj_out = match weights.output_projection() {
            OutputProjection::Tied => None,
            OutputProjection::BFloat16 if packed_proj_out.is_some() => None,
            OutputProjection::BFloat16 => {
                Some(Linear::float_from(&embed_tokens.to_kind(Kind::BFloat16)))
            }
            OutputProjection::Int8 => Some(Linear::int8_residual_from(&embed_tokens)),
        };
        Ok(Self {
            embed_tokens,
            proj_out,
            packed_proj_out,
            embed_positions: weights.take(
                "model.decoder.embed_positions.weight",
                &[config.max_target_positions as i64, d],
            )?,
            layers: (0..config.decoder_layers)
                .map(|i| DecoderLayer::load(weights, &format!("model.decoder.layers.{i}"), config))
                .collect::<anyhow::Result<_>>()?,
            layer_norm: LayerNorm::load(weights, "model.decoder.layer_norm", d)?,
            bf16_cross_attention: false,
        })
    }

    /// Caches made from now on hold their cross-attention keys/values in the layout of
    /// [`crate::attention_bf16`] (half the bytes each step reads) where the kernel applies:
    /// float32 on a CPU with AVX512-BF16, no gradient (a training pass keeps float32).
    pub fn set_bf16_cross_attention(&mut self, on: bool) {
        self.bf16_cross_attention = on;
    }

    pub(super) fn weight_bytes(&self) -> i64 {
        tensor_bytes(&self.embed_tokens)
            + self.output_projection_bytes()
            + tensor_bytes(&self.embed_positions)
            + self
                .layers
                .iter()
                .map(DecoderLayer::weight_bytes)
                .sum::<i64>()
            + self.layer_norm.weight_bytes()
    }

    /// Bytes of the separate logits projection (0 when it is the tied embedding).
    pub fn output_projection_bytes(&self) -> i64 {
        self.proj_out.as_ref().map_or(0, Linear::weight_bytes)
            + self
                .packed_proj_out
                .as_ref()
                .map_or(0, PackedProjection::bytes)
    }

    /// A fresh cache for `encoder_out` (`[B, 1500, D]`): cross-attention keys/values once.
    pub fn new_cache(&self, encoder_out: &Tensor) -> DecoderCache {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let (keys, values) = layer.encoder_attn.keys_values(encoder_out);
                let packed = self
                    .bf16_cross_attention
                    .then(|| PackedKv::pack(&keys, &values))
                    .flatten();
                // Contiguous heads: attention over the transposed views copies them at
                // every step (at batch 8 that was half of a decoder step on the CPU).
                let cross = packed.map_or_else(
                    || CrossKv::Float {
                        keys: keys.contiguous(),
                        values: values.contiguous(),
                    },
                    CrossKv::Bf16,
                );
                LayerCache {
                    self_kv: None,
                    cross,
                }
            })
            .collect();
        DecoderCache { layers, offset: 0 }
    }

    /// Feeds `tokens` (`[B, T]`, following the cached ones) and returns logits `[B, T, vocab]`.
    pub fn forward(&self, tokens: &Tensor, cache: &mut DecoderCache) -> Tensor {
        let new_tokens = tokens.size()[1];
        let positions = self.embed_positions.narrow(0, cache.offset, new_tokens);
        let mut xs = self.embed_tokens.embedding_for(tokens) + positions;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(&xs, layer_cache);
        }
        cache.offset += new_tokens;
        let xs = self.layer_norm.forward(&xs);
        if let Some(projection) = &self.packed_proj_out {
            // The kernel gives no gradient: a pass that needs one goes through the tied
            // float32 embedding it was made from.
            if !xs.requires_grad() {
                return projection.forward(&xs);
            }
            return xs.matmul(&self.embed_tokens.tr());
        }
        match &self.proj_out {
            Some(proj) => proj.forward(&xs).to_kind(xs.kind()),
            None => xs.matmul(&self.embed_tokens.tr()),
        }
    }
}

trait EmbeddingExt {
    fn embedding_for(&self, tokens: &Tensor) -> Tensor;
}

impl EmbeddingExt for Tensor {
    fn embedding_for(&self, tokens: &Tensor) -> Tensor {
        Tensor::embedding(self, tokens, -1, false, false)
    }
}
