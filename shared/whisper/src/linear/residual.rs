//! Residual activations, for int8 layers whose inputs have outliers in most columns.
//!
//! LLM.int8 multiplies each outlier column (|x| > 6) in float. After the decoder's final
//! layer norm about 200-260 of whisper-base's 512 columns are over 6, so the logits projection
//! (51865 x 512) would be an int8 product of zeros plus a float product over most of the
//! weight, slower than the float projection. Here no column is set apart: each row is
//! quantised, then its rounding residual again with a step about 127 times finer, and both
//! passes go through one GEMM with their rows stacked. At a decoding step's few rows the
//! product costs what reading the weight costs, so the second pass is nearly free. The
//! activations carry about 14 bits, and what is left is the weight's own int8 rounding, as in
//! weight-only int8.

use tch::{Device, Kind, Tensor};

use super::int8::{quantize_symmetric_cpu, quantize_u7_cpu, quantize_with_scale, rescale};
use super::Int8Weight;
use crate::int8_gemm::int8_mm;

/// One pass of quantised rows.
struct QuantizedRows {
    /// int8 `[M, K]` (symmetric), or u8 levels in 0..127 for fbgemm.
    levels: Tensor,
    /// int32 `[M]`, with the u8 levels.
    zero_point: Option<Tensor>,
    /// f32 `[M, 1]`.
    row_scale: Tensor,
}

impl QuantizedRows {
    /// The float values the levels stand for.
    fn dequantize(&self) -> Tensor {
        let levels = self.levels.to_kind(Kind::Float);
        let centred = match &self.zero_point {
            Some(zero_point) => levels - zero_point.to_kind(Kind::Float).unsqueeze(1),
            None => levels,
        };
        centred * &self.row_scale
    }
}

impl Int8Weight {
    /// `x [M, in]` (f32, contiguous) times the weight's transpose, `[M, out]`, with residual
    /// activations; `None` if libtorch refused a step (the caller takes the one-pass product).
    pub(super) fn residual_product(&self, x: &Tensor) -> Option<Tensor> {
        let first = self.quantize_rows(x)?;
        let second = self.quantize_rows(&(x - first.dequantize()))?;
        let rows = x.size()[0];
        let levels = Tensor::cat(&[&first.levels, &second.levels], 0);
        let row_scale = Tensor::cat(&[&first.row_scale, &second.row_scale], 0);
        let acc = match (&first.zero_point, &second.zero_point, self.packed_weight()) {
            (Some(a), Some(b), Some(packed)) => packed.mm(&levels, &Tensor::cat(&[a, b], 0))?,
            (None, None, _) => int8_mm(&levels, &self.q_t()),
            _ => return None,
        };
        let y = if acc.device() == Device::Cpu {
            rescale(&acc, &row_scale, &self.scale)?
        } else {
            acc.to_kind(Kind::Float) * row_scale * self.scale.unsqueeze(0)
        };
        Some(y.narrow(0, 0, rows) + y.narrow(0, rows, rows))
    }

    /// Every column of `x` quantised per row, in the encoding of the layer's GEMM.
    fn quantize_rows(&self, x: &Tensor) -> Option<QuantizedRows> {
        if x.device() != Device::Cpu {
            let (levels, row_scale) = quantize_with_scale(x);
            return Some(QuantizedRows {
                levels,
                zero_point: None,
                row_scale,
            });
        }
        let fbgemm = self.fbgemm_weight().is_some();
        if fbgemm {
            let [levels, zero_point, row_scale, _, _] = quantize_u7_cpu(x, 0.0, 1)?;
            Some(QuantizedRows {
                levels,
                zero_point: Some(zero_point),
                row_scale,
            })
        } else {
            let [levels, row_scale, _, _] = quantize_symmetric_cpu(x, 0.0, 1)?;
            Some(QuantizedRows {
                levels,
                zero_point: None,
                row_scale,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Linear;
    use super::*;

    /// Inputs shaped like the decoder's final layer norm output: half the columns far over
    /// the outlier threshold.
    fn inputs(rows: i64, k: i64) -> Tensor {
        let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
        let _ = x.narrow(1, 0, k / 2).g_mul_scalar_(20.0);
        x
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }

    #[test]
    fn residual_activations_leave_only_the_weights_rounding() {
        tch::manual_seed(3);
        let w = Tensor::randn([300, 96], (Kind::Float, Device::Cpu)) * 0.05;
        let x = inputs(5, 96);
        let residual = Linear::int8_residual_from(&w);
        let one_pass = Linear::int8_from(&w, 0.0);
        // The reference: float activations times the int8 weight the layers hold.
        let dequantized = Linear::float_from(&Int8Weight::quantize(&w, 0.0).dequantize());
        tch::no_grad(|| {
            let exact = dequantized.forward(&x);
            let scale = max_abs(&exact);
            let residual_error = max_abs(&(residual.forward(&x) - &exact)) / scale;
            let one_pass_error = max_abs(&(one_pass.forward(&x) - &exact)) / scale;
            assert!(residual_error < 2e-4, "residual error {residual_error}");
            assert!(
                one_pass_error > 20.0 * residual_error,
                "one pass {one_pass_error} vs residual {residual_error}"
            );
        });
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        tch::manual_seed(4);
        let w = Tensor::randn([200, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let x = inputs(6, 64);
        let layer = Linear::int8_residual_from(&w);
        tch::no_grad(|| {
            let batch = layer.forward(&x);
            for row in 0..6 {
                let alone = layer.forward(&x.narrow(0, row, 1));
                assert!(
                    batch.narrow(0, row, 1).equal(&alone),
                    "row {row} differs alone"
                );
            }
        });
    }
}
