//! The logits projection in bfloat16 on CPUs with AVX512-BF16 (csrc/bf16_kernels.cpp).
//!
//! whisper-base's 51865 x 512 projection is about a third of a decoding step on 2 cores:
//! libtorch's bfloat16 product took 4.9 ms at batch 8 (4.1 ms at batch 1) for 53 MB of
//! weight, a tenth of what the memory streams (a 53 MB f32 sum took 1.1 ms). This kernel
//! holds the same bfloat16 weight in the layout of vdpbf16ps (16 vocabulary rows per block,
//! input pairs interleaved) and accumulates in float32, so the logits are not rounded to
//! bfloat16 either.

use tch::{Device, Kind, Tensor};

use crate::attention_bf16::supported;

extern "C" {
    /// csrc/bf16_kernels.cpp: a weight `[N, K]` packed for the kernel, or null.
    fn asr_projection_bf16_pack(w: *mut torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
    /// csrc/bf16_kernels.cpp: f32 `x [M, K]` times the packed weight's transpose, f32
    /// `[M, N]` (a view), or null.
    fn asr_projection_bf16(
        x: *mut torch_sys::C_tensor,
        packed: *mut torch_sys::C_tensor,
        n: i64,
    ) -> *mut torch_sys::C_tensor;
}

/// A float weight `[N, K]` (no bias) in the kernel's bfloat16 layout.
#[derive(Debug)]
pub struct PackedProjection {
    packed: Tensor,
    out_dim: i64,
    in_dim: i64,
}

impl PackedProjection {
    /// `None` where the CPU lacks AVX512-BF16, the weight is not a CPU `[N, K]` with K even,
    /// or libtorch refused.
    pub fn pack(weight: &Tensor) -> Option<Self> {
        let (out_dim, in_dim) = weight.size2().ok()?;
        if !supported() || weight.device() != Device::Cpu || in_dim % 2 != 0 {
            return None;
        }
        // SAFETY: a live tensor for the call; the result is a new heap tensor or null.
        let packed = unsafe {
            let packed = asr_projection_bf16_pack(weight.as_ptr() as *mut _);
            (!packed.is_null()).then(|| Tensor::from_ptr(packed))?
        };
        Some(Self {
            packed,
            out_dim,
            in_dim,
        })
    }

    /// `xs [..., K]` (cast to float32) times the weight's transpose: float32 `[..., N]`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let shape = xs.size();
        let rows = xs.reshape([-1, self.in_dim]).to_kind(Kind::Float);
        // SAFETY: live tensors for the call; the result is a new heap tensor or null.
        let y = unsafe {
            let y = asr_projection_bf16(
                rows.as_ptr() as *mut _,
                self.packed.as_ptr() as *mut _,
                self.out_dim,
            );
            (!y.is_null()).then(|| Tensor::from_ptr(y))
        };
        // The shapes were checked when packing; a refusal here is a broken invariant.
        let y = y.expect("the bf16 projection kernel takes the rows of its own width");
        let mut out_shape = shape;
        let last = out_shape.len() - 1;
        out_shape[last] = self.out_dim;
        y.reshape(out_shape.as_slice())
    }

    /// Bytes of the packed weight (the vocabulary padded to 16 rows).
    pub fn bytes(&self) -> i64 {
        crate::linear::tensor_bytes(&self.packed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within bfloat16 input rounding of the float32 product, for a decoding step's rows, a
    /// prompt's, and a vocabulary that fills no block or chunk exactly.
    #[test]
    fn matches_the_float32_product_within_bf16_rounding() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        tch::manual_seed(11);
        let w = Tensor::randn([51_865, 64], (Kind::Float, Device::Cpu)) * 0.1;
        let projection = PackedProjection::pack(&w).expect("packed");
        for shape in [
            vec![1, 1, 64],
            vec![3, 1, 64],
            vec![8, 1, 64],
            vec![2, 13, 64],
        ] {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            let ours = projection.forward(&x);
            let want = x.matmul(&w.tr());
            assert_eq!(ours.size(), want.size());
            let rel = ((&ours - &want).norm() / want.norm()).double_value(&[]);
            assert!(rel < 5e-3, "{shape:?}: relative error {rel}");
            let argmax_agree = ours
                .argmax(-1, false)
                .eq_tensor(&want.argmax(-1, false))
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            assert!(
                argmax_agree > 0.9,
                "{shape:?}: argmax agrees on {argmax_agree}"
            );
        }
        assert!(
            PackedProjection::pack(&Tensor::zeros([4, 3], (Kind::Float, Device::Cpu))).is_none()
        );
    }
}
