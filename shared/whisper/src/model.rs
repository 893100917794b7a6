//! The Whisper network (HF `WhisperForConditionalGeneration` layout and names), no I/O.
//!
//! Encoder: two GELU convolutions (the second with stride 2), sinusoidal positions, pre-norm
//! transformer layers, a final layer norm. Decoder: token + learned positions, pre-norm layers of
//! causal self-attention (with a KV cache) and cross-attention (keys/values computed once per
//! window), a final layer norm and logits tied to the token embedding (the decoder and its
//! caches in `model/decoder.rs`).

use tch::{Kind, Tensor};

use crate::attention_bf16::PackedKv;
use crate::config::WhisperConfig;
use crate::linear::{add_in_place_without_grad, bias_site, tensor_bytes, LayerNorm, Linear};
use crate::lora::{Adapter, LinearSite};
use crate::weights::Weights;

mod decoder;

pub use decoder::{Decoder, DecoderCache, LayerCache};

/// Multi-head attention (HF `WhisperAttention`): q/v/out projections with bias, k without.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
    head_dim: i64,
    /// Kind the attention product runs in when not the activations' (see
    /// [`Whisper::set_compute_kind`]).
    sdpa_kind: Option<Kind>,
    /// Unmasked attention of many queries through [`crate::attention_bf16`] where it applies
    /// (see [`Whisper::set_cpu_bf16`]).
    bf16_kernel: bool,
}

impl Attention {
    fn load(weights: &mut Weights, prefix: &str, d_model: i64, heads: i64) -> anyhow::Result<Self> {
        Ok(Self {
            q_proj: Linear::load(weights, &format!("{prefix}.q_proj"), d_model, d_model, true)?,
            k_proj: Linear::load(
                weights,
                &format!("{prefix}.k_proj"),
                d_model,
                d_model,
                false,
            )?,
            v_proj: Linear::load(weights, &format!("{prefix}.v_proj"), d_model, d_model, true)?,
            out_proj: Linear::load(
                weights,
                &format!("{prefix}.out_proj"),
                d_model,
                d_model,
                true,
            )?,
            heads,
            head_dim: d_model / heads,
            sdpa_kind: None,
            bf16_kernel: false,
        })
    }

    /// In HF's registration order (k, v, q, out), which is the order PEFT adds and
    /// initialises adapters in.
    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.q_proj,
            &mut self.out_proj,
        ]
    }

    fn weight_bytes(&self) -> i64 {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
            .iter()
            .map(|l| l.weight_bytes())
            .sum()
    }

    /// `[B, T, D]` -> `[B, H, T, hd]`.
    fn split_heads(&self, xs: &Tensor) -> Tensor {
        let (b, t, _) = xs.size3().expect("[B, T, D]");
        xs.view([b, t, self.heads, self.head_dim]).transpose(1, 2)
    }

    fn keys_values(&self, xs: &Tensor) -> (Tensor, Tensor) {
        (
            self.split_heads(&self.k_proj.forward(xs)),
            self.split_heads(&self.v_proj.forward(xs)),
        )
    }

    /// Attends `xs` (queries) to `keys`/`values` (`[B, H, S, hd]`), under an optional boolean
    /// mask (`true` = may attend) or the square causal mask.
    fn attend(
        &self,
        xs: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
    ) -> Tensor {
        let (b, t, d) = xs.size3().expect("[B, T, D]");
        let q = self.split_heads(&self.q_proj.forward(xs));
        if self.bf16_kernel && t > 1 && mask.is_none() && !causal && self.sdpa_kind.is_none() {
            // Heads already merged: `[B, T, D]`. `None` where the kernel does not apply (a
            // gradient, another head size): libtorch's kernel below.
            if let Some(out) = crate::attention_bf16::attend(&q, keys, values) {
                return self.out_proj.forward(&out);
            }
        }
        if self.sdpa_kind == Some(Kind::BFloat16) && t > 1 && mask.is_none() && !causal {
            // Training under bf16 mixed precision: the self-attention's products in the bf16
            // kernel, backward included (libtorch's bf16 flash kernel runs at its f32 speed on
            // the CPU).
            if let Some(out) = crate::attention_bf16::attend_differentiable(&q, keys, values) {
                return self.out_proj.forward(&out);
            }
        }
        let single_query_on_cpu = t == 1
            && mask.is_none()
            && !causal
            && q.device() == tch::Device::Cpu
            && q.kind() == Kind::Float
            && self.sdpa_kind.is_none();
        let out = match self.sdpa_kind {
            // A decoding step. libtorch's CPU flash kernel splits one query into a gemv per
            // head and key block (at batch 8 the step's attention took about 1.5x this).
            _ if single_query_on_cpu => (q * (self.head_dim as f64).powf(-0.5))
                .matmul(&keys.transpose(-2, -1))
                .softmax(-1, Kind::Float)
                .matmul(values),
            Some(kind) if kind != q.kind() => Tensor::scaled_dot_product_attention(
                &q.to_kind(kind),
                &keys.to_kind(kind),
                &values.to_kind(kind),
                mask,
                0.0,
                causal,
                None,
                false,
            )
            .to_kind(q.kind()),
            _ => Tensor::scaled_dot_product_attention(
                &q, keys, values, mask, 0.0, causal, None, false,
            ),
        };
        self.out_proj
            .forward(&out.transpose(1, 2).contiguous().view([b, t, d]))
    }

    /// [`Self::attend`] without a mask to keys/values packed for the bfloat16 kernel (a
    /// decoder's cross-attention).
    fn attend_packed(&self, xs: &Tensor, packed: &PackedKv) -> Tensor {
        let q = self.split_heads(&self.q_proj.forward(xs));
        // The cache packs only what the kernel takes, and queries follow the same rules.
        let out = packed
            .attend(&q)
            .expect("the bf16 attention kernel takes the queries of its own cache");
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn load(weights: &mut Weights, prefix: &str, config: &WhisperConfig) -> anyhow::Result<Self> {
        let (d, ffn) = (config.d_model as i64, config.encoder_ffn_dim as i64);
        Ok(Self {
            self_attn: Attention::load(
                weights,
                &format!("{prefix}.self_attn"),
                d,
                config.encoder_attention_heads as i64,
            )?,
            self_attn_layer_norm: LayerNorm::load(
                weights,
                &format!("{prefix}.self_attn_layer_norm"),
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
            + self.fc1.weight_bytes()
            + self.fc2.weight_bytes()
            + self.final_layer_norm.weight_bytes()
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears: Vec<&mut Linear> = self.self_attn.linears_mut().into();
        linears.extend([&mut self.fc1, &mut self.fc2]);
        linears
    }

    fn norms_mut(&mut self) -> [&mut LayerNorm; 2] {
        [&mut self.self_attn_layer_norm, &mut self.final_layer_norm]
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.self_attn_layer_norm.forward(xs);
        let (k, v) = self.self_attn.keys_values(&h);
        let xs = add_in_place_without_grad(self.self_attn.attend(&h, &k, &v, None, false), xs);
        let h = feed_forward(&self.final_layer_norm, &self.fc1, &self.fc2, &xs);
        add_in_place_without_grad(h, &xs)
    }
}

/// HF `WhisperEncoder`.
#[derive(Debug)]
pub struct Encoder {
    conv1_weight: Tensor,
    conv1_bias: Tensor,
    conv2_weight: Tensor,
    conv2_bias: Tensor,
    embed_positions: Tensor,
    layers: Vec<EncoderLayer>,
    layer_norm: LayerNorm,
    /// An adapter's trainable conv1 / conv2 biases (bias "all").
    trained_conv_biases: [Option<Tensor>; 2],
}

impl Encoder {
    fn load(weights: &mut Weights, config: &WhisperConfig) -> anyhow::Result<Self> {
        let (d, mels) = (config.d_model as i64, config.num_mel_bins as i64);
        Ok(Self {
            conv1_weight: weights.take("model.encoder.conv1.weight", &[d, mels, 3])?,
            conv1_bias: weights.take("model.encoder.conv1.bias", &[d])?,
            conv2_weight: weights.take("model.encoder.conv2.weight", &[d, d, 3])?,
            conv2_bias: weights.take("model.encoder.conv2.bias", &[d])?,
            embed_positions: weights.take(
                "model.encoder.embed_positions.weight",
                &[config.max_source_positions as i64, d],
            )?,
            layers: (0..config.encoder_layers)
                .map(|i| EncoderLayer::load(weights, &format!("model.encoder.layers.{i}"), config))
                .collect::<anyhow::Result<_>>()?,
            layer_norm: LayerNorm::load(weights, "model.encoder.layer_norm", d)?,
            trained_conv_biases: [None, None],
        })
    }

    fn weight_bytes(&self) -> i64 {
        [
            &self.conv1_weight,
            &self.conv1_bias,
            &self.conv2_weight,
            &self.conv2_bias,
            &self.embed_positions,
        ]
        .iter()
        .map(|t| tensor_bytes(t))
        .sum::<i64>()
            + self
                .layers
                .iter()
                .map(EncoderLayer::weight_bytes)
                .sum::<i64>()
            + self.layer_norm.weight_bytes()
    }

    /// [`Self::forward`] over [`Self::windows_at_once`] windows at a time.
    pub fn forward_windows(&self, mel: &Tensor) -> Tensor {
        self.forward_in_chunks(mel, self.windows_at_once())
    }

    /// How many windows one encoder pass takes on this device. On the CPU one: a window's
    /// self-attention holds `heads x 1500 x 1500` scores (72 MB in f32 for whisper-base) and
    /// its linears 1500 rows, already enough for every core, while two windows at once were
    /// 10-25% slower per window (int8, AVX2, 2 threads: caches) and doubled the peak memory.
    /// On CUDA a larger batch fills the device.
    pub fn windows_at_once(&self) -> i64 {
        if self.device().is_cuda() {
            8
        } else {
            1
        }
    }

    /// [`Self::forward`] over at most `chunk` windows at a time.
    pub fn forward_in_chunks(&self, mel: &Tensor, chunk: i64) -> Tensor {
        let batch = mel.size()[0];
        if batch <= chunk {
            return self.forward(mel);
        }
        let parts: Vec<Tensor> = (0..batch)
            .step_by(chunk.max(1) as usize)
            .map(|start| self.forward(&mel.narrow(0, start, chunk.min(batch - start))))
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// Where the network's weights live.
    pub fn device(&self) -> tch::Device {
        self.conv1_weight.device()
    }

    /// The float kind the network computes in (inputs are cast to it).
    pub fn kind(&self) -> Kind {
        self.conv1_weight.kind()
    }

    /// `[B, n_mels, 3000]` normalised log-mel windows -> `[B, 1500, d_model]`.
    pub fn forward(&self, mel: &Tensor) -> Tensor {
        let kind = self.kind();
        let [conv1_bias, conv2_bias] = [
            (&self.trained_conv_biases[0], &self.conv1_bias),
            (&self.trained_conv_biases[1], &self.conv2_bias),
        ]
        .map(|(trained, base)| {
            trained
                .as_ref()
                .map_or_else(|| base.shallow_clone(), |b| b.to_kind(kind))
        });
        let xs = mel
            .conv1d(&self.conv1_weight, Some(&conv1_bias), [1], [1], [1], 1)
            .gelu("none")
            .conv1d(&self.conv2_weight, Some(&conv2_bias), [2], [1], [1], 1)
            .gelu("none")
            .transpose(1, 2);
        let positions = xs.size()[1];
        let mut xs = xs + self.embed_positions.narrow(0, 0, positions);
        for layer in &self.layers {
            xs = layer.forward(&xs);
        }
        self.layer_norm.forward(&xs)
    }
}

/// The pre-norm GELU MLP of every layer: `fc2(gelu(fc1(norm(xs))))`.
fn feed_forward(norm: &LayerNorm, fc1: &Linear, fc2: &Linear, xs: &Tensor) -> Tensor {
    let mut h = fc1.forward(&norm.forward(xs));
    // In place for inference: GELU's backward needs its input.
    let h = if h.requires_grad() {
        h.gelu("none")
    } else {
        h.gelu_("none")
    };
    fc2.forward(&h)
}

/// HF `WhisperForConditionalGeneration`.
#[derive(Debug)]
pub struct Whisper {
    pub config: WhisperConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    /// Parameters as HF counts them (the tied projection once), int8 weights included.
    parameter_count: i64,
    /// Elements of the attached adapter's A and B matrices, and its trainable elements.
    adapter_counts: Option<(i64, i64)>,
}

impl Whisper {
    /// Builds the network from `weights` (HF names). Tensors the network does not use, other
    /// than the tied `proj_out.weight`, are an error: they mean a layout mismatch.
    pub fn load(mut weights: Weights, config: &WhisperConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let encoder = Encoder::load(&mut weights, config)?;
        let decoder = Decoder::load(&mut weights, config)?;
        let parameter_count = weights.taken_elements();
        let unused: Vec<String> = weights
            .remaining()
            .into_iter()
            .filter(|n| n != "proj_out.weight")
            .collect();
        anyhow::ensure!(
            unused.is_empty(),
            "weights not used by the network: {unused:?}"
        );
        Ok(Self {
            config: config.clone(),
            encoder,
            decoder,
            parameter_count,
            adapter_counts: None,
        })
    }

    /// Every linear layer of encoder and decoder (the logits projection aside), in HF order.
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears = Vec::new();
        for layer in &mut self.encoder.layers {
            linears.extend(layer.linears_mut());
        }
        for layer in &mut self.decoder.layers {
            linears.extend(layer.linears_mut());
        }
        linears
    }

    /// Every layer norm, in HF order.
    fn norms_mut(&mut self) -> Vec<&mut LayerNorm> {
        let mut norms = Vec::new();
        for layer in &mut self.encoder.layers {
            norms.extend(layer.norms_mut());
        }
        norms.push(&mut self.encoder.layer_norm);
        for layer in &mut self.decoder.layers {
            norms.extend(layer.norms_mut());
        }
        norms.push(&mut self.decoder.layer_norm);
        norms
    }

    /// What an adapter can reach: the linear layers (targets), then the layer norms and the
    /// encoder's convolutions, whose biases train with bias "all".
    pub fn linear_sites(&mut self) -> Vec<LinearSite> {
        let mut sites: Vec<LinearSite> = self.linears_mut().into_iter().map(|l| l.site()).collect();
        sites.push(bias_site("model.encoder.conv1", &self.encoder.conv1_bias));
        sites.push(bias_site("model.encoder.conv2", &self.encoder.conv2_bias));
        sites.extend(self.norms_mut().into_iter().map(|n| n.site()));
        sites
    }

    /// Makes the adapter's layers part of the forward pass (replacing any attached before).
    pub fn attach(&mut self, adapter: &Adapter) {
        for linear in self.linears_mut() {
            linear.attach(Some(adapter));
        }
        for norm in self.norms_mut() {
            norm.attach(Some(adapter));
        }
        self.encoder.trained_conv_biases =
            ["model.encoder.conv1", "model.encoder.conv2"].map(|name| adapter.bias_for(name));
        self.adapter_counts = Some((
            adapter.lora_parameter_count(),
            adapter.trainable_parameter_count(),
        ));
    }

    /// Mixed precision for training: every linear product (see [`Linear::set_compute_kind`])
    /// and the encoder's self-attention in `kind`; layer norms, softmax statistics, residuals
    /// and adapters stay float32. `None`: full precision. On a CPU with AVX512-BF16 the
    /// encoder's self-attention runs in the bf16 kernel, backward included
    /// ([`crate::attention_bf16::attend_differentiable`]), and a whisper-base step at batch 4
    /// takes 3.8 s against 5.9 s in float32.
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        for linear in self.linears_mut() {
            linear.set_compute_kind(kind);
        }
        for layer in &mut self.encoder.layers {
            layer.self_attn.sdpa_kind = kind;
        }
    }

    /// Inference in bfloat16 products where float32 would run on the CPU: the encoder's
    /// self-attention and the decoder's cross-attention through [`crate::attention_bf16`],
    /// and the float part of large int8
    /// products (see [`Linear::set_bf16_float_part`]). A pass that needs gradients keeps
    /// float32.
    pub fn set_cpu_bf16(&mut self, on: bool) {
        for layer in &mut self.encoder.layers {
            layer.self_attn.bf16_kernel = on;
        }
        self.decoder.set_bf16_cross_attention(on);
        for linear in self.linears_mut() {
            linear.set_bf16_float_part(on);
        }
    }

    /// bitsandbytes' symmetric 8-bit activations in every int8 layer (see
    /// [`Linear::set_symmetric_int8`]); the trainer sets it.
    pub fn set_symmetric_int8(&mut self, on: bool) {
        for linear in self.linears_mut() {
            linear.set_symmetric_int8(on);
        }
        if let Some(proj_out) = self.decoder.proj_out.as_mut() {
            proj_out.set_symmetric_int8(on);
        }
    }

    /// Batch-invariant int8: each sample of a batch picks its own LLM.int8 outlier columns
    /// (see [`Linear::set_per_sample_outliers`]), so a window decodes the same alone or
    /// batched with others, as a server batching unrelated requests needs.
    pub fn set_per_sample_outliers(&mut self, on: bool) {
        for linear in self.linears_mut() {
            linear.set_per_sample_outliers(on);
        }
        if let Some(proj_out) = self.decoder.proj_out.as_mut() {
            proj_out.set_per_sample_outliers(on);
        }
    }

    /// Back to the base model.
    pub fn detach(&mut self) {
        for linear in self.linears_mut() {
            linear.attach(None);
        }
        for norm in self.norms_mut() {
            norm.attach(None);
        }
        self.encoder.trained_conv_biases = [None, None];
        self.adapter_counts = None;
    }

    /// (trainable, all) parameters as PEFT's `print_trainable_parameters` counts them: the
    /// base (frozen, int8 or float) plus the adapter's A and B.
    pub fn parameter_counts(&self) -> (i64, i64) {
        let (lora, trainable) = self.adapter_counts.unwrap_or((0, 0));
        (trainable, self.parameter_count + lora)
    }

    /// Bytes the model's parameters occupy as loaded (int8 linears count 1 byte per weight
    /// plus their scales).
    pub fn weight_bytes(&self) -> i64 {
        self.encoder.weight_bytes() + self.decoder.weight_bytes()
    }
}
