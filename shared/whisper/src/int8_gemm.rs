//! The int8 x int8 -> int32 GEMM under the int8 linear layers, chosen per device and CPU.
//!
//! torch's CPU `_int_mm` is fast (oneDNN) only on CPUs with AVX512-VNNI; on an AVX2 machine
//! it runs a reference loop about 50 times slower than a float32 product of the same shape
//! (16 clips: 456 s instead of 19 s). Without VNNI the product goes through the float32
//! GEMM over the int8 values, which gives `_int_mm`'s int32 result exactly: every product
//! and partial sum is an integer of magnitude at most 128 * 128 * 1024 = 2^24 when K is cut
//! into slices of 1024, so float32 holds each exactly, in any order. The weight stays int8
//! in memory and is widened for each product. (An AVX2 int8 kernel for the few rows of a
//! decoder step, single-threaded, was slower than this: 23.2 s against 19.0 s.)
//!
//! Faster on such CPUs, and the default where fbgemm runs (AVX2): fbgemm's u8 x s8 GEMM from
//! the torch wheel, 2-3.5 times a float32 product at Whisper's shapes. Its AVX2 kernel sums
//! pairs of products in saturating int16, exact only for activations of 7 bits, so the
//! activations are quantised to 0..127 with a zero point per row (PyTorch's `reduce_range`)
//! instead of bitsandbytes' symmetric -127..127: about as fine a step where a row's values
//! lean to one side (after GELU), up to twice as coarse where they are balanced.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

/// How CPU products are computed (`ASR_INT8_GEMM=int-mm|exact-float|fbgemm` overrides the
/// choice, e.g. to time them on one machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuInt8Gemm {
    /// torch's `_int_mm`.
    IntMm,
    /// The float32 GEMM over K-slices of 1024.
    ExactFloat,
    /// fbgemm on 7-bit activations with per-row zero points ([`PackedInt8Weight`]).
    Fbgemm,
}

/// K-slice whose sums stay exact in float32 (see the module comment).
const EXACT_K_SLICE: i64 = 1024;

extern "C" {
    /// csrc/int8_gemm.cpp: whether torch's CPU `_int_mm` has its fast kernel here.
    fn asr_cpu_int_mm_is_fast() -> i32;
    /// csrc/int8_fbgemm.cpp: whether fbgemm runs on this CPU (AVX2 or better).
    fn asr_fbgemm_supported() -> i32;
    /// csrc/int8_fbgemm.cpp: a packed copy of an int8 `[K, N]` weight, or null.
    fn asr_fbgemm_pack(q_t: *mut torch_sys::C_tensor) -> *mut std::ffi::c_void;
    fn asr_fbgemm_free(packed: *mut std::ffi::c_void);
    fn asr_fbgemm_bytes(packed: *mut std::ffi::c_void) -> i64;
    /// csrc/int8_fbgemm.cpp: rows of the packed weight, int8 `[C, N]`, or null.
    fn asr_fbgemm_rows(
        packed: *mut std::ffi::c_void,
        rows: *mut torch_sys::C_tensor,
    ) -> *mut torch_sys::C_tensor;
    /// csrc/int8_fbgemm.cpp: the whole weight, int8 `[K, N]`, or null.
    fn asr_fbgemm_unpack(packed: *mut std::ffi::c_void) -> *mut torch_sys::C_tensor;
    /// csrc/int8_fbgemm.cpp: `sum_k (xq[m, k] - zero_point[m]) * w[k, n]`, int32, or null.
    fn asr_fbgemm_mm(
        xq: *mut torch_sys::C_tensor,
        zero_point: *mut torch_sys::C_tensor,
        packed: *mut std::ffi::c_void,
    ) -> *mut torch_sys::C_tensor;
}

/// The CPU product chosen for this process.
pub fn cpu_int8_gemm() -> CpuInt8Gemm {
    static CHOICE: OnceLock<CpuInt8Gemm> = OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("ASR_INT8_GEMM").as_deref() {
        Ok("int-mm") => CpuInt8Gemm::IntMm,
        Ok("exact-float") => CpuInt8Gemm::ExactFloat,
        Ok("fbgemm") if fbgemm_supported() => CpuInt8Gemm::Fbgemm,
        // SAFETY: a query without arguments.
        _ if unsafe { asr_cpu_int_mm_is_fast() } == 1 => CpuInt8Gemm::IntMm,
        _ if fbgemm_supported() => CpuInt8Gemm::Fbgemm,
        _ => CpuInt8Gemm::ExactFloat,
    })
}

fn fbgemm_supported() -> bool {
    // SAFETY: a query without arguments.
    unsafe { asr_fbgemm_supported() == 1 }
}

/// An int8 weight `[K, N]` packed for fbgemm's GEMM (about one byte per parameter), with its
/// column sums for the activations' zero points.
#[derive(Debug)]
pub struct PackedInt8Weight {
    packed: std::ptr::NonNull<std::ffi::c_void>,
}

// SAFETY: the packed panels are written once, in `pack`, and only read afterwards (fbgemm's
// threads read them concurrently by design); the handle is freed once, in `drop`.
unsafe impl Send for PackedInt8Weight {}
unsafe impl Sync for PackedInt8Weight {}

impl PackedInt8Weight {
    /// `q_t`: int8 `[K, N]` on the CPU. `None` (the error on stderr) if fbgemm refused it.
    pub fn pack(q_t: &Tensor) -> Option<Self> {
        // SAFETY: `q_t` is live for the call; the result is a new heap object or null.
        let packed = unsafe { asr_fbgemm_pack(q_t.as_ptr() as *mut _) };
        std::ptr::NonNull::new(packed).map(|packed| Self { packed })
    }

    /// `xq`: u8 `[M, K]` in 0..127, `zero_point`: int32 `[M]`; the exact int32 product of the
    /// centred activations `xq - zero_point` and the weight, `[M, N]`. `None` (the error on
    /// stderr) on a shape or type libtorch refused.
    pub fn mm(&self, xq: &Tensor, zero_point: &Tensor) -> Option<Tensor> {
        // SAFETY: live tensors and a live handle for the call; the result is a new heap tensor
        // (owned by the returned `Tensor`) or null.
        unsafe {
            let acc = asr_fbgemm_mm(
                xq.as_ptr() as *mut _,
                zero_point.as_ptr() as *mut _,
                self.packed.as_ptr(),
            );
            (!acc.is_null()).then(|| Tensor::from_ptr(acc))
        }
    }

    /// Rows `rows` (int64 `[C]`) of the weight, int8 `[C, N]`; `None` on a row out of range.
    pub fn rows(&self, rows: &Tensor) -> Option<Tensor> {
        // SAFETY: a live handle and tensor; the result is a new heap tensor or null.
        unsafe {
            let out = asr_fbgemm_rows(self.packed.as_ptr(), rows.as_ptr() as *mut _);
            (!out.is_null()).then(|| Tensor::from_ptr(out))
        }
    }

    /// The weight unpacked, int8 `[K, N]` (for the rare users of the whole matrix: gradients,
    /// dequantisation).
    pub fn unpack(&self) -> Option<Tensor> {
        // SAFETY: a live handle; the result is a new heap tensor or null.
        unsafe {
            let out = asr_fbgemm_unpack(self.packed.as_ptr());
            (!out.is_null()).then(|| Tensor::from_ptr(out))
        }
    }

    /// Bytes of the packed weight.
    pub fn bytes(&self) -> i64 {
        // SAFETY: a live handle.
        unsafe { asr_fbgemm_bytes(self.packed.as_ptr()) }
    }
}

impl Drop for PackedInt8Weight {
    fn drop(&mut self) {
        // SAFETY: the handle came from `asr_fbgemm_pack` and is freed only here.
        unsafe { asr_fbgemm_free(self.packed.as_ptr()) }
    }
}

/// int8 `xq [M, K]` times int8 `q_t [K, N]`, int32 `[M, N]`, on `xq`'s device.
pub fn int8_mm(xq: &Tensor, q_t: &Tensor) -> Tensor {
    let rows = xq.size()[0];
    if xq.device() != Device::Cpu {
        // cuBLASLt's kernel wants more than 16 rows: pad with zeros and drop them again.
        if rows <= 16 {
            let padded = xq.constant_pad_nd([0, 0, 0, 32 - rows]);
            return padded.internal_int_mm(q_t).narrow(0, 0, rows);
        }
        return xq.internal_int_mm(q_t);
    }
    match cpu_int8_gemm() {
        CpuInt8Gemm::IntMm => xq.internal_int_mm(q_t),
        // The symmetric activations of this entry point are 8-bit: fbgemm cannot take them
        // exactly (its layers quantise to 7 bits and call `PackedInt8Weight::mm`).
        CpuInt8Gemm::ExactFloat | CpuInt8Gemm::Fbgemm => exact_float_mm(xq, q_t),
    }
}

/// The float32 GEMM over K-slices whose sums are exact; the slices add up in int32.
fn exact_float_mm(xq: &Tensor, q_t: &Tensor) -> Tensor {
    let k = xq.size()[1];
    let slice = |start: i64| {
        let len = EXACT_K_SLICE.min(k - start);
        xq.narrow(1, start, len)
            .to_kind(Kind::Float)
            .matmul(&q_t.narrow(0, start, len).to_kind(Kind::Float))
            .to_kind(Kind::Int)
    };
    let mut acc = slice(0);
    for start in (EXACT_K_SLICE..k).step_by(EXACT_K_SLICE as usize) {
        acc += slice(start);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_int8(rows: i64, cols: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randint_low(-127, 128, [rows, cols], (Kind::Int8, Device::Cpu))
    }

    /// The float32 path against torch's `_int_mm` (slow without VNNI, but small shapes):
    /// odd K, K above one slice, odd N, the extreme values, and a non-contiguous weight.
    #[test]
    fn exact_float_equals_int_mm() {
        for (m, k, n) in [
            (1, 64, 16),
            (3, 7, 5),
            (8, 512, 1000),
            (5, 2049, 33),
            (40, 2048, 40),
            (100, 1030, 24),
        ] {
            let x = random_int8(m, k, m * 7 + k);
            let w = random_int8(k, n, n * 3 + k);
            let reference = x.internal_int_mm(&w);
            assert!(exact_float_mm(&x, &w).equal(&reference), "{m}x{k}x{n}");
            assert!(int8_mm(&x, &w).equal(&reference), "dispatch {m}x{k}x{n}");
        }
        // All +-127 / -128 at K = 2048: sums past float32's 2^24 unless sliced.
        for value in [127i64, -128] {
            let x = Tensor::full([4, 2048], value, (Kind::Int8, Device::Cpu));
            let w = Tensor::full([2048, 24], value, (Kind::Int8, Device::Cpu));
            assert!(
                exact_float_mm(&x, &w).equal(&x.internal_int_mm(&w)),
                "{value}"
            );
        }
        let w = random_int8(48, 64, 5).tr();
        let x = random_int8(6, 64, 6);
        assert!(exact_float_mm(&x, &w).equal(&x.internal_int_mm(&w.contiguous())));
    }

    /// fbgemm's product of 7-bit activations with zero points against the exact integer
    /// product of the centred values: M of one (a decoder step) and many, odd K and N, the
    /// extreme levels (0 and 127 against -128 and 127 weights), and several threads.
    #[test]
    fn fbgemm_is_exact_on_seven_bit_activations() {
        if !fbgemm_supported() {
            eprintln!("fbgemm does not run on this CPU: skipped");
            return;
        }
        let exact = |xq: &Tensor, zp: &Tensor, w: &Tensor| {
            (xq.to_kind(Kind::Int64) - zp.to_kind(Kind::Int64).unsqueeze(1))
                .matmul(&w.to_kind(Kind::Int64))
        };
        for (m, k, n) in [
            (1, 512, 512),
            (3, 7, 5),
            (16, 2048, 40),
            (150, 512, 1000),
            (9, 1030, 33),
        ] {
            tch::manual_seed(m * 31 + k + n);
            let xq = Tensor::randint_low(0, 128, [m, k], (Kind::Uint8, Device::Cpu));
            let zp = Tensor::randint_low(0, 128, [m], (Kind::Int, Device::Cpu));
            let w = random_int8(k, n, k + 2 * n);
            let packed = PackedInt8Weight::pack(&w).expect("packed");
            assert!(packed.bytes() >= k * n);
            let acc = packed.mm(&xq, &zp).expect("multiplied");
            assert_eq!(acc.kind(), Kind::Int);
            assert!(
                packed.unpack().expect("unpacked").equal(&w),
                "unpack {k}x{n}"
            );
            let rows = Tensor::from_slice(&[0i64, k - 1, k / 2]);
            let gathered = packed.rows(&rows).expect("rows");
            assert!(gathered.equal(&w.index_select(0, &rows)), "rows {k}x{n}");
            // Every row, across column blocks and interleaved row positions.
            let all = Tensor::arange(k, (Kind::Int64, Device::Cpu));
            assert!(
                packed.rows(&all).expect("all rows").equal(&w),
                "all rows {k}x{n}"
            );
            assert!(
                acc.to_kind(Kind::Int64).equal(&exact(&xq, &zp, &w)),
                "{m}x{k}x{n}"
            );
        }
        // Saturation's worst case for 8-bit activations: all 127 against all -128 / 127.
        for value in [-128i64, 127] {
            let xq = Tensor::full([4, 2048], 127, (Kind::Uint8, Device::Cpu));
            let zp = Tensor::zeros([4], (Kind::Int, Device::Cpu));
            let w = Tensor::full([2048, 24], value, (Kind::Int8, Device::Cpu));
            let packed = PackedInt8Weight::pack(&w).expect("packed");
            let acc = packed.mm(&xq, &zp).expect("multiplied");
            assert!(
                acc.to_kind(Kind::Int64).equal(&exact(&xq, &zp, &w)),
                "{value}"
            );
        }
        // Refused shapes come back as None, not a crash.
        let packed = PackedInt8Weight::pack(&random_int8(64, 8, 1)).expect("packed");
        assert!(packed.rows(&Tensor::from_slice(&[64i64])).is_none());
        let wrong_k = Tensor::zeros([2, 63], (Kind::Uint8, Device::Cpu));
        assert!(packed
            .mm(&wrong_k, &Tensor::zeros([2], (Kind::Int, Device::Cpu)))
            .is_none());
    }
}
