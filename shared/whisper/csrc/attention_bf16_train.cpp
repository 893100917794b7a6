// Attention for training in bf16 products (mixed precision bf16 on CPUs with AVX512-BF16):
// softmax(q k^T * scale) v without a mask, differentiable in q, k and v. libtorch's CPU flash
// kernel runs its bf16 forward and backward at its f32 speed here (0.13 + 0.31 s a layer of
// whisper-base at batch 4); vdpbf16ps doubles the products' rate. Every product takes bf16
// inputs (probabilities and score gradients rounded to bf16, as FlashAttention does in half
// precision) and accumulates in f32; the softmax and its gradient are f32.
//
// One task is one head: its keys and values are packed once, query tiles of 32 rows run in
// turn, and the head's key and value gradients accumulate in f32 across tiles. All products
// go through one micro-kernel, C[M x N] (+)= A[M x K] B, with A's rows in bf16 and B packed as
// [K/2][N][2] (two consecutive elements of the reduced dimension in one 32-bit lane, as
// vdpbf16ps takes them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/csrc/autograd/custom_function.h>

#include "bf16_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

using namespace asr_bf16;

constexpr int64_t kDim = 64;   // head dimension (every Whisper size)
constexpr int64_t kTile = 32;  // query rows per tile

// C[4 x 64] (+)= A[4 x 2K'] B for B packed [K'][n][2] starting at column `col`.
ASR_BF16_TARGET inline void micro_4x64(const uint16_t* a, int64_t lda, const uint16_t* b,
                                        int64_t n, int64_t pairs, float* c, int64_t ldc,
                                        bool accumulate) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int g = 0; g < 4; ++g)
      acc[r][g] = accumulate ? _mm512_loadu_ps(c + r * ldc + g * 16) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[4];
    for (int g = 0; g < 4; ++g)
      bv[g] = (__m512bh)_mm512_loadu_si512(b + (p * n + g * 16) * 2);
    for (int r = 0; r < 4; ++r) {
      const __m512bh av = broadcast_pair(a + r * lda + 2 * p);
      for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], av, bv[g]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int g = 0; g < 4; ++g) _mm512_storeu_ps(c + r * ldc + g * 16, acc[r][g]);
}

// C[m x n] (+)= A[m x k] B: A bf16 row-major (row stride lda), B packed [k/2][n][2], C f32
// (row stride ldc); m a multiple of 4, n of 64, k even.
ASR_BF16_TARGET void gemm(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t n,
                           int64_t k, float* c, int64_t ldc, int64_t m, bool accumulate) {
  for (int64_t r = 0; r < m; r += 4)
    for (int64_t col = 0; col < n; col += 64)
      micro_4x64(a + r * lda, lda, b + col * 2, n, k / 2, c + r * ldc + col, ldc, accumulate);
}

// Rows [0, rows) of `src` ([rows][cols] reached through `at`) packed as [rows/2][n][2] bf16,
// zero past `rows` (up to `rows_padded`) and past `cols` (up to n).
template <typename At>
void pack_pairs(At at, int64_t rows, int64_t rows_padded, int64_t cols, int64_t n,
                uint16_t* out) {
  std::fill(out, out + rows_padded * n, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[((r / 2) * n + c) * 2 + (r % 2)] = to_bf16(at(r, c));
}

using Head = at::TensorAccessor<float, 2>;

// The buffers of one head's task.
struct HeadBuffers {
  explicit HeadBuffers(int64_t tp)
      : keys_t(kDim * tp), values_t(kDim * tp), keys(tp * kDim), values(tp * kDim),
        rows_a(kTile * kDim), rows_b(kTile * kDim), pairs_a(kTile * kDim), pairs_b(kTile * kDim),
        scores(kTile * tp), grads(kTile * tp), probs(kTile * tp), probs_t(tp * kTile),
        dscores(kTile * tp), dscores_t(tp * kTile), tile_out(kTile * kDim),
        dkeys(tp * kDim), dvalues(tp * kDim) {}
  std::vector<uint16_t> keys_t, values_t;  // [32 pairs of d][tp][2]: S = q k^T, dP = dO v^T
  std::vector<uint16_t> keys, values;      // [tp/2][64][2]: dq = dS k, o = P v
  std::vector<uint16_t> rows_a, rows_b;    // a tile's q / dO rows in bf16, [32][64]
  std::vector<uint16_t> pairs_a, pairs_b;  // the same as [16 pairs of rows][64][2]
  std::vector<float> scores, grads;        // [32][tp] f32
  std::vector<uint16_t> probs, probs_t, dscores, dscores_t;  // bf16 [32][tp] and [tp][32]
  std::vector<float> tile_out;             // [32][64]
  std::vector<float> dkeys, dvalues;       // [tp][64] f32 accumulators
};

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) == kDim && x.scalar_type() == at::kFloat &&
                  x.device().is_cpu(),
              name, " must be float32 [B, H, T, 64] on the CPU");
}

// Scores of one tile (rows `rows` of q from `row0`) against all keys, in buf.scores.
ASR_BF16_TARGET void tile_scores(Head q, int64_t row0, int64_t rows, int64_t tp,
                                  HeadBuffers& buf) {
  for (int64_t r = 0; r < kTile; ++r)
    for (int64_t d = 0; d < kDim; ++d)
      buf.rows_a[r * kDim + d] = r < rows ? to_bf16(q[row0 + r][d]) : 0;
  gemm(buf.rows_a.data(), kDim, buf.keys_t.data(), tp, kDim, buf.scores.data(), tp, kTile,
       false);
}

// Probabilities exp(s * scale - lse) of the tile's first `t` keys into buf.scores (f32) and
// buf.probs (bf16), zero past `t` and for rows past `rows`.
ASR_BF16_TARGET void tile_probs(const float* lse, int64_t rows, int64_t t, int64_t tp,
                                 float scale, HeadBuffers& buf) {
  const int64_t full = t / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (t - full)) - 1);
  for (int64_t r = 0; r < kTile; ++r) {
    float* s = buf.scores.data() + r * tp;
    uint16_t* p = buf.probs.data() + r * tp;
    const __m512 shift = _mm512_set1_ps(r < rows ? lse[r] : 0.0f);
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < tp; j += 16) {
      __mmask16 keep = j < full ? static_cast<__mmask16>(0xFFFF) : (j == full ? tail : 0);
      if (r >= rows) keep = 0;
      __m512 e = exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vscale, shift));
      e = _mm512_maskz_mov_ps(keep, e);
      _mm512_storeu_ps(s + j, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
  }
}

// [32][tp] bf16 -> [tp][32].
void transpose_tile(const std::vector<uint16_t>& src, int64_t tp, std::vector<uint16_t>& dst) {
  for (int64_t r = 0; r < kTile; ++r)
    for (int64_t j = 0; j < tp; ++j) dst[j * kTile + r] = src[r * tp + j];
}

// Forward of one head: out rows (through `o`) and the rows' log-sum-exp of scaled scores.
ASR_BF16_TARGET void forward_head(Head q, Head k, Head v, Head o, float* lse, int64_t t,
                                   float scale, HeadBuffers& buf) {
  const int64_t tp = round_up(t, 64);
  pack_pairs([&](int64_t d, int64_t j) { return k[j][d]; }, kDim, kDim, t, tp,
             buf.keys_t.data());
  pack_pairs([&](int64_t j, int64_t d) { return v[j][d]; }, t, tp, kDim, kDim,
             buf.values.data());
  const int64_t full = t / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (t - full)) - 1);
  for (int64_t row0 = 0; row0 < t; row0 += kTile) {
    const int64_t rows = std::min(kTile, t - row0);
    tile_scores(q, row0, rows, tp, buf);
    float tile_lse[kTile];
    for (int64_t r = 0; r < kTile; ++r) {
      const float* s = buf.scores.data() + r * tp;
      __m512 vmax = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < full; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
      if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + full));
      const float shift = _mm512_reduce_max_ps(vmax) * scale;
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < tp; j += 16) {
        const __mmask16 keep = j < full ? static_cast<__mmask16>(0xFFFF) : (j == full ? tail : 0);
        __m512 e = exp_nonpositive(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(keep, s + j),
                                                   _mm512_set1_ps(scale), _mm512_set1_ps(shift)));
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(keep, e));
      }
      tile_lse[r] = shift + std::log(_mm512_reduce_add_ps(vsum));
    }
    tile_probs(tile_lse, rows, t, tp, scale, buf);
    gemm(buf.probs.data(), tp, buf.values.data(), kDim, tp, buf.tile_out.data(), kDim, kTile,
         false);
    for (int64_t r = 0; r < rows; ++r) {
      lse[row0 + r] = tile_lse[r];
      for (int64_t d = 0; d < kDim; ++d) o[row0 + r][d] = buf.tile_out[r * kDim + d];
    }
  }
}

// Backward of one head: dq rows, dk and dv (through the accessors) from dO and the forward's
// output and log-sum-exp.
ASR_BF16_TARGET void backward_head(Head q, Head k, Head v, Head o, Head dout, const float* lse,
                                    Head dq, Head dk, Head dv, int64_t t, float scale,
                                    HeadBuffers& buf) {
  const int64_t tp = round_up(t, 64);
  pack_pairs([&](int64_t d, int64_t j) { return k[j][d]; }, kDim, kDim, t, tp,
             buf.keys_t.data());
  pack_pairs([&](int64_t d, int64_t j) { return v[j][d]; }, kDim, kDim, t, tp,
             buf.values_t.data());
  pack_pairs([&](int64_t j, int64_t d) { return k[j][d]; }, t, tp, kDim, kDim, buf.keys.data());
  std::fill(buf.dkeys.begin(), buf.dkeys.end(), 0.0f);
  std::fill(buf.dvalues.begin(), buf.dvalues.end(), 0.0f);
  for (int64_t row0 = 0; row0 < t; row0 += kTile) {
    const int64_t rows = std::min(kTile, t - row0);
    tile_scores(q, row0, rows, tp, buf);
    tile_probs(lse + row0, rows, t, tp, scale, buf);
    // dP = dO v^T, with dO's rows in bf16.
    float delta[kTile];
    for (int64_t r = 0; r < kTile; ++r) {
      float dot = 0.0f;
      for (int64_t d = 0; d < kDim; ++d) {
        const float g = r < rows ? dout[row0 + r][d] : 0.0f;
        buf.rows_b[r * kDim + d] = to_bf16(g);
        if (r < rows) dot += g * o[row0 + r][d];
      }
      delta[r] = dot;
    }
    gemm(buf.rows_b.data(), kDim, buf.values_t.data(), tp, kDim, buf.grads.data(), tp, kTile,
         false);
    // dS = P * (dP - delta) (zero wherever P is).
    for (int64_t r = 0; r < kTile; ++r) {
      const float* p = buf.scores.data() + r * tp;
      float* g = buf.grads.data() + r * tp;
      uint16_t* out = buf.dscores.data() + r * tp;
      const __m512 vdelta = _mm512_set1_ps(delta[r]);
      for (int64_t j = 0; j < tp; j += 16) {
        const __m512 ds = _mm512_mul_ps(_mm512_loadu_ps(p + j),
                                        _mm512_sub_ps(_mm512_loadu_ps(g + j), vdelta));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(ds));
      }
    }
    // dq = scale * dS k.
    gemm(buf.dscores.data(), tp, buf.keys.data(), kDim, tp, buf.tile_out.data(), kDim, kTile,
         false);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < kDim; ++d) dq[row0 + r][d] = buf.tile_out[r * kDim + d] * scale;
    // dv += P^T dO and dk += dS^T q (scaled at the end), the tile's rows as pairs.
    pack_pairs([&](int64_t r, int64_t d) { return r < rows ? dout[row0 + r][d] : 0.0f; }, kTile,
               kTile, kDim, kDim, buf.pairs_b.data());
    pack_pairs([&](int64_t r, int64_t d) { return r < rows ? q[row0 + r][d] : 0.0f; }, kTile,
               kTile, kDim, kDim, buf.pairs_a.data());
    transpose_tile(buf.probs, tp, buf.probs_t);
    transpose_tile(buf.dscores, tp, buf.dscores_t);
    gemm(buf.probs_t.data(), kTile, buf.pairs_b.data(), kDim, kTile, buf.dvalues.data(), kDim, tp,
         true);
    gemm(buf.dscores_t.data(), kTile, buf.pairs_a.data(), kDim, kTile, buf.dkeys.data(), kDim, tp,
         true);
  }
  for (int64_t j = 0; j < t; ++j)
    for (int64_t d = 0; d < kDim; ++d) {
      dk[j][d] = buf.dkeys[j * kDim + d] * scale;
      dv[j][d] = buf.dvalues[j * kDim + d];
    }
}

// out [B, T, H * 64] and lse [B, H, T].
std::pair<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, double scale) {
  check(q, "queries");
  check(k, "keys");
  check(v, "values");
  const int64_t batch = q.size(0), heads = q.size(1), t = q.size(2);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "queries, keys and values must have one shape");
  at::Tensor out = at::empty({batch, t, heads, kDim}, q.options());
  at::Tensor lse = at::empty({batch, heads, t}, q.options());
  const at::Tensor out_by_head = out.permute({0, 2, 1, 3});
  auto qa = q.accessor<float, 4>(), ka = k.accessor<float, 4>(), va = v.accessor<float, 4>();
  auto oa = out_by_head.accessor<float, 4>();
  float* lse_data = lse.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    HeadBuffers buf(round_up(t, 64));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, h = i % heads;
      forward_head(qa[b][h], ka[b][h], va[b][h], oa[b][h], lse_data + i * t, t,
                   static_cast<float>(scale), buf);
    }
  });
  return {out.view({batch, t, heads * kDim}), lse};
}

struct AttentionBf16 : public torch::autograd::Function<AttentionBf16> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, double scale) {
    auto [out, lse] = attention_forward(q, k, v, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3],
                     &lse = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t batch = q.size(0), heads = q.size(1), t = q.size(2);
    const at::Tensor dout = grad_outputs[0].to(at::kFloat).contiguous().view({batch, t, heads, kDim});
    const at::Tensor out_heads = out.view({batch, t, heads, kDim});
    at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
    const at::Tensor dout_by_head = dout.permute({0, 2, 1, 3});
    const at::Tensor out_by_head = out_heads.permute({0, 2, 1, 3});
    auto qa = q.accessor<float, 4>(), ka = k.accessor<float, 4>(), va = v.accessor<float, 4>();
    auto oa = out_by_head.accessor<float, 4>(), ga = dout_by_head.accessor<float, 4>();
    auto dqa = dq.accessor<float, 4>(), dka = dk.accessor<float, 4>(),
         dva = dv.accessor<float, 4>();
    const float* lse_data = lse.data_ptr<float>();
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      HeadBuffers buf(round_up(t, 64));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / heads, h = i % heads;
        backward_head(qa[b][h], ka[b][h], va[b][h], oa[b][h], ga[b][h], lse_data + i * t,
                      dqa[b][h], dka[b][h], dva[b][h], t, static_cast<float>(scale), buf);
      }
    });
    return {dq, dk, dv, at::Tensor()};
  }
};

}  // namespace

// softmax(q k^T * scale) v for q, k, v f32 [B, H, T, 64] (any strides), as f32 [B, T, H * 64],
// recorded for autograd; null (the error on stderr) if refused or the CPU lacks AVX512-BF16.
extern "C" at::Tensor* asr_attention_bf16_train(at::Tensor* q, at::Tensor* k, at::Tensor* v,
                                                double scale) {
  try {
    if (!asr_bf16::cpu_supported())
      throw std::runtime_error("the CPU lacks AVX512-BF16");
    return new at::Tensor(AttentionBf16::apply(*q, *k, *v, scale));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asr_attention_bf16_train: %s\n", e.what());
    return nullptr;
  }
}
