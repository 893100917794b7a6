// The encoder's self-attention on CPUs with AVX512-BF16: softmax(q k^T * scale) v per head,
// with both products as bf16 dot products accumulated in f32 (vdpbf16ps) and the softmax in
// f32. libtorch's CPU flash kernel computes in f32 on such CPUs (its bf16 path was no faster
// here), and an ATen bf16 matmul rounds the scores to bf16 (an error of ~0.1 in a logit of
// 30). Query tiles of 32 rows keep their scores (32 x T f32) in L2.
//
// Layouts (bf16, "pairs" = two consecutive elements of the reduced dimension in one 32-bit
// lane, as vdpbf16ps takes them):
//   keys    [T/16 blocks][D/2 pairs][16 keys][2]   one zmm per (block, pair)
//   values  [T/2 pairs][D/16 groups][16 cols][2]   one zmm per (key pair, column group)
//   queries and probabilities row-major, a pair broadcast as one 32-bit word.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kHeadDim = 64;
constexpr int64_t kPairs = kHeadDim / 2;
constexpr int64_t kGroups = kHeadDim / 16;
constexpr int64_t kTile = 32;      // query rows per task
constexpr int64_t kKeyStep = 64;   // keys per step of the score kernel (4 blocks of 16)

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#define ASR_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

ASR_BF16_TARGET inline uint16_t to_bf16(float x) {
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

struct Head {
  std::vector<uint16_t> keys;    // [T_k/16][kPairs][16][2]
  std::vector<uint16_t> values;  // [T_v/2][kGroups][16][2]
};

using HeadView = at::TensorAccessor<float, 2>;

// ka, va: [T, D] views of one head.
ASR_BF16_TARGET void pack_head(HeadView ka, HeadView va, int64_t t, int64_t keys_padded,
                               Head& head) {
  head.keys.assign(keys_padded * kHeadDim, 0);
  for (int64_t j = 0; j < t; ++j) {
    uint16_t* block = head.keys.data() + (j / 16) * (kPairs * 32) + (j % 16) * 2;
    for (int64_t p = 0; p < kPairs; ++p) {
      block[p * 32] = to_bf16(ka[j][2 * p]);
      block[p * 32 + 1] = to_bf16(ka[j][2 * p + 1]);
    }
  }
  head.values.assign(keys_padded * kHeadDim, 0);
  for (int64_t j = 0; j < t; ++j) {
    uint16_t* pair = head.values.data() + (j / 2) * (kGroups * 32) + (j % 2);
    for (int64_t c = 0; c < kHeadDim; ++c) {
      pair[(c / 16) * 32 + (c % 16) * 2] = to_bf16(va[j][c]);
    }
  }
}

// scores[r][j] = q[r] . k[j] for 4 query rows and kKeyStep keys from `block`.
ASR_BF16_TARGET inline void score_step(const uint16_t* q_rows, const uint16_t* key_blocks,
                                       float* scores, int64_t scores_stride) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < 4; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kPairs; ++p) {
    __m512bh kv[4];
    for (int b = 0; b < 4; ++b)
      kv[b] = (__m512bh)_mm512_loadu_si512(key_blocks + b * kPairs * 32 + p * 32);
    for (int r = 0; r < 4; ++r) {
      const __m512bh qv = broadcast_pair(q_rows + r * kHeadDim + 2 * p);
      for (int b = 0; b < 4; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], qv, kv[b]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < 4; ++b) _mm512_storeu_ps(scores + r * scores_stride + b * 16, acc[r][b]);
}

// out[r][:] = probs[r] . values for 4 rows (probs row-major, `pairs` key pairs).
ASR_BF16_TARGET inline void value_step(const uint16_t* probs, int64_t probs_stride,
                                       const uint16_t* values, int64_t pairs, float* out) {
  __m512 acc[4][kGroups];
  for (int r = 0; r < 4; ++r)
    for (int g = 0; g < kGroups; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh vv[kGroups];
    for (int g = 0; g < kGroups; ++g)
      vv[g] = (__m512bh)_mm512_loadu_si512(values + kp * kGroups * 32 + g * 32);
    for (int r = 0; r < 4; ++r) {
      const __m512bh pv = broadcast_pair(probs + r * probs_stride + 2 * kp);
      for (int g = 0; g < kGroups; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], pv, vv[g]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int g = 0; g < kGroups; ++g) _mm512_storeu_ps(out + r * kHeadDim + g * 16, acc[r][g]);
}

// Softmax of one row of scores (the first `t` of them, times `scale`) into bf16
// probabilities, zero past `t`; returns the sum of the f32 probabilities.
ASR_BF16_TARGET float softmax_row(float* scores, int64_t t, int64_t padded, float scale,
                                  uint16_t* probs) {
  const int64_t full = t / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (t - full)) - 1);
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < full; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(scores + j));
  if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, scores + full));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(vmax) * scale);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < padded; j += 16) {
    const __mmask16 keep = j < full ? static_cast<__mmask16>(0xFFFF) : (j == full ? tail : 0);
    const __m512 s = _mm512_maskz_loadu_ps(keep, scores + j);
    __m512 e = exp_nonpositive(_mm512_fmsub_ps(s, vscale, shift));
    e = _mm512_maskz_mov_ps(keep, e);
    vsum = _mm512_add_ps(vsum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(vsum);
}

// One task: query rows [row0, row0 + rows) of one head; `qa` and `oa` the head's [T, D]
// views of the queries and the output.
ASR_BF16_TARGET void attend_tile(HeadView qa, const Head& head, int64_t t, int64_t keys_padded,
                                 int64_t row0, int64_t rows, float scale,
                                 std::vector<uint16_t>& q_tile, std::vector<float>& scores,
                                 std::vector<uint16_t>& probs, HeadView oa) {
  std::fill(q_tile.begin(), q_tile.end(), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < kHeadDim; ++d) q_tile[r * kHeadDim + d] = to_bf16(qa[row0 + r][d]);
  for (int64_t r = 0; r < kTile; r += 4)
    for (int64_t j = 0; j < keys_padded; j += kKeyStep)
      score_step(q_tile.data() + r * kHeadDim, head.keys.data() + (j / 16) * kPairs * 32,
                 scores.data() + r * keys_padded + j, keys_padded);
  float sums[kTile];
  for (int64_t r = 0; r < rows; ++r)
    sums[r] = softmax_row(scores.data() + r * keys_padded, t, keys_padded, scale,
                          probs.data() + r * keys_padded);
  for (int64_t r = rows; r < kTile; ++r)
    std::fill(probs.begin() + r * keys_padded, probs.begin() + (r + 1) * keys_padded, 0);
  float tile_out[4 * kHeadDim];
  for (int64_t r = 0; r < rows; r += 4) {
    value_step(probs.data() + r * keys_padded, keys_padded, head.values.data(), keys_padded / 2,
               tile_out);
    for (int64_t i = 0; i < 4 && r + i < rows; ++i) {
      const float inv = 1.0f / sums[r + i];
      for (int64_t d = 0; d < kHeadDim; ++d) oa[row0 + r + i][d] = tile_out[i * kHeadDim + d] * inv;
    }
  }
}

// q, k, v: f32 [B, H, T, D] (any strides); returns f32 [B, T, H * D].
ASR_BF16_TARGET at::Tensor attention(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "q, k, v must be [B, H, T, D] of one shape");
  TORCH_CHECK(q.size(3) == kHeadDim, "head dim must be 64");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "q, k, v must be float32");
  TORCH_CHECK(q.device().is_cpu(), "q, k, v must be on the CPU");
  const int64_t batch = q.size(0), heads = q.size(1), t = q.size(2);
  const int64_t keys_padded = round_up(t, kKeyStep);
  at::Tensor out = at::empty({batch, t, heads, kHeadDim}, q.options());
  // A [B, H, T, D] view of the output (kept alive: accessors point into its strides).
  const at::Tensor out_by_head = out.permute({0, 2, 1, 3});
  auto oa = out_by_head.accessor<float, 4>();
  auto qa = q.accessor<float, 4>();
  auto ka = k.accessor<float, 4>();
  auto va = v.accessor<float, 4>();
  std::vector<Head> packed(batch * heads);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      pack_head(ka[i / heads][i % heads], va[i / heads][i % heads], t, keys_padded, packed[i]);
  });
  const int64_t tiles = (t + kTile - 1) / kTile;
  at::parallel_for(0, batch * heads * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> q_tile(kTile * kHeadDim);
    std::vector<float> scores(kTile * keys_padded);
    std::vector<uint16_t> probs(kTile * keys_padded);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / tiles, tile = task % tiles;
      const int64_t b = head / heads, h = head % heads;
      const int64_t row0 = tile * kTile;
      attend_tile(qa[b][h], packed[head], t, keys_padded, row0, std::min(kTile, t - row0),
                  static_cast<float>(scale), q_tile, scores, probs, oa[b][h]);
    }
  });
  return out.view({batch, t, heads * kHeadDim});
}

}  // namespace

extern "C" int asr_attention_bf16_supported() {
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
             ? 1
             : 0;
}

extern "C" at::Tensor* asr_attention_bf16(at::Tensor* q, at::Tensor* k, at::Tensor* v,
                                          double scale) {
  try {
    if (!asr_attention_bf16_supported()) throw std::runtime_error("the CPU lacks AVX512-BF16");
    return new at::Tensor(attention(*q, *k, *v, scale));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asr_attention_bf16: %s\n", e.what());
    return nullptr;
  }
}
