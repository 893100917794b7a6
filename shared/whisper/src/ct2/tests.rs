//! Conversion of a tiny synthetic CTranslate2 Whisper directory (d_model 8, 2 heads, 1 encoder
//! and 2 decoder layers, 20 tokens) with float16, float32, bfloat16 and int8 variables.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::reader::{f16_to_f32, f32_to_bf16, f32_to_f16, write_model_bin, Ct2DType};
use super::{convert_to_hf, ConvertOptions, OutputDType};
use crate::config::WhisperConfig;

const D: usize = 8;
const FFN: usize = 16;
const MELS: usize = 80;
const VOCAB: usize = 20;

type Vars = Vec<(String, Vec<usize>, Ct2DType, Vec<u8>)>;

/// The tiny model's variables, and each one's values as f32 (after dequantisation).
fn tiny_model() -> (Vars, BTreeMap<String, Vec<f32>>) {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("encoder/conv1/weight".into(), vec![D, MELS, 3]),
        ("encoder/conv1/bias".into(), vec![D]),
        ("encoder/conv2/weight".into(), vec![D, D, 3]),
        ("encoder/conv2/bias".into(), vec![D]),
        ("encoder/position_encodings/encodings".into(), vec![6, D]),
        ("decoder/embeddings/weight".into(), vec![VOCAB, D]),
        ("decoder/position_encodings/encodings".into(), vec![5, D]),
    ];
    let norm = |p: &str| {
        vec![
            (format!("{p}/gamma"), vec![D]),
            (format!("{p}/beta"), vec![D]),
        ]
    };
    let linear = |p: &str, o: usize, i: usize| {
        vec![
            (format!("{p}/weight"), vec![o, i]),
            (format!("{p}/bias"), vec![o]),
        ]
    };
    for side in ["encoder", "decoder"] {
        shapes.extend(norm(&format!("{side}/layer_norm")));
        for l in 0..if side == "encoder" { 1 } else { 2 } {
            let p = format!("{side}/layer_{l}");
            shapes.extend(linear(&format!("{p}/self_attention/linear_0"), 3 * D, D));
            shapes.extend(linear(&format!("{p}/self_attention/linear_1"), D, D));
            shapes.extend(norm(&format!("{p}/self_attention/layer_norm")));
            shapes.extend(linear(&format!("{p}/ffn/linear_0"), FFN, D));
            shapes.extend(linear(&format!("{p}/ffn/linear_1"), D, FFN));
            shapes.extend(norm(&format!("{p}/ffn/layer_norm")));
            if side == "decoder" {
                shapes.extend(linear(&format!("{p}/attention/linear_0"), D, D));
                shapes.extend(linear(&format!("{p}/attention/linear_1"), 2 * D, D));
                shapes.extend(linear(&format!("{p}/attention/linear_2"), D, D));
                shapes.extend(norm(&format!("{p}/attention/layer_norm")));
            }
        }
    }
    let mut vars = Vars::new();
    let mut values = BTreeMap::new();
    for (k, (name, shape)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        // Multiples of 1/8 in [-1.5, 2]: exact in every float type.
        let mut v: Vec<f32> = (0..n)
            .map(|i| ((k * 7 + i * 3) % 29) as f32 / 8.0 - 1.5)
            .collect();
        let (dtype, mut data): (Ct2DType, Vec<u8>) = match name.as_str() {
            "encoder/layer_0/self_attention/linear_0/weight" => (
                Ct2DType::F32,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            "decoder/layer_0/attention/linear_1/bias" => (
                Ct2DType::BF16,
                v.iter()
                    .flat_map(|x| f32_to_bf16(*x).to_le_bytes())
                    .collect(),
            ),
            "decoder/layer_1/ffn/linear_0/weight" => {
                let q: Vec<i8> = (0..n).map(|i| (i % 255) as i8).collect();
                let scale: Vec<f32> = (0..shape[0]).map(|r| [4.0, 0.5][r % 2]).collect();
                v = q
                    .iter()
                    .enumerate()
                    .map(|(i, q)| *q as f32 * (1.0 / scale[i / shape[1]]))
                    .collect();
                let scale_bytes = scale.iter().flat_map(|x| x.to_le_bytes()).collect();
                vars.push((
                    format!("{name}_scale"),
                    vec![shape[0]],
                    Ct2DType::F32,
                    scale_bytes,
                ));
                (Ct2DType::I8, q.iter().map(|q| *q as u8).collect())
            }
            _ => (
                Ct2DType::F16,
                v.iter()
                    .flat_map(|x| f32_to_f16(*x).to_le_bytes())
                    .collect(),
            ),
        };
        if name.ends_with("self_attention/linear_0/bias")
            || name.ends_with("/attention/linear_1/bias")
        {
            // The k block of a fused bias is zero, as CTranslate2's fuse_linear makes it.
            let k = if name.contains("self_attention") {
                D..2 * D
            } else {
                0..D
            };
            v[k.clone()].iter_mut().for_each(|x| *x = 0.0);
            data[k.start * dtype.size()..k.end * dtype.size()]
                .iter_mut()
                .for_each(|b| *b = 0);
        }
        vars.push((name.clone(), shape, dtype, data));
        values.insert(name, v);
    }
    let scalar = |name: &str, dtype, bytes: Vec<u8>| (name.to_string(), vec![], dtype, bytes);
    vars.push(scalar(
        "encoder/num_heads",
        Ct2DType::I16,
        2i16.to_le_bytes().to_vec(),
    ));
    vars.push(scalar(
        "decoder/num_heads",
        Ct2DType::I16,
        2i16.to_le_bytes().to_vec(),
    ));
    vars.push(scalar("decoder/activation", Ct2DType::I8, vec![3]));
    vars.push(scalar("decoder/scale_embeddings", Ct2DType::I8, vec![0]));
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    (vars, values)
}

fn tokens() -> Vec<&'static str> {
    let mut t = vec![
        "a",
        "b",
        "c",
        "d",
        "e",
        "f",
        "g",
        "\u{120}",
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|en|>",
        "<|zh|>",
    ];
    t.extend([
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
        "<|0.00|>",
        "<|0.02|>",
    ]);
    t
}

fn write_source(dir: &Path, vars: &Vars, aliases: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("model.bin"),
        write_model_bin("WhisperSpec", 3, vars, aliases),
    )
    .unwrap();
    let t = tokens();
    let vocab: serde_json::Map<String, Value> = t[..9]
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = (8..18)
        .map(|i| json!({"id": i, "content": t[i], "special": true, "normalized": false}))
        .collect();
    let tokenizer = json!({"added_tokens": added, "model": {"type": "BPE", "vocab": vocab, "merges": ["a b", ["c", "d"]]}});
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("vocabulary.txt"), t.join("\n") + "\n").unwrap();
    let config = json!({"lang_ids": [10, 11], "suppress_ids": [1, 2], "suppress_ids_begin": [7, 8], "alignment_heads": [[1, 0], [1, 1]]});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn as_f32(view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => data
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        other => panic!("unexpected {other:?}"),
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn converts_a_tiny_model_to_hf_names_and_values() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("ct2"), tmp.path().join("out/hf"));
    let (vars, values) = tiny_model();
    write_source(
        &src,
        &vars,
        &[("decoder/projection/weight", "decoder/embeddings/weight")],
    );
    let report = convert_to_hf(&src, &dst, &ConvertOptions::default()).unwrap();
    assert_eq!(
        (report.tensors, report.dtype.as_str(), report.tied_output),
        (74, "float32", true)
    );
    assert_eq!(report.source_dtype, "bfloat16+float16+float32+int8");
    assert_eq!(
        report.parameters,
        values.values().map(|v| v.len() as u64).sum::<u64>() - 5 * D as u64,
        "all but the k biases"
    );

    let bytes = std::fs::read(dst.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 74);
    assert!(st
        .names()
        .iter()
        .all(|n| !n.ends_with("k_proj.bias") && !n.starts_with("proj_out")));
    let get = |name: &str| as_f32(&st.tensor(name).unwrap());
    let rows =
        |name: &str, r: std::ops::Range<usize>| values[name][r.start * D..r.end * D].to_vec();
    let fused = "encoder/layer_0/self_attention/linear_0";
    assert_eq!(
        get("model.encoder.layers.0.self_attn.q_proj.weight"),
        rows(&format!("{fused}/weight"), 0..D)
    );
    assert_eq!(
        get("model.encoder.layers.0.self_attn.k_proj.weight"),
        rows(&format!("{fused}/weight"), D..2 * D)
    );
    assert_eq!(
        get("model.encoder.layers.0.self_attn.v_proj.weight"),
        rows(&format!("{fused}/weight"), 2 * D..3 * D)
    );
    assert_eq!(
        get("model.encoder.layers.0.self_attn.v_proj.bias"),
        values[&format!("{fused}/bias")][2 * D..].to_vec()
    );
    let cross = "decoder/layer_0/attention/linear_1";
    assert_eq!(
        get("model.decoder.layers.0.encoder_attn.k_proj.weight"),
        rows(&format!("{cross}/weight"), 0..D)
    );
    assert_eq!(
        get("model.decoder.layers.0.encoder_attn.v_proj.bias"),
        values[&format!("{cross}/bias")][D..].to_vec()
    );
    assert_eq!(
        get("model.decoder.layers.0.encoder_attn.q_proj.bias"),
        values["decoder/layer_0/attention/linear_0/bias"]
    );
    assert_eq!(
        get("model.decoder.layers.1.encoder_attn.out_proj.weight"),
        values["decoder/layer_1/attention/linear_2/weight"]
    );
    assert_eq!(
        get("model.decoder.layers.1.encoder_attn_layer_norm.weight"),
        values["decoder/layer_1/attention/layer_norm/gamma"]
    );
    assert_eq!(
        get("model.decoder.layers.1.fc1.weight"),
        values["decoder/layer_1/ffn/linear_0/weight"]
    );
    assert_eq!(
        get("model.decoder.layers.1.final_layer_norm.bias"),
        values["decoder/layer_1/ffn/layer_norm/beta"]
    );
    assert_eq!(
        get("model.encoder.layers.0.self_attn_layer_norm.bias"),
        values["encoder/layer_0/self_attention/layer_norm/beta"]
    );
    assert_eq!(
        get("model.encoder.layers.0.fc2.weight"),
        values["encoder/layer_0/ffn/linear_1/weight"]
    );
    assert_eq!(
        get("model.encoder.conv1.weight"),
        values["encoder/conv1/weight"]
    );
    assert_eq!(
        st.tensor("model.encoder.conv1.weight").unwrap().shape(),
        &[D, MELS, 3]
    );
    assert_eq!(
        get("model.encoder.embed_positions.weight"),
        values["encoder/position_encodings/encodings"]
    );
    assert_eq!(
        get("model.decoder.embed_tokens.weight"),
        values["decoder/embeddings/weight"]
    );
    assert_eq!(
        get("model.decoder.layer_norm.weight"),
        values["decoder/layer_norm/gamma"]
    );
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");

    let config = WhisperConfig::from_file(&dst.join("config.json")).unwrap();
    assert_eq!(
        (
            config.d_model,
            config.encoder_layers,
            config.decoder_layers,
            config.encoder_attention_heads
        ),
        (D, 1, 2, 2)
    );
    assert_eq!(
        (
            config.vocab_size,
            config.num_mel_bins,
            config.max_source_positions,
            config.max_target_positions
        ),
        (VOCAB, MELS, 6, 5)
    );
    assert_eq!(
        (
            config.eos_token_id,
            config.decoder_start_token_id,
            config.encoder_ffn_dim
        ),
        (8, 9, FFN)
    );
    let hf = read_json(&dst.join("config.json"));
    assert_eq!(
        (
            hf["model_type"].as_str(),
            hf["tie_word_embeddings"].as_bool()
        ),
        (Some("whisper"), Some(true))
    );
    let gen = read_json(&dst.join("generation_config.json"));
    assert_eq!(gen["lang_to_id"], json!({"<|en|>": 10, "<|zh|>": 11}));
    assert_eq!(
        gen["task_to_id"],
        json!({"transcribe": 13, "translate": 12})
    );
    assert_eq!(
        (
            gen["no_timestamps_token_id"].as_i64(),
            gen["prev_sot_token_id"].as_i64(),
            gen["max_length"].as_i64()
        ),
        (Some(17), Some(15), Some(5))
    );
    assert_eq!(
        (
            gen["suppress_tokens"].clone(),
            gen["begin_suppress_tokens"].clone()
        ),
        (json!([1, 2]), json!([7, 8]))
    );
    assert_eq!(gen["alignment_heads"], json!([[1, 0], [1, 1]]));
    assert_eq!(gen["forced_decoder_ids"], json!([[1, null], [2, 13]]));
    let tok = read_json(&dst.join("tokenizer_config.json"));
    assert_eq!(
        tok["additional_special_tokens"].as_array().unwrap().len(),
        9
    );
    assert_eq!(
        read_json(&dst.join("preprocessor_config.json"))["feature_size"],
        json!(MELS)
    );
    assert_eq!(
        std::fs::read_to_string(dst.join("merges.txt")).unwrap(),
        "#version: 0.2\na b\nc d\n"
    );
    assert_eq!(
        std::fs::read(dst.join("tokenizer.json")).unwrap(),
        std::fs::read(src.join("tokenizer.json")).unwrap()
    );
    // Nothing left beside the destination.
    assert_eq!(
        std::fs::read_dir(tmp.path().join("out")).unwrap().count(),
        1
    );
}

#[test]
fn keeps_or_converts_the_float_type() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ct2");
    let (vars, values) = tiny_model();
    write_source(
        &src,
        &vars,
        &[("decoder/projection/weight", "decoder/embeddings/weight")],
    );
    for (dtype, want) in [
        (OutputDType::Same, Dtype::F16),
        (OutputDType::F16, Dtype::F16),
        (OutputDType::BF16, Dtype::BF16),
    ] {
        let dst = tmp.path().join(format!("{dtype:?}"));
        convert_to_hf(
            &src,
            &dst,
            &ConvertOptions {
                dtype,
                overwrite: false,
            },
        )
        .unwrap();
        let bytes = std::fs::read(dst.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert!(
            st.tensors().iter().all(|(_, t)| t.dtype() == want),
            "{dtype:?}"
        );
        if want == Dtype::F16 {
            // float16 sources are copied bit for bit; others rounded.
            let (emb, src_emb) = (
                st.tensor("model.decoder.embed_tokens.weight").unwrap(),
                vars.iter()
                    .find(|v| v.0 == "decoder/embeddings/weight")
                    .unwrap(),
            );
            assert_eq!(emb.data(), &src_emb.3[..]);
            assert_eq!(
                as_f32(&st.tensor("model.decoder.layers.1.fc1.weight").unwrap()),
                values["decoder/layer_1/ffn/linear_0/weight"]
            );
        }
    }
}

#[test]
fn refuses_unknown_variables_and_occupied_destinations() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("ct2"), tmp.path().join("hf"));
    let (mut vars, _) = tiny_model();
    // An untied output projection is written as proj_out.weight.
    let mut projection = vars
        .iter()
        .find(|v| v.0 == "decoder/embeddings/weight")
        .unwrap()
        .clone();
    projection.0 = "decoder/projection/weight".into();
    projection.3[0] ^= 1;
    vars.push(projection);
    write_source(&src, &vars, &[]);
    let report = convert_to_hf(&src, &dst, &ConvertOptions::default()).unwrap();
    assert_eq!((report.tensors, report.tied_output), (75, false));
    assert_eq!(
        read_json(&dst.join("config.json"))["tie_word_embeddings"],
        json!(false)
    );

    let err = convert_to_hf(&src, &dst, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--force"), "{err}");
    convert_to_hf(
        &src,
        &dst,
        &ConvertOptions {
            overwrite: true,
            ..Default::default()
        },
    )
    .unwrap();

    vars.push((
        "encoder/mystery/weight".into(),
        vec![2],
        Ct2DType::F32,
        vec![0; 8],
    ));
    write_source(&src, &vars, &[]);
    let err = convert_to_hf(&src, &tmp.path().join("other"), &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder/mystery/weight"), "{err}");
    assert!(!tmp.path().join("other").exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "no staging directory left"
    );
}
