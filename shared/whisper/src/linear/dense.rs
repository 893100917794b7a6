//! Int8 layers whose inputs have outliers in a large share of their columns.
//!
//! LLM.int8 multiplies each outlier column (|x| over the threshold) in float and the rest in
//! int8. On speech, fc1 of whisper-base's encoder layers 4 and 5 gets outliers in 507 and 512
//! of its 512 input columns: an int8 product of near-zeros plus a float product over nearly
//! the whole weight, about twice a float layer's time. Past [`DENSE_SHARE`] of the columns the
//! whole product runs in float with the dequantised weight instead, which is also the more
//! precise of the two. With per-sample outliers each sample decides alone, so that a sample's
//! output does not depend on what it is batched with.

use tch::{Kind, Tensor};

use super::Int8Weight;

/// Share of the input columns with outliers above which the float product is cheaper: on an
/// AVX2 CPU a 1500x512x2048 layer took 18 ms in int8, 25 ms in f32, 27 ms in int8 with 128
/// outlier columns and 48 ms with 507 (`examples/int8_linear`).
pub const DENSE_SHARE: f64 = 0.25;

/// Rows from which a bfloat16 product pays for its conversions: an encoder window has 1500,
/// a decoding step one per hypothesis.
pub const BF16_MIN_ROWS: i64 = 256;

/// `x @ w_t` with both rounded to bfloat16 and the result back in float32: on a CPU with
/// AVX512-BF16 about 2.2 times faster than float32 at Whisper's shapes (a 1500x512x2048
/// product took 7.2 ms against 15.8 ms on 2 cores). LLM.int8 computes this part in the
/// model's half precision (fp16) on a GPU.
pub(super) fn bf16_product(x: &Tensor, w_t: &Tensor) -> Tensor {
    x.to_kind(Kind::BFloat16)
        .matmul(&w_t.to_kind(Kind::BFloat16))
        .to_kind(Kind::Float)
}

impl Int8Weight {
    /// Whether `outlier_columns` of `x`'s columns (`[M, in]`) call for the float product.
    pub(super) fn outliers_fill(&self, outlier_columns: i64, x: &Tensor) -> bool {
        outlier_columns as f64 > DENSE_SHARE * x.size()[1] as f64
    }

    /// `x [M, in]` (f32) times the dequantised weight's transpose.
    pub(super) fn dense_product(&self, x: &Tensor) -> Tensor {
        let w_t = self.q_t().to_kind(Kind::Float) * self.scale.unsqueeze(0);
        if self.bf16_float_part_for(x) {
            return bf16_product(x, &w_t);
        }
        x.matmul(&w_t)
    }

    /// Whether the float part of a product with `x` (`[M, in]`, or its outlier columns)
    /// runs in bfloat16: when asked, on the CPU, without a gradient, and for at least
    /// [`BF16_MIN_ROWS`] rows.
    pub(super) fn bf16_float_part_for(&self, x: &Tensor) -> bool {
        self.bf16_float_part
            && x.device() == tch::Device::Cpu
            && !x.requires_grad()
            && x.size()[0] >= BF16_MIN_ROWS
    }

    /// Per-sample outliers: the samples (`groups` of `x`'s rows each) whose own outliers fill
    /// the share go through the float product, the others through the int8 one. `None` when
    /// no sample does (the caller goes on as usual).
    pub(super) fn dense_samples_apart(&self, x: &Tensor, groups: i64) -> Option<Tensor> {
        let (rows, in_dim) = x.size2().ok()?;
        if rows % groups != 0 {
            return None;
        }
        let per_sample = [groups, rows / groups, in_dim];
        let counts = x
            .abs()
            .view(per_sample)
            .gt(self.outlier_threshold)
            .any_dim(1, false)
            .sum_dim_intlist(1, false, Kind::Int64);
        let dense = counts.gt(DENSE_SHARE * in_dim as f64);
        let dense_samples = dense.nonzero().squeeze_dim(1);
        let n_dense = dense_samples.size()[0];
        if n_dense == 0 {
            return None;
        }
        if n_dense == groups {
            return Some(self.dense_product(x));
        }
        let other_samples = dense.logical_not().nonzero().squeeze_dim(1);
        let by_sample = x.view(per_sample);
        let rows_of = |samples: &Tensor| by_sample.index_select(0, samples).reshape([-1, in_dim]);
        let dense_y = self.dense_product(&rows_of(&dense_samples));
        let other_y = self.int8_or_dense_product(&rows_of(&other_samples), groups - n_dense);
        let out_dim = dense_y.size()[1];
        let mut y = Tensor::empty([groups, rows / groups, out_dim], (Kind::Float, x.device()));
        let _ = y.index_copy_(0, &dense_samples, &dense_y.view([n_dense, -1, out_dim]));
        let _ = y.index_copy_(
            0,
            &other_samples,
            &other_y.view([groups - n_dense, -1, out_dim]),
        );
        Some(y.view([rows, out_dim]))
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::super::Linear;
    use super::*;

    fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    }

    /// `[1, rows, k]` activations with outliers (8.0) in the first `columns` columns.
    fn sample(rows: i64, k: i64, columns: i64) -> Tensor {
        let x = Tensor::randn([1, rows, k], (Kind::Float, Device::Cpu));
        let _ = x.narrow(2, 0, columns).fill_(8.0);
        x
    }

    #[test]
    fn outliers_in_most_columns_take_the_float_product() {
        tch::manual_seed(5);
        let w = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let layer = Linear::int8_from(&w, 6.0);
        let dequantized = Linear::float_from(&Int8Weight::quantize(&w, 6.0).dequantize());
        tch::no_grad(|| {
            // 40 of 64 columns: past the share, so no activation is quantised.
            let dense = sample(10, 64, 40);
            let error = relative_error(&layer.forward(&dense), &dequantized.forward(&dense));
            assert!(error < 1e-5, "dense input: {error}");
            // 4 of 64: the int8 product, with its activation rounding.
            let sparse = sample(10, 64, 4);
            let error = relative_error(&layer.forward(&sparse), &dequantized.forward(&sparse));
            assert!(error > 1e-4 && error < 0.05, "sparse input: {error}");
        });
    }

    #[test]
    fn per_sample_the_dense_samples_alone_take_the_float_product() {
        tch::manual_seed(6);
        let w = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let mut layer = Linear::int8_from(&w, 6.0);
        layer.set_per_sample_outliers(true);
        let samples = [sample(7, 64, 40), sample(7, 64, 3), sample(7, 64, 50)];
        let batch = Tensor::cat(&samples, 0);
        tch::no_grad(|| {
            let together = layer.forward(&batch);
            for (i, alone) in samples.iter().enumerate() {
                let error = relative_error(&together.narrow(0, i as i64, 1), &layer.forward(alone));
                assert!(error < 1e-5, "sample {i}: {error} from its result alone");
            }
        });
    }

    /// With the bfloat16 float part, a dense layer's large products stay within bfloat16
    /// rounding of the float32 ones, the outlier columns of a sparse one too, and products
    /// of fewer rows (decoding steps) are left as they were, bit for bit.
    #[test]
    fn bf16_float_part_applies_to_large_products_only() {
        tch::manual_seed(8);
        let w = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let plain = Linear::int8_from(&w, 6.0);
        let mut bf16 = Linear::int8_from(&w, 6.0);
        bf16.set_bf16_float_part(true);
        tch::no_grad(|| {
            for (rows, columns) in [(BF16_MIN_ROWS, 40), (BF16_MIN_ROWS, 4), (10, 40), (10, 4)] {
                let x = sample(rows, 64, columns);
                let (a, b) = (bf16.forward(&x), plain.forward(&x));
                let error = relative_error(&a, &b);
                if rows < BF16_MIN_ROWS {
                    assert_eq!(error, 0.0, "{rows} rows, {columns} outlier columns");
                } else {
                    assert!(
                        error > 0.0 && error < 1e-2,
                        "{rows} rows, {columns} outlier columns: {error}"
                    );
                }
            }
        });
    }
}
