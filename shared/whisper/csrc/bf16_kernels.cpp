// Attention in bf16 products on CPUs with AVX512-BF16: softmax(q k^T * scale) v per head,
// both products as bf16 dot products accumulated in f32 (vdpbf16ps), the softmax in f32.
// libtorch's CPU flash kernel computes in f32 on such CPUs (its bf16 path was no faster
// here), and an ATen bf16 matmul rounds the scores to bf16 (an error of ~0.1 in a logit of
// 30). Keys and values are packed once (the encoder's self-attention packs them per pass, a
// decoder's cross-attention once per window, halving what each step reads); query tiles of
// 32 rows keep their scores (32 x T f32) in L2.
//
// Packed layouts (bf16, "pairs" = two consecutive elements of the reduced dimension in one
// 32-bit lane, as vdpbf16ps takes them), per head, T rounded up to 64 with zeros:
//   keys    [T/16 blocks][32 pairs][16 keys][2]   one zmm per (block, pair)
//   values  [T/2 pairs][4 groups][16 cols][2]     one zmm per (key pair, column group)
// Queries and probabilities are row-major, a pair broadcast as one 32-bit word.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <immintrin.h>

#include "bf16_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

using namespace asr_bf16;

constexpr int64_t kHeadDim = 64;
constexpr int64_t kPairs = kHeadDim / 2;
constexpr int64_t kGroups = kHeadDim / 16;
constexpr int64_t kTile = 32;      // query rows per task
constexpr int64_t kKeyStep = 64;   // keys per step of the score kernel (4 blocks of 16)

using HeadView = at::TensorAccessor<float, 2>;

uint16_t* bf16_data(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

void check_heads(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) == kHeadDim, name, " must be [B, H, T, 64]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), name,
              " must be float32 on the CPU");
}

// Keys [B, H, T, 64] f32 -> bf16 [B, H, Tp/16, 32, 16, 2], Tp = T rounded up to kKeyStep,
// zero past T.
at::Tensor pack_keys(const at::Tensor& k) {
  check_heads(k, "keys");
  const int64_t batch = k.size(0), heads = k.size(1), t = k.size(2);
  const int64_t padded = round_up(t, kKeyStep);
  at::Tensor packed =
      at::zeros({batch, heads, padded / 16, kPairs, 16, 2}, k.options().dtype(at::kBFloat16));
  auto ka = k.accessor<float, 4>();
  uint16_t* base = bf16_data(packed);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      HeadView head = ka[i / heads][i % heads];
      uint16_t* out = base + i * padded * kHeadDim;
      for (int64_t j = 0; j < t; ++j) {
        uint16_t* block = out + (j / 16) * (kPairs * 32) + (j % 16) * 2;
        for (int64_t p = 0; p < kPairs; ++p) {
          block[p * 32] = to_bf16(head[j][2 * p]);
          block[p * 32 + 1] = to_bf16(head[j][2 * p + 1]);
        }
      }
    }
  });
  return packed;
}

// Values [B, H, T, 64] f32 -> bf16 [B, H, Tp/2, 4, 16, 2], zero past T.
at::Tensor pack_values(const at::Tensor& v) {
  check_heads(v, "values");
  const int64_t batch = v.size(0), heads = v.size(1), t = v.size(2);
  const int64_t padded = round_up(t, kKeyStep);
  at::Tensor packed =
      at::zeros({batch, heads, padded / 2, kGroups, 16, 2}, v.options().dtype(at::kBFloat16));
  auto va = v.accessor<float, 4>();
  uint16_t* base = bf16_data(packed);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      HeadView head = va[i / heads][i % heads];
      uint16_t* out = base + i * padded * kHeadDim;
      for (int64_t j = 0; j < t; ++j) {
        uint16_t* pair = out + (j / 2) * (kGroups * 32) + (j % 2);
        for (int64_t c = 0; c < kHeadDim; ++c) pair[(c / 16) * 32 + (c % 16) * 2] = to_bf16(head[j][c]);
      }
    }
  });
  return packed;
}

// scores[r][j] = q[r] . k[j] for 4 query rows and kKeyStep keys from `key_blocks`.
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

// Per-thread buffers of one query tile.
struct TileBuffers {
  explicit TileBuffers(int64_t keys_padded)
      : queries(kTile * kHeadDim), scores(kTile * keys_padded), probs(kTile * keys_padded) {}
  std::vector<uint16_t> queries;
  std::vector<float> scores;
  std::vector<uint16_t> probs;
};

// One task: query rows [row0, row0 + rows) of one head, against its packed keys and values
// (`t` of them, `keys_padded` with the padding); `qa` and `oa` the head's [Tq, D] views of the
// queries and the output.
ASR_BF16_TARGET void attend_tile(HeadView qa, const uint16_t* keys, const uint16_t* values,
                                 int64_t t, int64_t keys_padded, int64_t row0, int64_t rows,
                                 float scale, TileBuffers& buf, HeadView oa) {
  // Rows in steps of 4 (the kernels' height): a decoding step's single query costs 4 rows.
  const int64_t rows4 = round_up(rows, 4);
  for (int64_t r = 0; r < rows4; ++r)
    for (int64_t d = 0; d < kHeadDim; ++d)
      buf.queries[r * kHeadDim + d] = r < rows ? to_bf16(qa[row0 + r][d]) : 0;
  for (int64_t r = 0; r < rows4; r += 4)
    for (int64_t j = 0; j < keys_padded; j += kKeyStep)
      score_step(buf.queries.data() + r * kHeadDim, keys + (j / 16) * kPairs * 32,
                 buf.scores.data() + r * keys_padded + j, keys_padded);
  float sums[kTile];
  for (int64_t r = 0; r < rows; ++r)
    sums[r] = softmax_row(buf.scores.data() + r * keys_padded, t, keys_padded, scale,
                          buf.probs.data() + r * keys_padded);
  std::fill(buf.probs.begin() + rows * keys_padded, buf.probs.begin() + rows4 * keys_padded, 0);
  float tile_out[4 * kHeadDim];
  for (int64_t r = 0; r < rows; r += 4) {
    value_step(buf.probs.data() + r * keys_padded, keys_padded, values, keys_padded / 2,
               tile_out);
    for (int64_t i = 0; i < 4 && r + i < rows; ++i) {
      const float inv = 1.0f / sums[r + i];
      for (int64_t d = 0; d < kHeadDim; ++d) oa[row0 + r + i][d] = tile_out[i * kHeadDim + d] * inv;
    }
  }
}

// q: f32 [B, H, Tq, 64] (any strides) against packed keys and values of `t` positions;
// returns f32 [B, Tq, H * 64].
at::Tensor attend_packed(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                         int64_t t, double scale) {
  check_heads(q, "queries");
  const int64_t batch = q.size(0), heads = q.size(1), tq = q.size(2);
  const int64_t keys_padded = round_up(t, kKeyStep);
  TORCH_CHECK(keys.scalar_type() == at::kBFloat16 && keys.is_contiguous() &&
                  keys.sizes() == at::IntArrayRef({batch, heads, keys_padded / 16, kPairs, 16, 2}),
              "packed keys do not match the queries and length");
  TORCH_CHECK(values.scalar_type() == at::kBFloat16 && values.is_contiguous() &&
                  values.sizes() ==
                      at::IntArrayRef({batch, heads, keys_padded / 2, kGroups, 16, 2}),
              "packed values do not match the queries and length");
  at::Tensor out = at::empty({batch, tq, heads, kHeadDim}, q.options());
  // A [B, H, Tq, D] view of the output (kept alive: accessors point into its strides).
  const at::Tensor out_by_head = out.permute({0, 2, 1, 3});
  auto oa = out_by_head.accessor<float, 4>();
  auto qa = q.accessor<float, 4>();
  const uint16_t* key_base = bf16_data(keys);
  const uint16_t* value_base = bf16_data(values);
  const int64_t tiles = (tq + kTile - 1) / kTile;
  at::parallel_for(0, batch * heads * tiles, 1, [&](int64_t begin, int64_t end) {
    TileBuffers buf(keys_padded);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / tiles, tile = task % tiles;
      const int64_t b = head / heads, h = head % heads;
      const int64_t row0 = tile * kTile;
      attend_tile(qa[b][h], key_base + head * keys_padded * kHeadDim,
                  value_base + head * keys_padded * kHeadDim, t, keys_padded, row0,
                  std::min(kTile, tq - row0), static_cast<float>(scale), buf, oa[b][h]);
    }
  });
  return out.view({batch, tq, heads * kHeadDim});
}

// --- The logits projection: y [M, N] = x [M, K] . W^T, W [N, K] held packed in bf16. ---

// W [N, K] (any float kind) -> bf16 [Np/16, K/2, 16, 2], Np = N rounded up to 16, zero rows
// past N.
at::Tensor pack_projection(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) % 2 == 0, "weight must be [N, K] with K even");
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const int64_t n = wf.size(0), k = wf.size(1), pairs = k / 2;
  const int64_t blocks = (n + 15) / 16;
  at::Tensor packed = at::zeros({blocks, pairs, 16, 2}, wf.options().dtype(at::kBFloat16));
  const float* src = wf.data_ptr<float>();
  uint16_t* dst = bf16_data(packed);
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t c = 0; c < 16 && b * 16 + c < n; ++c) {
        const float* row = src + (b * 16 + c) * k;
        uint16_t* out = dst + b * pairs * 32 + c * 2;
        for (int64_t p = 0; p < pairs; ++p) {
          out[p * 32] = to_bf16(row[2 * p]);
          out[p * 32 + 1] = to_bf16(row[2 * p + 1]);
        }
      }
  });
  return packed;
}

// out[r][b * 16 + c] = x[r] . w[b * 16 + c] for R rows and B column blocks.
template <int R, int B>
ASR_BF16_TARGET inline void projection_step(const uint16_t* x, int64_t pairs,
                                            const uint16_t* blocks, float* out,
                                            int64_t out_stride) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[B];
    for (int b = 0; b < B; ++b)
      wv[b] = (__m512bh)_mm512_loadu_si512(blocks + b * pairs * 32 + p * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = broadcast_pair(x + r * pairs * 2 + 2 * p);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv, wv[b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) _mm512_storeu_ps(out + r * out_stride + b * 16, acc[r][b]);
}

// Column blocks per task: 64 x 16 columns x K=512 bf16 = 1 MB of W, reused from L2 by every
// row group.
constexpr int64_t kProjectionChunk = 64;

// x: f32 [M, K]; returns f32 [M, N].
template <int R, int B>
ASR_BF16_TARGET at::Tensor project_with(const at::Tensor& x, const at::Tensor& packed,
                                        int64_t n) {
  const int64_t m = x.size(0), k = x.size(1), pairs = k / 2;
  const int64_t blocks = packed.size(0);
  const int64_t rows_padded = round_up(m, R);
  const int64_t cols_padded = round_up(blocks, B) * 16;
  std::vector<uint16_t> xb(rows_padded * k, 0);
  const at::Tensor xc = x.contiguous();
  const float* xs = xc.data_ptr<float>();
  for (int64_t i = 0; i < m * k; ++i) xb[i] = to_bf16(xs[i]);
  // Padded columns and rows land in a scratch output and are cut off.
  at::Tensor out = at::empty({rows_padded, cols_padded}, x.options());
  float* y = out.data_ptr<float>();
  const uint16_t* w = bf16_data(packed);
  const int64_t chunks = (blocks + kProjectionChunk - 1) / kProjectionChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kProjectionChunk;
      const int64_t last = std::min(blocks, first + kProjectionChunk);
      for (int64_t r = 0; r < rows_padded; r += R)
        for (int64_t b = first; b < last; b += B) {
          if (b + B <= blocks) {
            projection_step<R, B>(xb.data() + r * k, pairs, w + b * pairs * 32,
                                  y + r * cols_padded + b * 16, cols_padded);
          } else {
            for (int64_t one = b; one < blocks; ++one)
              projection_step<R, 1>(xb.data() + r * k, pairs, w + one * pairs * 32,
                                    y + r * cols_padded + one * 16, cols_padded);
          }
        }
    }
  });
  // A view: rows stride over the padded columns (no copy of the logits).
  return out.narrow(0, 0, m).narrow(1, 0, n);
}

at::Tensor project(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "input must be float32 [M, K] on the CPU");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 &&
                  packed.is_contiguous() && packed.size(1) * 2 == x.size(1) &&
                  packed.size(0) == (n + 15) / 16,
              "packed weight does not match the input");
  // A decoding step's few rows: 4 rows x 4 blocks; more rows: 8 x 2.
  return x.size(0) <= 4 ? project_with<4, 4>(x, packed, n) : project_with<8, 2>(x, packed, n);
}

}  // namespace

extern "C" int asr_attention_bf16_supported() {
  return asr_bf16::cpu_supported() ? 1 : 0;
}

template <typename F>
at::Tensor* guarded(const char* name, F&& f) {
  try {
    if (!asr_attention_bf16_supported()) throw std::runtime_error("the CPU lacks AVX512-BF16");
    return new at::Tensor(f());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return nullptr;
  }
}

extern "C" at::Tensor* asr_attention_bf16_pack_keys(at::Tensor* k) {
  return guarded("asr_attention_bf16_pack_keys", [&] { return pack_keys(*k); });
}

extern "C" at::Tensor* asr_attention_bf16_pack_values(at::Tensor* v) {
  return guarded("asr_attention_bf16_pack_values", [&] { return pack_values(*v); });
}

extern "C" at::Tensor* asr_attention_bf16_packed(at::Tensor* q, at::Tensor* keys,
                                                 at::Tensor* values, int64_t t, double scale) {
  return guarded("asr_attention_bf16_packed",
                 [&] { return attend_packed(*q, *keys, *values, t, scale); });
}

extern "C" at::Tensor* asr_projection_bf16_pack(at::Tensor* w) {
  return guarded("asr_projection_bf16_pack", [&] { return pack_projection(*w); });
}

extern "C" at::Tensor* asr_projection_bf16(at::Tensor* x, at::Tensor* packed, int64_t n) {
  return guarded("asr_projection_bf16", [&] { return project(*x, *packed, n); });
}

// Whether autograd records operations on this thread (tch has no query for it).
extern "C" int asr_grad_mode_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }
