//! A CTranslate2 / faster-whisper Whisper directory (model.bin, config.json, tokenizer.json,
//! vocabulary.txt) -> an HF transformers directory (model.safetensors with HF's names,
//! config.json, generation_config.json, tokenizer and feature-extractor files).
//!
//! The layout, from CTranslate2's `WhisperLoader` (converters/transformers.py, via
//! `BartLoader.set_attention`) and `WhisperSpec` (specs/whisper_spec.py, revision 3):
//!
//! | CTranslate2 (`encoder/`, `decoder/`)         | HF (`model.encoder.`, `model.decoder.`)        |
//! |----------------------------------------------|------------------------------------------------|
//! | `conv1`, `conv2` `/weight` `/bias`           | `conv1`, `conv2` (encoder)                     |
//! | `position_encodings/encodings`               | `embed_positions.weight`                       |
//! | `embeddings/weight`                          | `embed_tokens.weight` (decoder)                |
//! | `layer_norm/gamma` `/beta`                   | `layer_norm.weight` `.bias`                    |
//! | `layer_N/self_attention/linear_0` = [q; k; v] rows, bias [bq; 0; bv] | `layers.N.self_attn.{q,k,v}_proj` |
//! | `layer_N/self_attention/linear_1`            | `layers.N.self_attn.out_proj`                  |
//! | `layer_N/self_attention/layer_norm`          | `layers.N.self_attn_layer_norm`                |
//! | `layer_N/attention/linear_0` = q             | `layers.N.encoder_attn.q_proj` (decoder)       |
//! | `layer_N/attention/linear_1` = [k; v], bias [0; bv] | `layers.N.encoder_attn.{k,v}_proj`      |
//! | `layer_N/attention/linear_2`                 | `layers.N.encoder_attn.out_proj`               |
//! | `layer_N/attention/layer_norm`               | `layers.N.encoder_attn_layer_norm`             |
//! | `layer_N/ffn/linear_0`, `linear_1`           | `layers.N.fc1`, `fc2`                          |
//! | `layer_N/ffn/layer_norm`                     | `layers.N.final_layer_norm`                    |
//! | `decoder/projection/weight` (an alias of the embeddings) | `proj_out.weight`, tied: not written |
//!
//! HF's k projections have no bias; CTranslate2's fused bias holds zeros there (and any bias on
//! k would shift every logit of a query equally, which softmax ignores), so that block is dropped.
//! Scalars: `encoder/num_heads`, `decoder/num_heads`, `decoder/activation` (3 = GELU),
//! `decoder/scale_embeddings`. Every other non-scalar variable must be used, or the conversion
//! fails naming it.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, View};
use serde::Serialize;

use super::hf_files::{check_destination, install, sibling, Specials, Staging};
use super::reader::{f32_to_bf16, f32_to_f16, read_model_bin, Ct2DType, Ct2Model};
use crate::config::WhisperConfig;

/// Floating-point type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputDType {
    /// float32 (default): what the project's int8 quantiser and the fp32 parity tests load.
    #[default]
    F32,
    F16,
    BF16,
    /// The source's float type: that of its unquantised variables (layer norms), e.g. float16
    /// for a `float16` or `int8_float16` model; int8/int16 weights are dequantised to it.
    Same,
}

#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    pub dtype: OutputDType,
    /// Replace a non-empty destination directory.
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// Tensors in model.safetensors.
    pub tensors: usize,
    /// Parameters in model.safetensors (the tied output projection is not counted twice).
    pub parameters: u64,
    /// Type written: "float32", "float16" or "bfloat16" (one for all tensors).
    pub dtype: String,
    /// Types found in model.bin, e.g. "float16" or "float32+int8".
    pub source_dtype: String,
    /// Bytes of every file written into the destination.
    pub bytes_written: u64,
    /// Whether the output projection is the embedding matrix (HF `tie_word_embeddings`).
    pub tied_output: bool,
    pub config: WhisperConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    F32,
    F16,
    BF16,
}

impl Out {
    fn of(dtype: Ct2DType) -> Option<Self> {
        match dtype {
            Ct2DType::F32 => Some(Self::F32),
            Ct2DType::F16 => Some(Self::F16),
            Ct2DType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        if self == Self::F32 {
            4
        } else {
            2
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
}

/// One output tensor: rows `rows` of CTranslate2 variable `source`, produced when written.
struct Planned<'a> {
    model: &'a Ct2Model,
    source: String,
    rows: Range<usize>,
    shape: Vec<usize>,
    out: Out,
}

impl View for Planned<'_> {
    fn dtype(&self) -> Dtype {
        match self.out {
            Out::F32 => Dtype::F32,
            Out::F16 => Dtype::F16,
            Out::BF16 => Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let var = self.model.get(&self.source).expect("planned variable");
        if Out::of(var.dtype) == Some(self.out) {
            let row = var.row_len() * var.dtype.size();
            return Cow::Borrowed(&var.data[self.rows.start * row..self.rows.end * row]);
        }
        let values = self.model.rows_f32(&self.source, self.rows.clone());
        Cow::Owned(match self.out {
            Out::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Out::F16 => values
                .iter()
                .flat_map(|v| f32_to_f16(*v).to_le_bytes())
                .collect(),
            Out::BF16 => values
                .iter()
                .flat_map(|v| f32_to_bf16(*v).to_le_bytes())
                .collect(),
        })
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.out.size()
    }
}

/// Collects the output tensors, checking shapes and types, and remembers what was used.
struct Planner<'a> {
    model: &'a Ct2Model,
    out: Out,
    tensors: Vec<(String, Planned<'a>)>,
    used: BTreeSet<String>,
}

impl<'a> Planner<'a> {
    fn add(
        &mut self,
        hf: String,
        ct2: &str,
        rows: Option<Range<usize>>,
        shape: &[usize],
    ) -> Result<()> {
        let var = self.model.require(ct2)?;
        ensure!(!var.is_scalar(), "{ct2} is a scalar");
        let rows = rows.unwrap_or(0..var.shape[0]);
        self.model.check_float(ct2, &rows)?;
        ensure!(
            rows.len() == shape[0] && var.shape[1..] == shape[1..],
            "{ct2} {:?} (rows {rows:?}) does not give {hf} {shape:?}",
            var.shape
        );
        for name in [ct2.to_string(), format!("{ct2}_scale")] {
            self.used.extend(self.model.resolve(&name));
        }
        let planned = Planned {
            model: self.model,
            source: ct2.to_string(),
            rows,
            shape: shape.to_vec(),
            out: self.out,
        };
        self.tensors.push((hf, planned));
        Ok(())
    }

    fn linear(&mut self, hf: &str, ct2: &str, out_dim: usize, in_dim: usize) -> Result<()> {
        self.add(
            format!("{hf}.weight"),
            &format!("{ct2}/weight"),
            None,
            &[out_dim, in_dim],
        )?;
        self.add(
            format!("{hf}.bias"),
            &format!("{ct2}/bias"),
            None,
            &[out_dim],
        )
    }

    fn norm(&mut self, hf: &str, ct2: &str, d: usize) -> Result<()> {
        self.add(format!("{hf}.weight"), &format!("{ct2}/gamma"), None, &[d])?;
        self.add(format!("{hf}.bias"), &format!("{ct2}/beta"), None, &[d])
    }

    /// `parts` of the fused `ct2` linear, in order, each `d` rows: (HF projection, with bias).
    fn fused(&mut self, hf: &str, ct2: &str, parts: &[(&str, bool)], d: usize) -> Result<()> {
        let weight = self.model.require(&format!("{ct2}/weight"))?;
        ensure!(
            weight.shape.first() == Some(&(parts.len() * d)),
            "{ct2}/weight {:?}: expected {} fused rows",
            weight.shape,
            parts.len() * d
        );
        for (i, (proj, bias)) in parts.iter().enumerate() {
            let rows = i * d..(i + 1) * d;
            self.add(
                format!("{hf}.{proj}.weight"),
                &format!("{ct2}/weight"),
                Some(rows.clone()),
                &[d, d],
            )?;
            if *bias {
                self.add(
                    format!("{hf}.{proj}.bias"),
                    &format!("{ct2}/bias"),
                    Some(rows),
                    &[d],
                )?;
            }
        }
        Ok(())
    }

    fn layer_common(&mut self, hf: &str, ct2: &str, d: usize, ffn: usize) -> Result<()> {
        self.fused(
            &format!("{hf}.self_attn"),
            &format!("{ct2}/self_attention/linear_0"),
            &[("q_proj", true), ("k_proj", false), ("v_proj", true)],
            d,
        )?;
        self.linear(
            &format!("{hf}.self_attn.out_proj"),
            &format!("{ct2}/self_attention/linear_1"),
            d,
            d,
        )?;
        self.norm(
            &format!("{hf}.self_attn_layer_norm"),
            &format!("{ct2}/self_attention/layer_norm"),
            d,
        )?;
        self.linear(&format!("{hf}.fc1"), &format!("{ct2}/ffn/linear_0"), ffn, d)?;
        self.linear(&format!("{hf}.fc2"), &format!("{ct2}/ffn/linear_1"), d, ffn)?;
        self.norm(
            &format!("{hf}.final_layer_norm"),
            &format!("{ct2}/ffn/layer_norm"),
            d,
        )
    }
}

/// The architecture, from the variables' shapes and the spec's scalars (token fields are
/// HF's defaults until the caller sets them from the tokenizer).
fn infer_architecture(model: &Ct2Model) -> Result<WhisperConfig> {
    let shape = |name: &str| model.require(name).map(|v| v.shape.clone());
    let conv1 = shape("encoder/conv1/weight")?;
    ensure!(
        conv1.len() == 3,
        "encoder/conv1/weight {conv1:?} is not a conv1d weight"
    );
    let d_model = conv1[0];
    let count = |side: &str| {
        (0..)
            .take_while(|i| {
                model
                    .get(&format!("{side}/layer_{i}/ffn/linear_0/weight"))
                    .is_some()
            })
            .count()
    };
    let heads = |side: &str| -> Result<usize> {
        if let Some(h) = model.scalar(&format!("{side}/num_heads")) {
            return Ok(h as usize);
        }
        // Not stored: the sizes OpenAI released (tiny, base, small, medium, large).
        Ok(match d_model {
            384 => 6,
            512 => 8,
            768 => 12,
            1024 => 16,
            1280 => 20,
            _ => bail!("{side}/num_heads is not in model.bin and d_model {d_model} is no known Whisper size"),
        })
    };
    let config = WhisperConfig {
        vocab_size: shape("decoder/embeddings/weight")?[0],
        num_mel_bins: conv1[1],
        d_model,
        encoder_layers: count("encoder"),
        encoder_attention_heads: heads("encoder")?,
        encoder_ffn_dim: shape("encoder/layer_0/ffn/linear_0/weight")?[0],
        decoder_layers: count("decoder"),
        decoder_attention_heads: heads("decoder")?,
        decoder_ffn_dim: shape("decoder/layer_0/ffn/linear_0/weight")?[0],
        max_source_positions: shape("encoder/position_encodings/encodings")?[0],
        max_target_positions: shape("decoder/position_encodings/encodings")?[0],
        activation_function: "gelu".into(),
        scale_embedding: model.scalar("decoder/scale_embeddings").unwrap_or(0) != 0,
        eos_token_id: 50257,
        pad_token_id: 50257,
        bos_token_id: 50257,
        decoder_start_token_id: 50258,
        suppress_tokens: None,
        begin_suppress_tokens: None,
    };
    if let Some(activation) = model.scalar("decoder/activation") {
        ensure!(
            activation == 3,
            "decoder/activation is {activation}; Whisper uses GELU (3)"
        );
    }
    Ok(config)
}

/// Plans every HF tensor of the model (HF's names, `config`'s shapes) and checks that every
/// non-scalar variable of model.bin is used. Returns the tensors and whether the output
/// projection is tied to the embeddings.
fn plan_whisper<'a>(
    model: &'a Ct2Model,
    out: Out,
    config: &WhisperConfig,
) -> Result<(Vec<(String, Planned<'a>)>, bool)> {
    let (d, mels, vocab) = (config.d_model, config.num_mel_bins, config.vocab_size);
    let mut plan = Planner {
        model,
        out,
        tensors: Vec::new(),
        used: BTreeSet::new(),
    };
    let enc = "model.encoder";
    plan.add(
        format!("{enc}.conv1.weight"),
        "encoder/conv1/weight",
        None,
        &[d, mels, 3],
    )?;
    plan.add(
        format!("{enc}.conv1.bias"),
        "encoder/conv1/bias",
        None,
        &[d],
    )?;
    plan.add(
        format!("{enc}.conv2.weight"),
        "encoder/conv2/weight",
        None,
        &[d, d, 3],
    )?;
    plan.add(
        format!("{enc}.conv2.bias"),
        "encoder/conv2/bias",
        None,
        &[d],
    )?;
    let positions = [config.max_source_positions, d];
    plan.add(
        format!("{enc}.embed_positions.weight"),
        "encoder/position_encodings/encodings",
        None,
        &positions,
    )?;
    for i in 0..config.encoder_layers {
        plan.layer_common(
            &format!("{enc}.layers.{i}"),
            &format!("encoder/layer_{i}"),
            d,
            config.encoder_ffn_dim,
        )?;
    }
    plan.norm(&format!("{enc}.layer_norm"), "encoder/layer_norm", d)?;
    let dec = "model.decoder";
    plan.add(
        format!("{dec}.embed_tokens.weight"),
        "decoder/embeddings/weight",
        None,
        &[vocab, d],
    )?;
    let positions = [config.max_target_positions, d];
    plan.add(
        format!("{dec}.embed_positions.weight"),
        "decoder/position_encodings/encodings",
        None,
        &positions,
    )?;
    for i in 0..config.decoder_layers {
        let (hf, ct2) = (format!("{dec}.layers.{i}"), format!("decoder/layer_{i}"));
        plan.layer_common(&hf, &ct2, d, config.decoder_ffn_dim)?;
        plan.linear(
            &format!("{hf}.encoder_attn.q_proj"),
            &format!("{ct2}/attention/linear_0"),
            d,
            d,
        )?;
        let kv = [("k_proj", false), ("v_proj", true)];
        plan.fused(
            &format!("{hf}.encoder_attn"),
            &format!("{ct2}/attention/linear_1"),
            &kv,
            d,
        )?;
        plan.linear(
            &format!("{hf}.encoder_attn.out_proj"),
            &format!("{ct2}/attention/linear_2"),
            d,
            d,
        )?;
        plan.norm(
            &format!("{hf}.encoder_attn_layer_norm"),
            &format!("{ct2}/attention/layer_norm"),
            d,
        )?;
    }
    plan.norm(&format!("{dec}.layer_norm"), "decoder/layer_norm", d)?;
    // The output projection: an alias of the embeddings (tied), equal to them, or its own.
    let tied = match model.resolve("decoder/projection/weight") {
        None => true,
        Some(stored) if stored == "decoder/embeddings/weight" => true,
        Some(stored) => {
            let (proj, emb) = (
                &model.variables[&stored],
                model.require("decoder/embeddings/weight")?,
            );
            let equal = proj.dtype == emb.dtype && proj.shape == emb.shape && proj.data == emb.data;
            if equal {
                plan.used.insert(stored);
            } else {
                plan.add(
                    "proj_out.weight".into(),
                    "decoder/projection/weight",
                    None,
                    &[vocab, d],
                )?;
            }
            equal
        }
    };
    if let Some(bias) = model.get("decoder/projection/bias") {
        let zero = (0..bias.numel()).all(|i| bias.value(i) == 0.0);
        ensure!(
            zero,
            "decoder/projection/bias is not zero; HF Whisper has no output bias"
        );
        plan.used.extend(model.resolve("decoder/projection/bias"));
    }
    let unused: Vec<&String> = model
        .variables
        .iter()
        .filter(|(name, var)| !var.is_scalar() && !plan.used.contains(*name))
        .map(|(name, _)| name)
        .collect();
    ensure!(
        unused.is_empty(),
        "model.bin variables this converter does not map: {unused:?}"
    );
    Ok((plan.tensors, tied))
}

/// Converts the CTranslate2 Whisper directory `src` into an HF directory `dst`, written in a
/// staging directory beside `dst` and renamed into place when complete.
pub fn convert_to_hf(src: &Path, dst: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    check_destination(dst, options.overwrite)?;
    let model = read_model_bin(&src.join("model.bin"))?;
    ensure!(
        model.spec == "WhisperSpec",
        "{} holds a {:?} model, not WhisperSpec",
        src.display(),
        model.spec
    );
    ensure!(
        model.revision <= 3,
        "WhisperSpec revision {} is newer than this converter knows (3)",
        model.revision
    );
    let mut config = infer_architecture(&model)?;
    ensure!(
        config.encoder_layers > 0 && config.decoder_layers > 0,
        "no encoder/layer_0 or decoder/layer_0 in model.bin"
    );
    let specials = Specials::read(src, &config)?;
    specials.apply(&mut config);
    config.validate()?;

    let out = match options.dtype {
        OutputDType::F32 => Out::F32,
        OutputDType::F16 => Out::F16,
        OutputDType::BF16 => Out::BF16,
        OutputDType::Same => model
            .get("encoder/layer_norm/gamma")
            .and_then(|v| Out::of(v.dtype))
            .unwrap_or(Out::F32),
    };
    let (tensors, tied) = plan_whisper(&model, out, &config)?;
    let count = tensors.len();
    let parameters = tensors
        .iter()
        .map(|(_, t)| t.shape.iter().product::<usize>() as u64)
        .sum();
    let source_types: BTreeSet<&str> = model
        .variables
        .values()
        .filter(|v| !v.is_scalar())
        .map(|v| v.dtype.name())
        .collect();

    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let staging = Staging(sibling(dst, "convert")?);
    let _ = std::fs::remove_dir_all(&staging.0);
    std::fs::create_dir(&staging.0).with_context(|| format!("creating {}", staging.0.display()))?;
    let dir = staging.0.as_path();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), &dir.join("model.safetensors"))
        .context("writing model.safetensors")?;
    specials.write(dir, &config, tied, out.name())?;
    let mut bytes_written = 0;
    for entry in std::fs::read_dir(dir)? {
        bytes_written += entry?.metadata()?.len();
    }
    install(dir, dst, options.overwrite)?;
    Ok(ConvertReport {
        tensors: count,
        parameters,
        dtype: out.name().to_string(),
        source_dtype: source_types.into_iter().collect::<Vec<_>>().join("+"),
        bytes_written,
        tied_output: tied,
        config,
    })
}
