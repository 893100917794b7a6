//! Attention in bfloat16 products on CPUs with AVX512-BF16 (csrc/bf16_kernels.cpp), for
//! int8 inference: the encoder's self-attention and the decoder's cross-attention.
//!
//! On such a CPU libtorch's flash kernel still computes in float32 (its bfloat16 path was no
//! faster here), about 29 ms of a whisper-base encoder layer's 65 ms on 2 cores. This kernel
//! multiplies q k^T and p v as bfloat16 dot products accumulated in float32, with the softmax
//! in float32: 14 ms. An ATen bfloat16 matmul would round the scores themselves to bfloat16,
//! an error of about 0.1 on a logit of 30; here only the inputs of each product are rounded,
//! as the int8 linears around it round theirs. A decoding step is bound by reading the cross-
//! attention's keys and values (at batch 8, 6 x 49 MB in float32 for whisper-base): packed
//! once per window in bfloat16, each step reads half. The fp32 precision keeps libtorch's
//! kernels.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

extern "C" {
    /// csrc/bf16_kernels.cpp: whether this CPU runs the kernel.
    fn asr_attention_bf16_supported() -> i32;
    /// csrc/bf16_kernels.cpp: whether autograd records operations on this thread.
    fn asr_grad_mode_enabled() -> i32;
    /// csrc/bf16_kernels.cpp: f32 keys `[B, H, T, 64]` packed for the kernel, or null.
    fn asr_attention_bf16_pack_keys(k: *mut torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
    /// csrc/bf16_kernels.cpp: f32 values `[B, H, T, 64]` packed for the kernel, or null.
    fn asr_attention_bf16_pack_values(v: *mut torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
    /// csrc/bf16_kernels.cpp: `softmax(q k^T * scale) v` for f32 queries `[B, H, Tq, 64]`
    /// (any strides) against packed keys and values of `t` positions, as f32
    /// `[B, Tq, H * 64]`, or null (the error on stderr).
    fn asr_attention_bf16_packed(
        q: *mut torch_sys::C_tensor,
        keys: *mut torch_sys::C_tensor,
        values: *mut torch_sys::C_tensor,
        t: i64,
        scale: f64,
    ) -> *mut torch_sys::C_tensor;
    /// csrc/attention_bf16_train.cpp: `softmax(q k^T * scale) v` for f32 q, k, v of one shape
    /// `[B, H, T, 64]` (any strides), as f32 `[B, T, H * 64]` recorded for autograd, or null.
    fn asr_attention_bf16_train(
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

/// Whether `x` is what the kernel takes: `[B, H, T, 64]` float32 on the CPU, no gradient.
fn takes(x: &Tensor) -> bool {
    let size = x.size();
    size.len() == 4
        && size[3] == HEAD_DIM
        && x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && !x.requires_grad()
}

/// Keys and values `[B, H, T, 64]` in the kernel's bfloat16 layout (half the bytes of f32,
/// T padded to 64): a decoder's cross-attention packs its encoder keys/values once per
/// window, and each step reads half as much.
#[derive(Debug)]
pub struct PackedKv {
    keys: Tensor,
    values: Tensor,
    /// Positions (T, without the padding).
    len: i64,
    heads: i64,
}

/// Whether autograd records operations on this thread (outside `tch::no_grad`).
pub fn grad_mode_enabled() -> bool {
    // SAFETY: a pure query of libtorch's thread-local autograd state.
    unsafe { asr_grad_mode_enabled() == 1 }
}

/// Self-attention for training under bf16 mixed precision (csrc/attention_bf16_train.cpp):
/// `softmax(q k^T / sqrt(64)) v` for q, k, v `[B, H, T, 64]` float32 on the CPU, all products in
/// bfloat16 with float32 accumulation, differentiable in all three; as `[B, T, H * 64]`.
/// `None` where the CPU or the inputs do not allow it, or libtorch refused.
pub fn attend_differentiable(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Tensor> {
    let float_heads = |x: &Tensor| {
        let size = x.size();
        size.len() == 4
            && size[3] == HEAD_DIM
            && x.device() == Device::Cpu
            && x.kind() == Kind::Float
    };
    if !supported() || ![q, k, v].iter().all(|x| float_heads(x)) {
        return None;
    }
    if k.size() != q.size() || v.size() != q.size() {
        return None;
    }
    let scale = (HEAD_DIM as f64).powf(-0.5);
    // SAFETY: live tensors for the call; the result is a new heap tensor or null.
    unsafe {
        let out = asr_attention_bf16_train(
            q.as_ptr() as *mut _,
            k.as_ptr() as *mut _,
            v.as_ptr() as *mut _,
            scale,
        );
        (!out.is_null()).then(|| Tensor::from_ptr(out))
    }
}

impl PackedKv {
    /// `None` where the CPU or the inputs do not allow it (see [`supported`]; float32 on the
    /// CPU, head size 64, no gradient, one shape), while autograd records (a training pass:
    /// its queries will need gradients the kernel does not give), or libtorch refused.
    pub fn pack(k: &Tensor, v: &Tensor) -> Option<Self> {
        if grad_mode_enabled() {
            return None;
        }
        Self::pack_for_one_pass(k, v)
    }

    /// [`Self::pack`] for queries at hand that need no gradient, whatever autograd's mode
    /// (the encoder's self-attention packs and attends in one call).
    fn pack_for_one_pass(k: &Tensor, v: &Tensor) -> Option<Self> {
        if !supported() || !takes(k) || !takes(v) || k.size() != v.size() {
            return None;
        }
        let size = k.size();
        // SAFETY: live tensors for the calls; each result is a new heap tensor or null.
        let (keys, values) = unsafe {
            let keys = asr_attention_bf16_pack_keys(k.as_ptr() as *mut _);
            let values = asr_attention_bf16_pack_values(v.as_ptr() as *mut _);
            let keys = (!keys.is_null()).then(|| Tensor::from_ptr(keys));
            let values = (!values.is_null()).then(|| Tensor::from_ptr(values));
            (keys?, values?)
        };
        Some(Self {
            keys,
            values,
            len: size[2],
            heads: size[1],
        })
    }

    /// Rows `indices` of the batch (beam reordering, finished rows leaving).
    pub fn select(&self, indices: &Tensor) -> Self {
        Self {
            keys: self.keys.index_select(0, indices),
            values: self.values.index_select(0, indices),
            len: self.len,
            heads: self.heads,
        }
    }

    /// `softmax(q k^T / sqrt(64)) v` for queries `[B, H, Tq, 64]` (this batch and heads), as
    /// `[B, Tq, H * 64]` (the heads merged, ready for the output projection); `None` for
    /// queries the kernel does not take or libtorch refused.
    pub fn attend(&self, q: &Tensor) -> Option<Tensor> {
        let size = q.size();
        let batch = self.keys.size()[0];
        if !takes(q) || size[0] != batch || size[1] != self.heads {
            return None;
        }
        let scale = (HEAD_DIM as f64).powf(-0.5);
        // SAFETY: live tensors for the call; the result is a new heap tensor or null.
        unsafe {
            let out = asr_attention_bf16_packed(
                q.as_ptr() as *mut _,
                self.keys.as_ptr() as *mut _,
                self.values.as_ptr() as *mut _,
                self.len,
                scale,
            );
            (!out.is_null()).then(|| Tensor::from_ptr(out))
        }
    }
}

/// `softmax(q k^T / sqrt(64)) v` over `[B, H, T, 64]` inputs, as `[B, T, H * 64]`: the
/// encoder's self-attention. `None` where the CPU or the inputs do not allow it.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Tensor> {
    if !takes(q) {
        return None;
    }
    PackedKv::pack_for_one_pass(k, v)?.attend(q)
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

    /// The training kernel: output and the gradients of q, k and v within bfloat16 rounding of
    /// libtorch's float32 attention and its backward (0.4-0.6% here), for lengths that fill no
    /// tile exactly. With two keys the score gradients cancel almost wholly (p (1 - p) times a
    /// difference) and their rounding reaches 7%: not a length the encoder has.
    #[test]
    fn training_kernel_matches_float32_attention_and_gradients() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        tch::manual_seed(5);
        for (b, h, t) in [(1, 2, 37), (2, 3, 100), (1, 2, 1500)] {
            let leaf = || {
                Tensor::randn([b, t, h, HEAD_DIM], (Kind::Float, Device::Cpu))
                    .set_requires_grad(true)
            };
            let (ql, kl, vl) = (leaf(), leaf(), leaf());
            let upstream = Tensor::randn([b, t, h * HEAD_DIM], (Kind::Float, Device::Cpu));
            let run = |ours: bool| {
                let heads = |x: &Tensor| x.transpose(1, 2) * 1.5;
                let (q, k, v) = (heads(&ql), heads(&kl), heads(&vl));
                let out = if ours {
                    attend_differentiable(&q, &k, &v).expect("kernel ran")
                } else {
                    reference(&q, &k, &v)
                };
                (&out * &upstream).sum(Kind::Float).backward();
                let grads: Vec<Tensor> = [&ql, &kl, &vl].iter().map(|x| x.grad().copy()).collect();
                for x in [&ql, &kl, &vl] {
                    let _ = x.grad().zero_();
                }
                (out.detach(), grads)
            };
            let (ours, our_grads) = run(true);
            let (want, want_grads) = run(false);
            let close = |a: &Tensor, w: &Tensor, what: &str| {
                let rel = ((a - w).norm() / w.norm()).double_value(&[]);
                assert!(rel < 0.02, "b {b} h {h} t {t}: {what} relative error {rel}");
            };
            close(&ours, &want, "output");
            for (name, (a, w)) in ["dq", "dk", "dv"]
                .iter()
                .zip(our_grads.iter().zip(&want_grads))
            {
                close(a, w, name);
            }
        }
    }

    /// A decoder's cross-attention: keys/values packed once, then single queries (and a
    /// 4-token prompt) attend to them, also after rows are selected as beam search does.
    #[test]
    fn packed_keys_values_serve_decoding_steps() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        tch::manual_seed(9);
        let (b, h, t) = (3, 8, 1500);
        let make =
            |len| Tensor::randn([b, len, h, HEAD_DIM], (Kind::Float, Device::Cpu)).transpose(1, 2);
        let (k, v) = (make(t).contiguous(), make(t).contiguous());
        assert!(
            PackedKv::pack(&k, &v).is_none(),
            "autograd records: a cache for training stays float32"
        );
        let _guard = tch::no_grad_guard();
        let packed = PackedKv::pack(&k, &v).expect("packed");
        for queries in [1, 4] {
            let q = make(queries) * 1.5;
            let err = (packed.attend(&q).expect("kernel ran") - reference(&q, &k, &v))
                .abs()
                .max()
                .double_value(&[]);
            assert!(err < 0.05, "{queries} queries: max abs error {err}");
        }
        let rows = Tensor::from_slice(&[2i64, 0]);
        let q = Tensor::randn([2, h, 1, HEAD_DIM], (Kind::Float, Device::Cpu));
        let selected = packed.select(&rows).attend(&q).expect("kernel ran");
        let want = reference(&q, &k.index_select(0, &rows), &v.index_select(0, &rows));
        let err = (selected - want).abs().max().double_value(&[]);
        assert!(err < 0.05, "selected rows: max abs error {err}");
        assert!(packed.attend(&q).is_none(), "a batch of another size");
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
