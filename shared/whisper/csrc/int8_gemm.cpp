// Whether torch's CPU `_int_mm` has its fast kernel on this CPU (see int8_gemm.rs): it goes
// through oneDNN only with AVX512-VNNI, and runs a reference loop elsewhere.
#include <ATen/cpu/Utils.h>

extern "C" int asr_cpu_int_mm_is_fast() { return at::cpu::is_avx512_vnni_supported() ? 1 : 0; }
