//! The int8 weight of a linear layer and its products: LLM.int8's split (outlier columns in
//! float, the rest through the int8 GEMM after per-row activation quantisation), the fused
//! C++ passes over the activations, fbgemm's packed GEMM, and the gradient through the layer.

use tch::{Device, Kind, Tensor};

use crate::int8_gemm::{cpu_int8_gemm, int8_mm, CpuInt8Gemm, PackedInt8Weight};

/// A weight `[out, in]` as int8 with per-output-channel scales: `w ≈ q * scale[out]`.
#[derive(Debug)]
pub struct Int8Weight {
    /// The int8 values, `[in, out]`.
    pub(super) storage: Int8Storage,
    /// f32 `[out]`.
    pub(super) scale: Tensor,
    pub(super) outlier_threshold: f64,
    pub(super) compute: Int8Compute,
    /// Outlier columns chosen per sample of a batch (`[B, T, in]` inputs) rather than over
    /// all rows as bitsandbytes does, so that a sample's output does not depend on what it is
    /// batched with.
    pub(super) per_sample_outliers: bool,
    /// bitsandbytes' symmetric 8-bit activations on every CPU, not fbgemm's 7-bit ones (see
    /// [`Linear::set_symmetric_int8`]).
    pub(super) symmetric_activations: bool,
    /// Activations in two quantised passes, the value then its rounding residual, and no
    /// outlier columns (see the `residual` module): for inputs with outliers in most columns.
    pub(super) residual_activations: bool,
    /// The float part (outlier columns, dense layers) of large CPU products in bfloat16 (see
    /// [`Linear::set_bf16_float_part`]).
    pub(super) bf16_float_part: bool,
}

/// Where an int8 weight's values live: one copy, in the layout of the GEMM that uses them.
#[derive(Debug)]
pub(super) enum Int8Storage {
    /// int8 `[in, out]`, the second operand of `_int_mm` (and of the exact float32 GEMM).
    Plain(Tensor),
    /// Packed for fbgemm, on CPUs where it is the chosen GEMM (see int8_gemm.rs); the rare
    /// users of the plain matrix (dequantisation) unpack it.
    Packed(PackedInt8Weight),
}

impl Int8Storage {
    /// CPU values `[in, out]`, packed where fbgemm is the chosen GEMM and takes them.
    fn for_fbgemm(q_t: Tensor) -> Self {
        let packed = (cpu_int8_gemm() == CpuInt8Gemm::Fbgemm)
            .then(|| PackedInt8Weight::pack(&q_t))
            .flatten();
        match packed {
            Some(packed) => Self::Packed(packed),
            None => Self::Plain(q_t),
        }
    }
}

/// How an int8 layer multiplies (its storage stays int8 either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Int8Compute {
    /// LLM.int8: the int8 GEMM after dynamic per-row activation quantisation, outlier
    /// columns in float; the gradient crosses the layer in float32.
    #[default]
    Int8Gemm,
    /// The weight dequantised to this kind for each product (QLoRA's "compute dtype"): on a
    /// CPU with AVX512-BF16, bfloat16 products in both directions cost less than the int8
    /// path's quantisation passes over the activations.
    Dequantized(Kind),
}

impl Int8Weight {
    /// Symmetric per-row absmax quantisation of a float weight `[out, in]`.
    pub fn quantize(weight: &Tensor, outlier_threshold: f64) -> Self {
        let (q, scale) = quantize_with_scale(weight);
        Self::from_parts(&q, scale.squeeze_dim(1), outlier_threshold)
    }

    /// A weight stored quantised, in bitsandbytes' serialisation: int8 `q [out, in]` and
    /// `SCB [out]`, each row's absolute maximum (`w ≈ q * SCB / 127`).
    pub fn from_stored(q: &Tensor, absmax: &Tensor, outlier_threshold: f64) -> Self {
        let scale = (absmax.to_kind(Kind::Float) / 127.0).clamp_min(1e-12);
        Self::from_parts(q, scale, outlier_threshold)
    }

    /// int8 `q [out, in]` and the f32 scale of each row `[out]`.
    fn from_parts(q: &Tensor, scale: Tensor, outlier_threshold: f64) -> Self {
        // `[in, out]`: row-major on the CPU; on CUDA the transposed view of `[out, in]`
        // (column-major), since cuBLASLt's int8 kernels only take that (TN) layout.
        let storage = if q.device() != Device::Cpu {
            Int8Storage::Plain(q.contiguous().tr())
        } else {
            Int8Storage::for_fbgemm(q.tr().contiguous())
        };
        Self {
            storage,
            scale,
            outlier_threshold,
            compute: Int8Compute::default(),
            per_sample_outliers: false,
            symmetric_activations: false,
            residual_activations: false,
            bf16_float_part: false,
        }
    }

    /// The float weight `[out, in]` this one stands for.
    pub fn dequantize(&self) -> Tensor {
        self.q_t().tr().to_kind(Kind::Float) * self.scale.unsqueeze(1)
    }

    /// bitsandbytes' symmetric 8-bit activations (`on`) or the CPU's fast GEMM. The values
    /// move to the layout of the GEMM that will use them: plain for the symmetric product
    /// (which would otherwise unpack the weight on every call), packed for fbgemm.
    pub(super) fn set_symmetric_activations(&mut self, on: bool) {
        self.symmetric_activations = on;
        let storage = std::mem::replace(&mut self.storage, Int8Storage::Plain(Tensor::new()));
        self.storage = match storage {
            Int8Storage::Packed(packed) if on => match packed.unpack() {
                Some(q_t) => Int8Storage::Plain(q_t),
                None => Int8Storage::Packed(packed),
            },
            Int8Storage::Plain(q_t) if !on && q_t.device() == Device::Cpu => {
                Int8Storage::for_fbgemm(q_t)
            }
            unchanged => unchanged,
        };
    }

    /// The int8 values `[in, out]` as a plain tensor (unpacked for each call when packed).
    pub(super) fn q_t(&self) -> Tensor {
        match &self.storage {
            Int8Storage::Plain(q_t) => q_t.shallow_clone(),
            // The only failure is libtorch's allocation of the result.
            Int8Storage::Packed(packed) => packed.unpack().expect("unpacking an int8 weight"),
        }
    }

    /// Rows `columns` of the values (the outlier columns' inputs), int8 `[C, out]`.
    fn q_t_rows(&self, columns: &Tensor) -> Tensor {
        match &self.storage {
            Int8Storage::Plain(q_t) => q_t.index_select(0, columns),
            // The columns come from the activations' own width, which the layer checked.
            Int8Storage::Packed(packed) => packed.rows(columns).expect("outlier rows in range"),
        }
    }

    /// The packed values, where fbgemm is the layer's GEMM.
    pub(super) fn packed_weight(&self) -> Option<&PackedInt8Weight> {
        match &self.storage {
            Int8Storage::Packed(packed) => Some(packed),
            Int8Storage::Plain(_) => None,
        }
    }

    /// The packed values when fbgemm's 7-bit product is this layer's CPU GEMM (not under
    /// training's symmetric activations).
    pub(super) fn fbgemm_weight(&self) -> Option<&PackedInt8Weight> {
        if cpu_int8_gemm() == CpuInt8Gemm::Fbgemm && !self.symmetric_activations {
            self.packed_weight()
        } else {
            None
        }
    }

    /// `x [M, in]` (float) times the weight's transpose, `[M, out]` in float32. In-place steps
    /// keep the temporaries to about three activation-sized tensors.
    #[cfg(test)]
    fn matmul_t(&self, x: &Tensor) -> Tensor {
        self.matmul_t_grouped(x, 1)
    }

    /// [`Self::matmul_t`] with `x`'s rows in `groups` consecutive samples, each with its own
    /// outlier columns (1: one set over all rows, LLM.int8's rule).
    pub(super) fn matmul_t_grouped(&self, x: &Tensor, groups: i64) -> Tensor {
        let x = x.to_kind(Kind::Float);
        if self.residual_activations {
            if let Some(y) = self.residual_product(&x.contiguous()) {
                return y;
            }
        }
        if groups > 1 && self.outlier_threshold > 0.0 {
            if let Some(y) = self.dense_samples_apart(&x, groups) {
                return y;
            }
        }
        self.int8_or_dense_product(&x, groups)
    }

    /// [`Self::matmul_t_grouped`] once dense samples are set apart: the int8 product, or
    /// with `groups == 1` the float one when outliers fill over [`dense::DENSE_SHARE`] of the
    /// columns.
    pub(super) fn int8_or_dense_product(&self, x: &Tensor, groups: i64) -> Tensor {
        if x.device() == Device::Cpu {
            if let Some(y) = self.fused_cpu_product(&x.contiguous(), groups) {
                return y;
            }
        }
        self.aten_product(x, groups)
    }

    /// [`Self::matmul_t_grouped`] with ATen ops alone: on CUDA, and the reference the fused
    /// CPU kernels are tested against.
    fn aten_product(&self, x: &Tensor, groups: i64) -> Tensor {
        let split = if groups > 1 && self.outlier_threshold > 0.0 {
            self.split_per_sample(x, groups)
        } else {
            self.split_shared(x)
        };
        if groups == 1 && self.outliers_fill(split.outlier_count(), x) {
            return self.dense_product(x);
        }
        self.int8_product(split)
    }

    /// LLM.int8's rule: one set of outlier columns over all rows.
    fn split_shared(&self, x: &Tensor) -> OutlierSplit {
        let mut magnitude = x.abs();
        let columns = (self.outlier_threshold > 0.0)
            .then(|| {
                magnitude
                    .gt(self.outlier_threshold)
                    .any_dim(0, false)
                    .nonzero()
                    .squeeze_dim(1)
            })
            .filter(|columns| columns.size()[0] > 0);
        match columns {
            Some(columns) => {
                let _ = magnitude.index_fill_(1, &columns, 0.0);
                let own = x.index_select(1, &columns);
                OutlierSplit {
                    regular: x.index_fill(1, &columns, 0.0),
                    magnitude,
                    outliers: Some((columns, own)),
                }
            }
            None => OutlierSplit {
                regular: x.shallow_clone(),
                magnitude,
                outliers: None,
            },
        }
    }

    /// Per-sample outliers: sample `b`'s rows get int8 products on every column but its own
    /// outlier columns, and float products on those, as if it were alone. The float part runs
    /// over the union of the samples' outlier columns with the others' values zeroed.
    fn split_per_sample(&self, x: &Tensor, groups: i64) -> OutlierSplit {
        let (m, in_dim) = x.size2().unwrap_or((x.size()[0], x.size()[1]));
        let shape = [groups, m / groups, in_dim];
        let magnitude = x.abs();
        let mask = magnitude
            .view(shape)
            .gt(self.outlier_threshold)
            .any_dim(1, true);
        if mask.any().int64_value(&[]) == 0 {
            return OutlierSplit {
                regular: x.shallow_clone(),
                magnitude,
                outliers: None,
            };
        }
        let full = mask.expand(shape, false);
        let _ = magnitude.view(shape).masked_fill_(&full, 0.0);
        let columns = mask
            .any_dim(0, false)
            .view([in_dim])
            .nonzero()
            .squeeze_dim(1);
        let own = x
            .view(shape)
            .masked_fill(&full.logical_not(), 0.0)
            .view([m, in_dim])
            .index_select(1, &columns);
        OutlierSplit {
            regular: x.view(shape).masked_fill(&full, 0.0).view([m, in_dim]),
            magnitude,
            outliers: Some((columns, own)),
        }
    }

    /// The int8 GEMM of the regular part (per-row absmax quantisation) plus the outlier
    /// columns in float: `own @ (q[:, cols] * scale)^T`.
    fn int8_product(&self, split: OutlierSplit) -> Tensor {
        let OutlierSplit {
            regular,
            magnitude,
            outliers,
        } = split;
        let row_scale = (magnitude.amax([1], true) / 127.0).clamp_min(1e-12);
        drop(magnitude);
        let mut scaled = &regular / &row_scale;
        drop(regular);
        let _ = scaled.round_().clamp_(-127.0, 127.0);
        let xq = scaled.to_kind(Kind::Int8);
        drop(scaled);
        let mut y = int8_mm(&xq, &self.q_t()).to_kind(Kind::Float);
        drop(xq);
        y *= &row_scale;
        y *= self.scale.unsqueeze(0);
        if let Some((columns, own)) = outliers {
            let w_cols = self.q_t_rows(&columns).to_kind(Kind::Float) * self.scale.unsqueeze(0);
            y += own.matmul(&w_cols);
        }
        y
    }
}

impl Int8Weight {
    /// The CPU product with the passes over the activations fused in C++: through fbgemm
    /// where it is the chosen GEMM ([`Self::fbgemm_product`]), else [`Self::fused_product`].
    /// `None` (and the error on stderr) if libtorch refused, so the caller falls back to the
    /// ATen path.
    fn fused_cpu_product(&self, x: &Tensor, groups: i64) -> Option<Tensor> {
        let rows = x.size()[0];
        if groups < 1 || rows % groups != 0 {
            return None;
        }
        match self.fbgemm_weight() {
            Some(packed) => self.fbgemm_product(packed, x, groups),
            None => self.fused_product(x, groups),
        }
    }

    /// The same product as [`Self::aten_product`], bit for bit, with the passes over the
    /// activations fused in C++ (csrc/int8_quant.cpp): outlier columns and row quantisation in
    /// two passes, the int32 -> float rescaling in one.
    fn fused_product(&self, x: &Tensor, groups: i64) -> Option<Tensor> {
        let [xq, row_scale, columns, own] =
            quantize_symmetric_cpu(x, self.outlier_threshold, groups)?;
        if groups == 1 && self.outliers_fill(columns.size()[0], x) {
            return Some(self.dense_product(x));
        }
        let acc = int8_mm(&xq, &self.q_t());
        let y = rescale(&acc, &row_scale, &self.scale)?;
        Some(self.add_outlier_columns(y, &columns, &own))
    }

    /// The fused product with 7-bit activations through fbgemm (see int8_gemm.rs): the same
    /// outlier columns in float, the regular part quantised per row to 0..127 with a zero
    /// point, `(q - zero_point) * row_scale` standing for the activations.
    fn fbgemm_product(&self, packed: &PackedInt8Weight, x: &Tensor, groups: i64) -> Option<Tensor> {
        let [xq, zero_point, row_scale, columns, own] =
            quantize_u7_cpu(x, self.outlier_threshold, groups)?;
        if groups == 1 && self.outliers_fill(columns.size()[0], x) {
            return Some(self.dense_product(x));
        }
        let acc = packed.mm(&xq, &zero_point)?;
        let y = rescale(&acc, &row_scale, &self.scale)?;
        Some(self.add_outlier_columns(y, &columns, &own))
    }

    /// `y + own @ (q[:, columns] * scale)^T`, the float product of the outlier columns.
    fn add_outlier_columns(&self, mut y: Tensor, columns: &Tensor, own: &Tensor) -> Tensor {
        if columns.size()[0] > 0 {
            let w_cols = self.q_t_rows(columns).to_kind(Kind::Float) * self.scale.unsqueeze(0);
            if self.bf16_float_part_for(own) {
                y += super::dense::bf16_product(own, &w_cols);
                return y;
            }
            // A product then a sum, not addmm_: addmm_ rounds differently, and these bits
            // are the ones the int8 CER tests and benchmarks were measured with.
            y += own.matmul(&w_cols);
        }
        y
    }
}

/// `(float(acc) * row_scale) * col_scale` in C++ (csrc/int8_quant.cpp); `None` if refused.
pub(super) fn rescale(acc: &Tensor, row_scale: &Tensor, col_scale: &Tensor) -> Option<Tensor> {
    // SAFETY: live tensors for the call; the result is a new heap tensor or null.
    unsafe {
        let y = asr_int8_rescale(
            acc.as_ptr() as *mut _,
            row_scale.as_ptr() as *mut _,
            col_scale.as_ptr() as *mut _,
        );
        (!y.is_null()).then(|| Tensor::from_ptr(y))
    }
}

/// csrc/int8_quant.cpp's symmetric quantisation of `x` (f32 `[M, K]`, contiguous, CPU):
/// int8 levels `[M, K]`, row scales `[M, 1]`, outlier columns `[C]` and the rows' own outlier
/// values `[M, C]`; `None` (the error on stderr) if libtorch refused.
pub(super) fn quantize_symmetric_cpu(
    x: &Tensor,
    threshold: f64,
    groups: i64,
) -> Option<[Tensor; 4]> {
    let mut out: [*mut torch_sys::C_tensor; 4] = [std::ptr::null_mut(); 4];
    let [a, b, c, d] = &mut out;
    // SAFETY: `x` is a live tensor for the call; on success the C++ side stores four new heap
    // tensors in `out`, each then owned by one `Tensor`.
    unsafe {
        if asr_int8_quantize(x.as_ptr() as *mut _, threshold, groups, a, b, c, d) != 0 {
            return None;
        }
        Some(out.map(|t| Tensor::from_ptr(t)))
    }
}

/// [`quantize_symmetric_cpu`] with 7-bit levels (u8 in 0..127) and a zero point per row
/// (int32 `[M]`, second), for fbgemm.
pub(super) fn quantize_u7_cpu(x: &Tensor, threshold: f64, groups: i64) -> Option<[Tensor; 5]> {
    let mut out: [*mut torch_sys::C_tensor; 5] = [std::ptr::null_mut(); 5];
    let [a, b, c, d, e] = &mut out;
    // SAFETY: as in `quantize_symmetric_cpu`, with five output tensors.
    unsafe {
        if asr_int8_quantize_u7(x.as_ptr() as *mut _, threshold, groups, a, b, c, d, e) != 0 {
            return None;
        }
        Some(out.map(|t| Tensor::from_ptr(t)))
    }
}

/// Activations split for LLM.int8: the regular values (outlier columns zeroed), their
/// magnitudes for the row scales (likewise), and the outlier columns with their values.
struct OutlierSplit {
    regular: Tensor,
    magnitude: Tensor,
    outliers: Option<(Tensor, Tensor)>,
}

impl OutlierSplit {
    fn outlier_count(&self) -> i64 {
        self.outliers
            .as_ref()
            .map_or(0, |(columns, _)| columns.size()[0])
    }
}

extern "C" {
    /// csrc/int8_quant.cpp: `x` f32 `[M, K]` (contiguous, CPU) -> int8 `[M, K]`, row scales
    /// `[M, 1]`, outlier columns `[C]` and the rows' own outlier values `[M, C]`; 0 on success.
    fn asr_int8_quantize(
        x: *mut torch_sys::C_tensor,
        threshold: f64,
        groups: i64,
        xq: *mut *mut torch_sys::C_tensor,
        row_scale: *mut *mut torch_sys::C_tensor,
        columns: *mut *mut torch_sys::C_tensor,
        own: *mut *mut torch_sys::C_tensor,
    ) -> i32;

    /// csrc/int8_quant.cpp: [`asr_int8_quantize`] with 7-bit levels (u8 `[M, K]` in 0..127)
    /// and a zero point per row (int32 `[M]`) after them.
    fn asr_int8_quantize_u7(
        x: *mut torch_sys::C_tensor,
        threshold: f64,
        groups: i64,
        xq: *mut *mut torch_sys::C_tensor,
        zero_point: *mut *mut torch_sys::C_tensor,
        row_scale: *mut *mut torch_sys::C_tensor,
        columns: *mut *mut torch_sys::C_tensor,
        own: *mut *mut torch_sys::C_tensor,
    ) -> i32;

    /// csrc/int8_quant.cpp: `(float(acc) * row_scale) * col_scale`, or null.
    fn asr_int8_rescale(
        acc: *mut torch_sys::C_tensor,
        row_scale: *mut torch_sys::C_tensor,
        col_scale: *mut torch_sys::C_tensor,
    ) -> *mut torch_sys::C_tensor;

    /// csrc/int8_grad.cpp: `y` passed through, with dL/dx = dL/dy @ (q * scale)^T.
    fn asr_int8_linear_grad(
        x: *mut torch_sys::C_tensor,
        y: *mut torch_sys::C_tensor,
        q_t: *mut torch_sys::C_tensor,
        scale: *mut torch_sys::C_tensor,
    ) -> *mut torch_sys::C_tensor;
}

impl Int8Weight {
    /// [`Self::matmul_t`], differentiable with respect to `x` when `x` needs a gradient (an
    /// adapter below this layer trains).
    pub(super) fn matmul_t_with_grad(&self, x: &Tensor, groups: i64) -> Tensor {
        if let Int8Compute::Dequantized(kind) = self.compute {
            let w_t = tch::no_grad(|| {
                (self.q_t().to_kind(Kind::Float) * self.scale.unsqueeze(0)).to_kind(kind)
            });
            return x.to_kind(kind).matmul(&w_t).to_kind(Kind::Float);
        }
        let y = tch::no_grad(|| self.matmul_t_grouped(x, groups));
        if !x.requires_grad() {
            return y;
        }
        // Kept by the autograd Function for the backward pass (an unpacked copy when packed).
        let q_t = self.q_t();
        // SAFETY: the four pointers are live tensors for the call; the C++ side returns a new
        // heap tensor (owned by the returned `Tensor`) or null on a libtorch error.
        let out = unsafe {
            asr_int8_linear_grad(
                x.as_ptr() as *mut _,
                y.as_ptr() as *mut _,
                q_t.as_ptr() as *mut _,
                self.scale.as_ptr() as *mut _,
            )
        };
        if out.is_null() {
            // Reported on stderr by the C++ side; the output stays right, only without a
            // gradient path.
            return y;
        }
        // SAFETY: a non-null pointer from `new torch::Tensor`.
        unsafe { Tensor::from_ptr(out) }
    }
}

/// Symmetric per-row absmax quantisation of a float weight `[out, in]`: int8 `q` and each
/// row's absolute maximum (bitsandbytes' `SCB`), `w ≈ q * absmax / 127`.
pub fn quantize_rows(weight: &Tensor) -> (Tensor, Tensor) {
    let (q, scale) = quantize_with_scale(weight);
    (q, (scale * 127.0).squeeze_dim(1))
}

/// int8 `q [out, in]` and the scale `[out, 1]` with `w ≈ q * scale`.
pub(super) fn quantize_with_scale(weight: &Tensor) -> (Tensor, Tensor) {
    let weight = weight.to_kind(Kind::Float);
    let scale = (weight.abs().amax([1], true) / 127.0).clamp_min(1e-12);
    let q = (&weight / &scale)
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (q, scale)
}

#[cfg(test)]
mod tests {
    use super::super::DEFAULT_OUTLIER_THRESHOLD;
    use super::*;

    #[test]
    fn int8_matmul_is_close_to_float() {
        tch::manual_seed(0);
        let w = Tensor::randn([64, 96], (Kind::Float, Device::Cpu)) * 0.05;
        let x = Tensor::randn([5, 96], (Kind::Float, Device::Cpu));
        let exact = x.matmul(&w.tr());
        let q = Int8Weight::quantize(&w, DEFAULT_OUTLIER_THRESHOLD);
        let approx = q.matmul_t(&x);
        let rel = ((&approx - &exact).norm().double_value(&[])) / exact.norm().double_value(&[]);
        assert!(rel < 0.02, "relative error {rel}");
        let deq = (q.dequantize() - &w).abs().max().double_value(&[]);
        assert!(
            deq < 0.05 / 127.0 * 4.0 + 1e-6,
            "dequantisation error {deq}"
        );
    }

    #[test]
    fn gradients_pass_through_int8_layers() {
        tch::manual_seed(2);
        let w = Tensor::randn([32, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let q = Int8Weight::quantize(&w, DEFAULT_OUTLIER_THRESHOLD);
        let x = Tensor::randn([5, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let upstream = Tensor::randn([5, 32], (Kind::Float, Device::Cpu));
        let y = q.matmul_t_with_grad(&x, 1);
        assert!(y.requires_grad());
        (&y * &upstream).sum(Kind::Float).backward();
        let expected = upstream.matmul(&q.dequantize());
        let err = (x.grad() - expected).abs().max().double_value(&[]);
        assert!(err < 1e-5, "input gradient off by {err}");
        // Without a gradient to carry, no graph is built.
        let plain = Tensor::randn([5, 64], (Kind::Float, Device::Cpu));
        assert!(!q.matmul_t_with_grad(&plain, 1).requires_grad());
    }

    #[test]
    fn outlier_columns_go_through_float() {
        tch::manual_seed(1);
        let w = Tensor::randn([32, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let x = Tensor::randn([4, 64], (Kind::Float, Device::Cpu)) * 0.5;
        let _ = x.get(0).get(3).fill_(40.0);
        let exact = x.matmul(&w.tr());
        let with_outliers = Int8Weight::quantize(&w, 6.0).matmul_t(&x);
        let without = Int8Weight::quantize(&w, 0.0).matmul_t(&x);
        let err =
            |y: &Tensor| (y - &exact).norm().double_value(&[]) / exact.norm().double_value(&[]);
        assert!(
            err(&with_outliers) < err(&without),
            "outlier handling should help"
        );
        assert!(err(&with_outliers) < 0.02);
    }

    #[test]
    fn per_sample_outliers_make_a_batch_invariant() {
        tch::manual_seed(11);
        let w = Tensor::randn([16, 32], (Kind::Float, Device::Cpu)) * 0.1;
        let mut q = Int8Weight::quantize(&w, 6.0);
        q.per_sample_outliers = true;
        let a = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
        // Different outlier columns in the two samples.
        let _ = a.get(0).get(2).fill_(9.0);
        let _ = b.get(1).get(7).fill_(-12.0);
        let batched = q.matmul_t_grouped(&Tensor::cat(&[&a, &b], 0), 2);
        let alone = Tensor::cat(&[q.matmul_t(&a), q.matmul_t(&b)], 0);
        let diff = (&batched - &alone).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "per-sample batch differs from alone by {diff}");
        // LLM.int8's rule (one set over the batch) does depend on the neighbour.
        let union = q.matmul_t(&Tensor::cat(&[&a, &b], 0));
        let shared = (&union - &alone).abs().max().double_value(&[]);
        assert!(
            shared > 1e-4,
            "expected the shared outlier set to change the output"
        );
    }

    #[test]
    fn fused_cpu_kernels_give_the_aten_path_bit_for_bit() {
        tch::manual_seed(5);
        let w = Tensor::randn([48, 80], (Kind::Float, Device::Cpu)) * 0.05;
        // Whisper-like activations: mostly small, a few columns far above the threshold, a
        // zero row (the 1e-12 scale floor) and exact .5 quotients (rounding half to even).
        let x = Tensor::randn([12, 80], (Kind::Float, Device::Cpu)) * 2.0;
        let _ = x.get(1).get(5).fill_(30.0);
        let _ = x.get(7).get(60).fill_(-9.5);
        let _ = x.get(4).fill_(0.0);
        x.get(9)
            .copy_(&(Tensor::arange(80, (Kind::Float, Device::Cpu)) * 0.5 - 20.0));
        // The ramp puts most columns over 6.0 (the float product, `dense`, at groups 1); a
        // quarter of it keeps the int8 product with two outlier columns.
        let sparse = x.copy();
        let _ = sparse.get(9).g_mul_scalar_(0.25);
        for (input, x) in [("ramp", &x), ("quarter ramp", &sparse)] {
            for threshold in [6.0, 0.0, 100.0] {
                let q = Int8Weight::quantize(&w, threshold);
                for groups in [1, 2, 3, 12] {
                    let fused = q.fused_product(x, groups).expect("the fused kernels ran");
                    let aten = q.aten_product(x, groups);
                    assert!(
                        fused.equal(&aten),
                        "{input}, threshold {threshold}, groups {groups}: fused differs from ATen by {}",
                        (&fused - &aten).abs().max().double_value(&[])
                    );
                }
            }
        }
        // Rows not divisible into the groups: refused, for the caller's ATen path.
        let q = Int8Weight::quantize(&w, 6.0);
        assert!(q.fused_cpu_product(&x, 5).is_none());
    }

    /// Training's symmetric 8-bit product holds the values plain (no unpacking per call) and
    /// gives the exact 8-bit path's output; switching back packs them again for fbgemm.
    #[test]
    fn symmetric_activations_move_the_values_to_the_plain_layout() {
        tch::manual_seed(9);
        let w = Tensor::randn([24, 40], (Kind::Float, Device::Cpu)) * 0.05;
        let x = Tensor::randn([6, 40], (Kind::Float, Device::Cpu));
        let mut q = Int8Weight::quantize(&w, 6.0);
        let packed_at_load = q.packed_weight().is_some();
        let fast = q.matmul_t(&x);
        q.set_symmetric_activations(true);
        assert!(matches!(q.storage, Int8Storage::Plain(_)));
        let symmetric = q.matmul_t(&x);
        assert!(symmetric.equal(&q.aten_product(&x, 1)));
        q.set_symmetric_activations(false);
        assert_eq!(q.packed_weight().is_some(), packed_at_load);
        assert!(q.matmul_t(&x).equal(&fast));
    }

    /// The 7-bit encoding written with ATen ops: per row (outlier columns zeroed) the range
    /// [min(0, lo), max(0, hi)] in 127 steps, the zero point rounded, levels clamped to
    /// 0..127; then the exact integer product of the centred levels, rescaled in
    /// `(acc * row_scale) * scale` order, plus the outlier columns in float.
    fn aten_u7_product(q: &Int8Weight, x: &Tensor, groups: i64) -> Tensor {
        let split = if groups > 1 && q.outlier_threshold > 0.0 {
            q.split_per_sample(x, groups)
        } else {
            q.split_shared(x)
        };
        if groups == 1 && q.outliers_fill(split.outlier_count(), x) {
            return q.dense_product(x);
        }
        let regular = &split.regular;
        let lo = regular.amin([1], true).clamp_max(0.0);
        let hi = regular.amax([1], true).clamp_min(0.0);
        let row_scale = ((&hi - &lo) / 127.0).clamp_min(1e-12);
        let zero_point = (-&lo / &row_scale).round().clamp(0.0, 127.0);
        let levels = (regular / &row_scale).round() + &zero_point;
        let centred = levels.clamp(0.0, 127.0) - &zero_point;
        let acc = centred
            .to_kind(Kind::Int64)
            .matmul(&q.q_t().to_kind(Kind::Int64))
            .to_kind(Kind::Int);
        let y = acc.to_kind(Kind::Float) * &row_scale * q.scale.unsqueeze(0);
        match &split.outliers {
            Some((columns, own)) => q.add_outlier_columns(y, columns, own),
            None => y,
        }
    }

    #[test]
    fn fbgemm_product_is_the_seven_bit_encoding_and_close_to_float() {
        if cpu_int8_gemm() != CpuInt8Gemm::Fbgemm {
            eprintln!("fbgemm is not this CPU's int8 GEMM: skipped");
            return;
        }
        tch::manual_seed(7);
        let w = Tensor::randn([48, 80], (Kind::Float, Device::Cpu)) * 0.05;
        let x = Tensor::randn([12, 80], (Kind::Float, Device::Cpu)) * 2.0;
        let _ = x.get(1).get(5).fill_(30.0);
        let _ = x.get(7).get(60).fill_(-9.5);
        let _ = x.get(4).fill_(0.0);
        // One-sided rows (after GELU, after a ReLU): the zero point at an end.
        let _ = x.get(2).abs_();
        x.get(3).copy_(&(-x.get(3).abs()));
        x.get(9)
            .copy_(&(Tensor::arange(80, (Kind::Float, Device::Cpu)) * 0.5 - 20.0));
        // As in the test above: the full ramp makes groups 1 dense, a quarter of it does not.
        let sparse = x.copy();
        let _ = sparse.get(9).g_mul_scalar_(0.25);
        for (threshold, x) in [6.0, 0.0, 100.0]
            .into_iter()
            .flat_map(|t| [(t, &x), (t, &sparse)])
        {
            let exact = x.matmul(&w.tr());
            let q = Int8Weight::quantize(&w, threshold);
            let packed = q.packed_weight().expect("packed where fbgemm runs");
            for groups in [1, 2, 3, 12] {
                let fused = q.fbgemm_product(packed, x, groups).expect("fbgemm ran");
                let aten = aten_u7_product(&q, x, groups);
                let diff = (&fused - &aten).abs().max().double_value(&[]);
                // Same levels and integers; the rescale may differ in the last bit from the
                // ATen product's rounding, nothing more.
                assert!(
                    diff <= 1e-5 * aten.abs().max().double_value(&[]),
                    "threshold {threshold}, groups {groups}: fbgemm differs from ATen by {diff}"
                );
                let rel =
                    (&fused - &exact).norm().double_value(&[]) / exact.norm().double_value(&[]);
                assert!(rel < 0.03, "relative error {rel} (threshold {threshold})");
            }
        }
    }
}
