//! The encoder's self-attention in bfloat16 products on CPUs with AVX512-BF16
//! (csrc/attention_bf16.cpp), for int8 inference.
//!
//! On such a CPU libtorch's flash kernel still computes in float32 (its bfloat16 path was no
//! faster here), about 29 ms of a whisper-base encoder layer's 65 ms on 2 cores. This kernel
//! multiplies q k^T and p v as bfloat16 dot products accumulated in float32, with the softmax
//! in float32. An ATen bfloat16 matmul would round the scores themselves to bfloat16, an
//! error of about 0.1 on a logit of 30; here only the inputs of each product are rounded, as
//! the int8 linears around it round theirs. The fp32 precision keeps libtorch's kernel.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

extern "C" {
    /// csrc/attention_bf16.cpp: whether this CPU runs the kernel.
    fn asr_attention_bf16_supported() -> i32;
    /// csrc/attention_bf16.cpp: `softmax(q k^T * scale) v` for f32 `[B, H, T, 64]` inputs
    /// (any strides) as f32 `[B, T, H * 64]`, or null (the error on stderr).
    fn asr_attention_bf16(
        q: *mut torch_sys::C_tensor,
        k: *mut torch_sys::C_tensor,
        v: *mut torch_sys::C_tensor,
        scale: f64,
    ) -> *mut torch_sys::C_tensor;
}

/// The head size the kernel is written for (every Whisper size has 64).
pub const HEAD_DIM: i64 = 64;

/// Whether this CPU has AVX512-BF16 (with the AVX-512 subsets the kernel uses).
pub fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    // SAFETY: a pure query of the CPU's features.
    *SUPPORTED.get_or_init(|| unsafe { asr_attention_bf16_supported() } == 1)
}

/// Whether [`attend`] takes these inputs: float32 on the CPU, head size 64, no gradient.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let size = q.size();
    size.len() == 4
        && size[3] == HEAD_DIM
        && k.size() == size
        && v.size() == size
        && [q, k, v]
            .iter()
            .all(|t| t.device() == Device::Cpu && t.kind() == Kind::Float && !t.requires_grad())
}

/// `softmax(q k^T / sqrt(64)) v` over `[B, H, T, 64]` inputs, as `[B, T, H * 64]` (the heads
/// merged, ready for the output projection). `None` where the CPU or the inputs do not allow
/// it (see [`supported`], [`applies`]) or libtorch refused.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Tensor> {
    if !supported() || !applies(q, k, v) {
        return None;
    }
    let scale = (HEAD_DIM as f64).powf(-0.5);
    // SAFETY: live tensors for the call; the result is a new heap tensor or null.
    unsafe {
        let out = asr_attention_bf16(
            q.as_ptr() as *mut _,
            k.as_ptr() as *mut _,
            v.as_ptr() as *mut _,
            scale,
        );
        (!out.is_null()).then(|| Tensor::from_ptr(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, _, t, _) = q.size4().unwrap();
        Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, false, None, false)
            .transpose(1, 2)
            .contiguous()
            .view([b, t, -1])
    }

    /// Within bfloat16 rounding of libtorch's float32 attention, for lengths that fill no
    /// tile or key step exactly, several heads and samples, and strided (head-split) inputs.
    #[test]
    fn matches_float32_attention_within_bf16_rounding() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        tch::manual_seed(7);
        for (b, h, t) in [(1, 1, 1), (1, 2, 5), (2, 3, 33), (1, 8, 100), (2, 2, 1500)] {
            // Sharp and flat rows alike: scores of a few units, as in Whisper's encoder.
            let make = || {
                Tensor::randn([b, t, h, HEAD_DIM], (Kind::Float, Device::Cpu)).transpose(1, 2) * 1.5
            };
            let (q, k, v) = (make(), make(), make());
            let ours = attend(&q, &k, &v).expect("kernel ran");
            let want = reference(&q, &k, &v);
            assert_eq!(ours.size(), want.size());
            let err = (&ours - &want).abs().max().double_value(&[]);
            let rel = ((&ours - &want).norm() / want.norm()).double_value(&[]);
            assert!(
                err < 0.05 && rel < 0.01,
                "b {b} h {h} t {t}: max abs error {err}, relative {rel}"
            );
        }
    }

    #[test]
    fn declines_what_it_does_not_compute() {
        let q = Tensor::randn([1, 2, 4, 32], (Kind::Float, Device::Cpu));
        assert!(attend(&q, &q, &q).is_none(), "head size 32");
        let q = Tensor::randn([1, 2, 4, 64], (Kind::Double, Device::Cpu));
        assert!(attend(&q, &q, &q).is_none(), "float64");
        let q = Tensor::randn([1, 2, 4, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(attend(&q, &q, &q).is_none(), "needs a gradient");
    }
}
