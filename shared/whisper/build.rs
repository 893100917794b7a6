//! Links the crate's binaries to the venv's libtorch and compiles the C++ autograd Function
//! that carries gradients through int8 linear layers (csrc/int8_grad.cpp) and the fused CPU
//! passes of the int8 linear (csrc/int8_quant.cpp), and fbgemm's int8 GEMM for CPUs without
//! AVX512-VNNI (csrc/int8_fbgemm.cpp), and the bf16 attention and logits kernels for CPUs
//! with AVX512-BF16 (csrc/bf16_kernels.cpp).

fn main() {
    build_support::link_libtorch_rpath();
    println!("cargo:rerun-if-changed=csrc/int8_grad.cpp");
    println!("cargo:rerun-if-changed=csrc/int8_quant.cpp");
    println!("cargo:rerun-if-changed=csrc/int8_gemm.cpp");
    println!("cargo:rerun-if-changed=csrc/int8_fbgemm.cpp");
    println!("cargo:rerun-if-changed=csrc/bf16_kernels.cpp");
    println!("cargo:rerun-if-changed=csrc/attention_bf16_train.cpp");
    println!("cargo:rerun-if-changed=csrc/bf16_common.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(std::path::PathBuf::from) else {
        panic!("LIBTORCH is not set (.cargo/config.toml sets it to .venv/libtorch; run scripts/setup.sh)");
    };
    let include = libtorch.join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/int8_grad.cpp")
        .file("csrc/int8_quant.cpp")
        .file("csrc/int8_gemm.cpp")
        // The fused int8 passes run on every linear layer's activations: optimised even in
        // debug builds, where tests would otherwise spend minutes in them.
        .opt_level(3)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .compile("asr_int8_grad");

    // fbgemm's GEMM (csrc/int8_fbgemm.cpp) and the bf16 kernels (csrc/bf16_kernels.cpp) run
    // their blocks on libtorch's OpenMP threads: these files alone are compiled with -fopenmp
    // and linked to the wheel's own libgomp, the runtime libtorch_cpu already loads, so one
    // OpenMP runtime serves all.
    cc::Build::new()
        .cpp(true)
        .file("csrc/int8_fbgemm.cpp")
        .file("csrc/bf16_kernels.cpp")
        .file("csrc/attention_bf16_train.cpp")
        .opt_level(3)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-fopenmp")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .compile("asr_openmp_kernels");
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
}
