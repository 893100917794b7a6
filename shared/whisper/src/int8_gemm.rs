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

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

/// How CPU products are computed (`ASR_INT8_GEMM=int-mm|exact-float` overrides the choice,
/// e.g. to time both on one machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuInt8Gemm {
    /// torch's `_int_mm`.
    IntMm,
    /// The float32 GEMM over K-slices of 1024.
    ExactFloat,
}

/// K-slice whose sums stay exact in float32 (see the module comment).
const EXACT_K_SLICE: i64 = 1024;

extern "C" {
    /// csrc/int8_gemm.cpp: whether torch's CPU `_int_mm` has its fast kernel here.
    fn asr_cpu_int_mm_is_fast() -> i32;
}

/// The CPU product chosen for this process.
pub fn cpu_int8_gemm() -> CpuInt8Gemm {
    static CHOICE: OnceLock<CpuInt8Gemm> = OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("ASR_INT8_GEMM").as_deref() {
        Ok("int-mm") => CpuInt8Gemm::IntMm,
        Ok("exact-float") => CpuInt8Gemm::ExactFloat,
        // SAFETY: a query without arguments.
        _ if unsafe { asr_cpu_int_mm_is_fast() } == 1 => CpuInt8Gemm::IntMm,
        _ => CpuInt8Gemm::ExactFloat,
    })
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
        CpuInt8Gemm::ExactFloat => exact_float_mm(xq, q_t),
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
}
