// The CPU int8 linear's passes over the activations, fused: LLM.int8's outlier columns, the
// per-row absmax quantisation of the rest, and the int32 -> float rescaling after `_int_mm`.
// Written with ATen ops these are about ten passes over activation-sized tensors, which cost
// several times the int8 GEMM itself at Whisper's shapes; here they are two passes in and one
// out. The arithmetic is the ATen path's, operation for operation (float division by the row
// scale, round half to even, clamp to +-127), so both give the same bits (linear.rs tests it).
//
// Threads: this file is compiled without -fopenmp (linking a second OpenMP runtime beside
// libtorch's is not worth the risk), so ATen's inline `at::parallel_for` runs the passes on
// the calling thread. They read and write each element once or twice; the GEMM beside them
// runs on libtorch's threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

// The row kernels, compiled for AVX-512, AVX2 and plain x86-64 and picked at load time
// (GCC's function multi-versioning), so the binary runs on any x86-64 and vectorises where
// the CPU can. Plain loops with no reductions over floats: they vectorise without fast-math.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ASR_ROW_KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ASR_ROW_KERNEL
#endif

// flags[c] |= |row[c]| > limit.
ASR_ROW_KERNEL void mark_outliers(const float* row, uint8_t* flags, float limit, int64_t k) {
  for (int64_t c = 0; c < k; ++c) flags[c] |= static_cast<uint8_t>(std::fabs(row[c]) > limit);
}

// max |row[c]| over the regular columns. On the bits: a float's magnitude orders as its bits
// with the sign cleared, and an integer max reduction vectorises where a float one needs
// fast-math (a NaN's bits are above infinity's, so a NaN propagates as torch's amax does).
// `keep`: all ones for a regular column, zero for an outlier one.
ASR_ROW_KERNEL uint32_t masked_absmax_bits(const uint32_t* bits, const uint32_t* keep, int64_t k) {
  uint32_t best = 0;
  for (int64_t c = 0; c < k; ++c) best = std::max(best, bits[c] & keep[c] & 0x7fffffffu);
  return best;
}

ASR_ROW_KERNEL uint32_t absmax_bits(const uint32_t* bits, int64_t k) {
  uint32_t best = 0;
  for (int64_t c = 0; c < k; ++c) best = std::max(best, bits[c] & 0x7fffffffu);
  return best;
}

// `keep` null: no outlier columns.
float row_absmax(const float* row, const uint32_t* keep, int64_t k) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
  const uint32_t best = keep ? masked_absmax_bits(bits, keep, k) : absmax_bits(bits, k);
  float out;
  std::memcpy(&out, &best, sizeof out);
  return out;
}

// q[c] = clamp(round_half_even(row[c] / scale), -127, 127). |row[c] / scale| is at most 127
// (plus rounding) here, so adding and subtracting 1.5 * 2^23 rounds half to even as nearbyint
// does, in a form that vectorises.
ASR_ROW_KERNEL void quantize_row(const float* row, float scale, int8_t* q, int64_t k) {
  const float magic = 12582912.0f;
  for (int64_t c = 0; c < k; ++c) {
    float rounded = (row[c] / scale + magic) - magic;
    rounded = rounded < -127.0f ? -127.0f : (rounded > 127.0f ? 127.0f : rounded);
    q[c] = static_cast<int8_t>(rounded);
  }
}

// quantize_row with the outlier columns (keep[c] == 0) zeroed: their bits cleared, +0.0.
ASR_ROW_KERNEL void quantize_masked_row(const float* row, const uint32_t* keep, float scale,
                                        int8_t* q, int64_t k) {
  const float magic = 12582912.0f;
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
  for (int64_t c = 0; c < k; ++c) {
    const uint32_t kept = bits[c] & keep[c];
    float v;
    std::memcpy(&v, &kept, sizeof v);
    float rounded = (v / scale + magic) - magic;
    rounded = rounded < -127.0f ? -127.0f : (rounded > 127.0f ? 127.0f : rounded);
    q[c] = static_cast<int8_t>(rounded);
  }
}

// Order-preserving integer keys of floats (a signed compare of keys orders as the floats do):
// negative floats get their magnitude bits flipped. The map is its own inverse.
inline int32_t float_key(uint32_t bits) {
  const int32_t v = static_cast<int32_t>(bits);
  return v ^ ((v >> 31) & 0x7fffffff);
}

inline float key_float(int32_t key) {
  const uint32_t bits = static_cast<uint32_t>(float_key(static_cast<uint32_t>(key)));
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// The least and greatest keys of a row, outlier columns (keep[c] == 0) read as +0.0; integer
// min/max vectorise where float ones need fast-math. `keep` null: every column.
ASR_ROW_KERNEL void key_range(const uint32_t* bits, const uint32_t* keep, int64_t k, int32_t* lo,
                              int32_t* hi) {
  int32_t least = 0, greatest = 0;
  if (keep) {
    for (int64_t c = 0; c < k; ++c) {
      const int32_t key = float_key(bits[c] & keep[c]);
      least = std::min(least, key);
      greatest = std::max(greatest, key);
    }
  } else {
    for (int64_t c = 0; c < k; ++c) {
      const int32_t key = float_key(bits[c]);
      least = std::min(least, key);
      greatest = std::max(greatest, key);
    }
  }
  *lo = least;
  *hi = greatest;
}

// q[c] = clamp(round_half_even(row[c] / scale) + zero_point, 0, 127), outlier columns read as
// +0.0 (so they get the zero point). `keep` null: every column.
ASR_ROW_KERNEL void quantize_row_u7(const float* row, const uint32_t* keep, float scale,
                                    float zero_point, uint8_t* q, int64_t k) {
  const float magic = 12582912.0f;
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
  for (int64_t c = 0; c < k; ++c) {
    const uint32_t kept = keep ? (bits[c] & keep[c]) : bits[c];
    float v;
    std::memcpy(&v, &kept, sizeof v);
    float level = ((v / scale + magic) - magic) + zero_point;
    level = level < 0.0f ? 0.0f : (level > 127.0f ? 127.0f : level);
    q[c] = static_cast<uint8_t>(level);
  }
}

// y[c] = (float(acc[c]) * s) * cs[c].
ASR_ROW_KERNEL void rescale_row(const int32_t* acc, float s, const float* cs, float* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) y[c] = (static_cast<float>(acc[c]) * s) * cs[c];
}

// x: f32 [M, K] contiguous on the CPU, rows in `groups` consecutive samples of M / groups rows.
// Outlier columns: |x| > threshold anywhere in a sample's rows (per sample), or anywhere at all
// (groups == 1); none when threshold <= 0.
//
// Two encodings: `Encoding::Symmetric` (bitsandbytes': x / (absmax / 127) rounded to
// -127..127, for `_int_mm`), and `Encoding::Unsigned7` for fbgemm on AVX2 (int8_fbgemm.cpp):
// the row's range [min(0, lo), max(0, hi)] over 127 steps, levels 0..127 with a zero point
// (PyTorch's `reduce_range` affine quantisation), so x ~ (q - zero_point) * scale.
enum class Encoding { Symmetric, Unsigned7 };

struct Quantized {
  at::Tensor xq;          // int8 [M, K] (Symmetric, outlier entries zero) or u8 (Unsigned7,
                          // outlier entries at the zero point)
  at::Tensor zero_point;  // int32 [M] (Unsigned7), undefined otherwise
  at::Tensor row_scale;   // f32 [M, 1]
  at::Tensor columns;    // int64 [C], the union of the samples' outlier columns
  at::Tensor own;        // f32 [M, C], each row's own outlier values, others zero
};

Quantized quantize(const at::Tensor& x, double threshold, int64_t groups, Encoding encoding) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.device().is_cpu(),
              "asr_int8_quantize: x must be a contiguous f32 CPU matrix");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(groups >= 1 && m % groups == 0, "asr_int8_quantize: rows not divisible by groups");
  const int64_t rows_per_group = m / groups;
  const float* xs = x.data_ptr<float>();
  const float limit = static_cast<float>(threshold);

  // Pass 1: each sample's outlier columns.
  std::vector<uint8_t> mask(groups * k, 0);
  bool any_outlier = false;
  if (threshold > 0.0) {
    std::mutex merge;
    at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> local(groups * k, 0);
      for (int64_t r = begin; r < end; ++r) {
        mark_outliers(xs + r * k, local.data() + (r / rows_per_group) * k, limit, k);
      }
      std::lock_guard<std::mutex> lock(merge);
      for (size_t i = 0; i < local.size(); ++i) mask[i] |= local[i];
    });
    any_outlier = std::any_of(mask.begin(), mask.end(), [](uint8_t f) { return f != 0; });
  }

  std::vector<int64_t> union_columns;
  if (any_outlier) {
    for (int64_t c = 0; c < k; ++c) {
      for (int64_t g = 0; g < groups; ++g) {
        if (mask[g * k + c]) {
          union_columns.push_back(c);
          break;
        }
      }
    }
  }
  const int64_t n_cols = static_cast<int64_t>(union_columns.size());

  Quantized out;
  const bool u7 = encoding == Encoding::Unsigned7;
  out.xq = at::empty({m, k}, x.options().dtype(u7 ? at::kByte : at::kChar));
  if (u7) out.zero_point = at::empty({m}, x.options().dtype(at::kInt));
  out.row_scale = at::empty({m, 1}, x.options());
  out.columns = at::from_blob(union_columns.data(), {n_cols}, at::kLong).clone();
  out.own = at::zeros({m, n_cols}, x.options());
  int8_t* q = u7 ? nullptr : out.xq.data_ptr<int8_t>();
  uint8_t* q_u7 = u7 ? out.xq.data_ptr<uint8_t>() : nullptr;
  int32_t* zero_points = u7 ? out.zero_point.data_ptr<int32_t>() : nullptr;
  float* scales = out.row_scale.data_ptr<float>();
  float* own = out.own.data_ptr<float>();

  // Each sample's columns as bit masks for the row kernels.
  std::vector<uint32_t> keep;
  if (any_outlier) {
    keep.resize(groups * k);
    for (size_t i = 0; i < keep.size(); ++i) keep[i] = mask[i] ? 0u : 0xffffffffu;
  }

  // Pass 2: per row, the absmax of the regular entries, then the quantised row.
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xs + r * k;
      const int64_t group = r / rows_per_group;
      const uint32_t* row_keep = any_outlier ? keep.data() + group * k : nullptr;
      if (u7) {
        int32_t lo_key = 0, hi_key = 0;
        key_range(reinterpret_cast<const uint32_t*>(row), row_keep, k, &lo_key, &hi_key);
        const float lo = std::min(0.0f, key_float(lo_key));
        const float hi = std::max(0.0f, key_float(hi_key));
        const float scale = std::max((hi - lo) / 127.0f, 1e-12f);
        const float zero_point = std::min(127.0f, std::max(0.0f, std::nearbyint(-lo / scale)));
        scales[r] = scale;
        zero_points[r] = static_cast<int32_t>(zero_point);
        quantize_row_u7(row, row_keep, scale, zero_point, q_u7 + r * k, k);
      } else {
        const float scale = std::max(row_absmax(row, row_keep, k) / 127.0f, 1e-12f);
        scales[r] = scale;
        if (row_keep) {
          quantize_masked_row(row, row_keep, scale, q + r * k, k);
        } else {
          quantize_row(row, scale, q + r * k, k);
        }
      }
      if (row_keep) {
        const uint8_t* flags = mask.data() + group * k;
        float* own_row = own + r * n_cols;
        for (int64_t j = 0; j < n_cols; ++j) {
          const int64_t c = union_columns[j];
          if (flags[c]) own_row[j] = row[c];
        }
      }
    }
  });
  return out;
}

// acc: int32 [M, N] from `_int_mm`; row_scale f32 [M, 1]; col_scale f32 [N]:
// (float(acc) * row_scale) * col_scale, in the order the ATen path multiplies.
at::Tensor rescale(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& col_scale) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt && acc.device().is_cpu(),
              "asr_int8_rescale: acc must be an int32 CPU matrix");
  const auto acc_c = acc.contiguous();
  const auto rows = row_scale.contiguous();
  const auto cols = col_scale.contiguous();
  const int64_t m = acc_c.size(0), n = acc_c.size(1);
  at::Tensor y = at::empty({m, n}, acc.options().dtype(at::kFloat));
  const int32_t* a = acc_c.data_ptr<int32_t>();
  const float* rs = rows.data_ptr<float>();
  const float* cs = cols.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rescale_row(a + r * n, rs[r], cs, ys + r * n, n);
  });
  return y;
}

}  // namespace

// Returns 0 and four new tensors, or -1 after printing libtorch's error.
extern "C" int asr_int8_quantize(at::Tensor* x, double threshold, int64_t groups, at::Tensor** xq,
                                 at::Tensor** row_scale, at::Tensor** columns, at::Tensor** own) {
  try {
    Quantized out = quantize(*x, threshold, groups, Encoding::Symmetric);
    *xq = new at::Tensor(std::move(out.xq));
    *row_scale = new at::Tensor(std::move(out.row_scale));
    *columns = new at::Tensor(std::move(out.columns));
    *own = new at::Tensor(std::move(out.own));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asr_int8_quantize: %s\n", e.what());
    return -1;
  }
}

// asr_int8_quantize with the Unsigned7 encoding: u8 levels and a zero point per row besides.
extern "C" int asr_int8_quantize_u7(at::Tensor* x, double threshold, int64_t groups,
                                    at::Tensor** xq, at::Tensor** zero_point,
                                    at::Tensor** row_scale, at::Tensor** columns,
                                    at::Tensor** own) {
  try {
    Quantized out = quantize(*x, threshold, groups, Encoding::Unsigned7);
    *xq = new at::Tensor(std::move(out.xq));
    *zero_point = new at::Tensor(std::move(out.zero_point));
    *row_scale = new at::Tensor(std::move(out.row_scale));
    *columns = new at::Tensor(std::move(out.columns));
    *own = new at::Tensor(std::move(out.own));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asr_int8_quantize_u7: %s\n", e.what());
    return -1;
  }
}

extern "C" at::Tensor* asr_int8_rescale(at::Tensor* acc, at::Tensor* row_scale, at::Tensor* col_scale) {
  try {
    return new at::Tensor(rescale(*acc, *row_scale, *col_scale));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asr_int8_rescale: %s\n", e.what());
    return nullptr;
  }
}
