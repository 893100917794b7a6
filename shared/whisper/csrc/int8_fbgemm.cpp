// The int8 GEMM on x86 CPUs without AVX512-VNNI (see int8_gemm.rs): fbgemm, the library under
// PyTorch's quantized CPU ops, shipped inside the torch wheel. Its AVX2 kernel multiplies
// u8 activations by s8 weights with `vpmaddubsw`, which adds each pair of products into a
// saturating int16; with activations in 0..127 (7 bits) a pair is at most 2 * 127 * 127 <
// 2^15 and the int32 result is exact. quantize_u7 (int8_quant.cpp) makes such activations,
// with a zero point per row; this file packs the weight once and returns
// sum_k (q[m, k] - zero_point[m]) * w[k, n] as int32, the same integer `_int_mm` would give
// for the centred values.
//
// Compiled with -fopenmp (libtorch's own libgomp, see build.rs) so that `at::parallel_for`
// runs fbgemm's per-thread blocks on libtorch's intra-op threads, as PyTorch's quantized
// linear does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fbgemm/Fbgemm.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

namespace {

struct PackedWeight {
  std::unique_ptr<fbgemm::PackBMatrix<int8_t>> packed;
  std::vector<int32_t> column_sums;  // sum_k w[k, n], for the zero-point correction
  int64_t k = 0;
  int64_t n = 0;
};

PackedWeight* pack(const at::Tensor& q_t) {
  TORCH_CHECK(q_t.dim() == 2 && q_t.scalar_type() == at::kChar && q_t.device().is_cpu(),
              "asr_fbgemm_pack: the weight must be an int8 CPU matrix [K, N]");
  const auto w = q_t.contiguous();
  auto out = std::make_unique<PackedWeight>();
  out->k = w.size(0);
  out->n = w.size(1);
  TORCH_CHECK(out->k > 0 && out->n > 0 && out->k < (1 << 30) && out->n < (1 << 30),
              "asr_fbgemm_pack: shape out of range");
  const int8_t* data = w.data_ptr<int8_t>();
  out->packed = std::make_unique<fbgemm::PackBMatrix<int8_t>>(
      fbgemm::matrix_op_t::NoTranspose, static_cast<int32_t>(out->k),
      static_cast<int32_t>(out->n), data, static_cast<int32_t>(out->n), nullptr, 1);
  out->column_sums.assign(out->n, 0);
  for (int64_t r = 0; r < out->k; ++r) {
    const int8_t* row = data + r * out->n;
    for (int64_t c = 0; c < out->n; ++c) out->column_sums[c] += row[c];
  }
  return out.release();
}

// xq: u8 [M, K] in 0..127; zero_point: int32 [M]. Returns int32 [M, N].
at::Tensor product(const at::Tensor& xq, const at::Tensor& zero_point, const PackedWeight& w) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kByte && xq.device().is_cpu() &&
                  xq.is_contiguous(),
              "asr_fbgemm_mm: activations must be a contiguous u8 CPU matrix");
  TORCH_CHECK(xq.size(1) == w.k, "asr_fbgemm_mm: K differs from the packed weight's");
  const int64_t m = xq.size(0);
  TORCH_CHECK(zero_point.scalar_type() == at::kInt && zero_point.numel() == m,
              "asr_fbgemm_mm: one int32 zero point per row");
  const auto zp = zero_point.contiguous();
  at::Tensor acc = at::empty({m, w.n}, xq.options().dtype(at::kInt));
  if (m == 0) return acc;
  const uint8_t* a = xq.data_ptr<uint8_t>();
  int32_t* c = acc.data_ptr<int32_t>();
  const int32_t rows = static_cast<int32_t>(m), k = static_cast<int32_t>(w.k),
                n = static_cast<int32_t>(w.n);
  // fbgemm splits the work among `tasks` callers itself; one task per intra-op thread.
  const int tasks = at::get_num_threads();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      fbgemm::PackAMatrix<uint8_t> packed_a(fbgemm::matrix_op_t::NoTranspose, rows, k, a, k,
                                            nullptr, 1);
      fbgemm::DoNothing<int32_t, int32_t> done;
      fbgemm::memCopy<> copy(done);
      fbgemm::fbgemmPacked(packed_a, *w.packed, c, c, static_cast<uint32_t>(n), copy,
                           static_cast<int>(task), tasks);
    }
  });
  const int32_t* zps = zp.data_ptr<int32_t>();
  const int32_t* sums = w.column_sums.data();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t z = zps[r];
      int32_t* row = c + r * w.n;
      for (int64_t j = 0; j < w.n; ++j) row[j] -= z * sums[j];
    }
  });
  return acc;
}

// Rows `rows` of the weight [K, N] (the outlier columns' inputs), int8 [C, N].
at::Tensor gather_rows(const PackedWeight& w, const at::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "asr_fbgemm_rows: the rows must be an int64 vector");
  const auto idx = rows.contiguous();
  const int64_t count = idx.size(0);
  at::Tensor out = at::empty({count, w.n}, at::TensorOptions().dtype(at::kChar));
  const int64_t* ids = idx.data_ptr<int64_t>();
  const int8_t* buf = w.packed->getBuf();
  int8_t* dst = out.data_ptr<int8_t>();
  // Within a block of columns, a row's entries sit at a fixed stride (fbgemm interleaves
  // a few rows per column): one `addr` call per block and its stride, instead of one
  // out-of-line call per entry (100x slower: 0.38 ms for 24 rows of 2048).
  const int64_t block = std::max<int32_t>(1, w.packed->blockColSize());
  for (int64_t r = 0; r < count; ++r) {
    TORCH_CHECK(ids[r] >= 0 && ids[r] < w.k, "asr_fbgemm_rows: row out of range");
    const int32_t i = static_cast<int32_t>(ids[r]);
    int8_t* out_row = dst + r * w.n;
    for (int64_t start = 0; start < w.n; start += block) {
      const int64_t end = std::min(w.n, start + block);
      const int64_t base = w.packed->addr(i, static_cast<int32_t>(start));
      const int64_t stride =
          end - start > 1 ? w.packed->addr(i, static_cast<int32_t>(start + 1)) - base : 1;
      for (int64_t j = start; j < end; ++j) out_row[j] = buf[base + (j - start) * stride];
    }
  }
  return out;
}

// The whole weight back, int8 [K, N].
at::Tensor unpack(const PackedWeight& w) {
  at::Tensor out = at::empty({w.k, w.n}, at::TensorOptions().dtype(at::kChar));
  w.packed->unpack(out.data_ptr<int8_t>());
  return out;
}

}  // namespace

// Runs `body`, returning its pointer, or null after printing libtorch's error under `name`:
// nothing may unwind into the Rust caller.
template <class Body>
auto guarded(const char* name, Body body) -> decltype(body()) {
  try {
    return body();
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
  }
  return nullptr;
}

extern "C" int asr_fbgemm_supported() { return fbgemm::fbgemmSupportedCPU() ? 1 : 0; }

// A packed copy of `q_t` (int8 [K, N]), or null after printing the error.
extern "C" void* asr_fbgemm_pack(at::Tensor* q_t) {
  return guarded("asr_fbgemm_pack", [&]() -> void* { return pack(*q_t); });
}

extern "C" void asr_fbgemm_free(void* packed) { delete static_cast<PackedWeight*>(packed); }

// Bytes held by a packed weight (its panels plus the column sums).
extern "C" int64_t asr_fbgemm_bytes(void* packed) {
  const auto* w = static_cast<const PackedWeight*>(packed);
  const auto& b = *w->packed;
  return static_cast<int64_t>(b.blockRows()) * b.blockRowSize() * b.blockCols() *
             b.blockColSize() +
         static_cast<int64_t>(w->column_sums.size() * sizeof(int32_t));
}

extern "C" at::Tensor* asr_fbgemm_mm(at::Tensor* xq, at::Tensor* zero_point, void* packed) {
  return guarded("asr_fbgemm_mm", [&] {
    return new at::Tensor(product(*xq, *zero_point, *static_cast<const PackedWeight*>(packed)));
  });
}

extern "C" at::Tensor* asr_fbgemm_rows(void* packed, at::Tensor* rows) {
  return guarded("asr_fbgemm_rows", [&] {
    return new at::Tensor(gather_rows(*static_cast<const PackedWeight*>(packed), *rows));
  });
}

extern "C" at::Tensor* asr_fbgemm_unpack(void* packed) {
  return guarded("asr_fbgemm_unpack", [&] {
    return new at::Tensor(unpack(*static_cast<const PackedWeight*>(packed)));
  });
}
