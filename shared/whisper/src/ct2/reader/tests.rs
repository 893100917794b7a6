//! The reader on small model.bin files written here as model_spec.py writes them.

use super::*;

fn sample() -> Vec<u8> {
    write_model_bin(
        "WhisperSpec",
        3,
        &[
            (
                "decoder/embeddings/weight",
                vec![3, 2],
                Ct2DType::I8,
                vec![64, 0xc0, 64, 0, 1, 0xff],
            ),
            (
                "decoder/embeddings/weight_scale",
                vec![3],
                Ct2DType::F32,
                f32_bytes(&[64.0, 2.0, 0.5]),
            ),
            (
                "encoder/conv1/weight",
                vec![2, 1, 2],
                Ct2DType::F16,
                f16_bytes(&[1.0, -2.5, 0.125, 65504.0]),
            ),
            (
                "encoder/layer_norm/beta",
                vec![2],
                Ct2DType::BF16,
                vec![0x80, 0x3f, 0x00, 0xc0],
            ),
            (
                "encoder/layer_norm/gamma",
                vec![2],
                Ct2DType::F32,
                f32_bytes(&[0.5, 1.5]),
            ),
            (
                "encoder/num_heads",
                vec![],
                Ct2DType::I16,
                6i16.to_le_bytes().to_vec(),
            ),
            (
                "encoder/proj",
                vec![1, 2],
                Ct2DType::I16,
                [2048i16, -1024]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "encoder/proj_scale",
                vec![],
                Ct2DType::F32,
                f32_bytes(&[1024.0]),
            ),
        ],
        &[("decoder/projection/weight", "decoder/embeddings/weight")],
    )
}

#[test]
fn reads_variables_scalars_and_aliases() {
    let model = parse_model_bin(&sample()[..]).unwrap();
    assert_eq!(
        (model.binary_version, model.spec.as_str(), model.revision),
        (6, "WhisperSpec", 3)
    );
    assert_eq!(model.variables.len(), 8);
    assert_eq!(model.scalar("encoder/num_heads"), Some(6));
    let conv = model.require("encoder/conv1/weight").unwrap();
    assert_eq!(
        (conv.shape.clone(), conv.dtype),
        (vec![2, 1, 2], Ct2DType::F16)
    );
    assert_eq!(
        model.rows_f32("encoder/conv1/weight", 0..2),
        vec![1.0, -2.5, 0.125, 65504.0]
    );
    assert_eq!(
        model.rows_f32("encoder/layer_norm/beta", 0..2),
        vec![1.0, -2.0]
    );
    assert_eq!(model.rows_f32("encoder/layer_norm/gamma", 1..2), vec![1.5]);
    // The alias and its implicit scale alias.
    assert!(model.is_alias("decoder/projection/weight"));
    assert_eq!(
        model.resolve("decoder/projection/weight_scale").as_deref(),
        Some("decoder/embeddings/weight_scale")
    );
    model
        .check_float("decoder/projection/weight", &(0..3))
        .unwrap();
    // int8: q * (1 / scale) per row.
    assert_eq!(
        model.rows_f32("decoder/projection/weight", 0..3),
        vec![1.0, -1.0, 32.0, 0.0, 2.0, -2.0]
    );
    assert_eq!(
        model.rows_f32("decoder/embeddings/weight", 2..3),
        vec![2.0, -2.0]
    );
    // int16: one scale.
    model.check_float("encoder/proj", &(0..1)).unwrap();
    assert_eq!(model.rows_f32("encoder/proj", 0..1), vec![2.0, -1.0]);
    assert!(model.check_float("encoder/num_heads", &(0..1)).is_err());
    assert!(model.check_float("encoder/conv1/weight", &(0..3)).is_err());
}

#[test]
fn rejects_truncated_and_foreign_files() {
    let bytes = sample();
    for cut in [0, 3, 20, bytes.len() - 1] {
        assert!(parse_model_bin(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    assert!(parse_model_bin(&b"PK\x03\x04 not a model"[..]).is_err());
    let mut bad_size = write_model_bin(
        "S",
        1,
        &[("x", vec![2], Ct2DType::F32, f32_bytes(&[1.0]))],
        &[],
    );
    bad_size.extend([0u8; 8]);
    assert!(parse_model_bin(&bad_size[..])
        .unwrap_err()
        .to_string()
        .contains("bytes"));
    let dangling = write_model_bin::<&str>("S", 1, &[], &[("a", "b")]);
    assert!(parse_model_bin(&dangling[..]).is_err());
    let missing_scale = write_model_bin("S", 1, &[("w", vec![1, 1], Ct2DType::I8, vec![1])], &[]);
    let model = parse_model_bin(&missing_scale[..]).unwrap();
    assert!(model
        .check_float("w", &(0..1))
        .unwrap_err()
        .to_string()
        .contains("_scale"));
}

#[test]
fn reads_binary_version_3_item_sizes() {
    let mut bytes = Vec::new();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(2u16.to_le_bytes());
    bytes.extend(b"S\0");
    bytes.extend(1u32.to_le_bytes());
    bytes.extend(1u32.to_le_bytes());
    bytes.extend(2u16.to_le_bytes());
    bytes.extend(b"x\0");
    bytes.push(1);
    bytes.extend(2u32.to_le_bytes());
    bytes.push(4); // item size 4: float32
    bytes.extend(2u32.to_le_bytes()); // element count
    bytes.extend(f32_bytes(&[0.25, -4.0]));
    bytes.extend(0u32.to_le_bytes());
    let model = parse_model_bin(&bytes[..]).unwrap();
    assert_eq!(model.rows_f32("x", 0..2), vec![0.25, -4.0]);
}

#[test]
fn half_conversions_round_trip_and_round_to_even() {
    for h in 0..=u16::MAX {
        let f = f16_to_f32(h);
        if f.is_nan() {
            assert!(f16_to_f32(f32_to_f16(f)).is_nan());
        } else {
            assert_eq!(f32_to_f16(f), h, "{h:#06x} -> {f}");
        }
    }
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00); // tie -> even
    assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02); // tie -> even (up)
    assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000); // tie with 0 -> 0
    assert_eq!(f32_to_f16(1.5 * 2f32.powi(-25)), 0x0001);
    assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds to inf
    assert_eq!(f32_to_f16(65519.0), 0x7bff);
    assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
    assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    for h in [0x3f80u16, 0xc040, 0x0001, 0x7f7f] {
        assert_eq!(f32_to_bf16(bf16_to_f32(h)), h);
    }
}
