// Helpers shared by the bf16 kernels (bf16_kernels.cpp, attention_bf16_train.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace asr_bf16 {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#define ASR_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

inline uint16_t to_bf16(float x) {
  // Round to nearest even, as vcvtneps2bf16 does (inputs here are finite).
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// exp(x) for x <= 0: 2^n * p(f), f in [-0.5, 0.5], p the degree-6 Taylor polynomial of 2^f
// (relative error about 1e-7, below bf16's 4e-3 that the probabilities are rounded to).
ASR_BF16_TARGET inline __m512 exp_nonpositive(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 t = _mm512_mul_ps(x, log2e);
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

ASR_BF16_TARGET inline __m512bh broadcast_pair(const uint16_t* pair) {
  uint32_t word;
  std::memcpy(&word, pair, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
}

inline bool cpu_supported() {
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

}  // namespace asr_bf16
