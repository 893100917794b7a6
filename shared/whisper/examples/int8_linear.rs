//! One int8 linear against the f32 product on encoder-sized inputs:
//! `cargo run --release -p asr-whisper --example int8_linear`. First the parts of an outlier
//! product with a packed (fbgemm) weight, then whole layers at encoder and decoder sizes.
use std::time::Instant;

use asr_whisper::linear::Linear;
use tch::{Kind, Tensor};

fn best_of<F: FnMut() -> Tensor>(runs: usize, mut f: F) -> f64 {
    let _ = f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let _ = f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    tch::set_num_threads(2);
    parts();
    few_rows();
    tch::manual_seed(0);
    println!("gemm: {:?}", asr_whisper::int8_gemm::cpu_int8_gemm());
    for (m, k, n) in [
        (1500, 512, 512),
        (1500, 512, 2048),
        (1500, 2048, 512),
        (8, 512, 2048),
    ] {
        let w = Tensor::randn([n, k], (Kind::Float, tch::Device::Cpu)) * 0.05;
        let x = Tensor::randn([m, k], (Kind::Float, tch::Device::Cpu));
        let float = Linear::float_from(&w);
        let int8 = Linear::int8_from(&w, 6.0);
        let no_outliers = Linear::int8_from(&w, 0.0);
        tch::no_grad(|| {
            let f = best_of(5, || float.forward(&x));
            let i = best_of(5, || int8.forward(&x));
            let i0 = best_of(5, || no_outliers.forward(&x));
            let with_outliers = |count: i64| {
                let xo = x.copy();
                let _ = xo.narrow(1, 0, count.min(k)).fill_(8.0);
                best_of(5, || int8.forward(&xo))
            };
            // 24 outlier columns, as q/k/v of the later encoder layers; a quarter and
            // nearly all, as fc2 and fc1 of whisper-base's encoder layers 4 and 5 on speech.
            let (o24, quarter, most) = (
                with_outliers(24),
                with_outliers(k / 4),
                with_outliers(k - 5),
            );
            println!(
                "{m}x{k}x{n}: f32 {f:.2} ms, int8 {i:.2} ms (x{:.2}), threshold 0 {i0:.2} ms, outlier columns: 24 {o24:.2} ms, {} {quarter:.2} ms, {} {most:.2} ms",
                f / i, k / 4, k - 5
            );
        });
    }
}

fn parts() {
    use asr_whisper::int8_gemm::PackedInt8Weight;
    let q_t = Tensor::randint_low(-127, 127, [512, 2048], (Kind::Int8, tch::Device::Cpu));
    let packed = PackedInt8Weight::pack(&q_t).expect("pack");
    let columns = Tensor::arange(24, (Kind::Int64, tch::Device::Cpu)) * 7;
    let scale = Tensor::rand([2048], (Kind::Float, tch::Device::Cpu));
    let own = Tensor::randn([8, 24], (Kind::Float, tch::Device::Cpu));
    let y = Tensor::randn([8, 2048], (Kind::Float, tch::Device::Cpu));
    let g = best_of(20, || packed.rows(&columns).expect("rows"));
    let rows = packed.rows(&columns).expect("rows");
    let d = best_of(20, || rows.to_kind(Kind::Float) * scale.unsqueeze(0));
    let w = rows.to_kind(Kind::Float) * scale.unsqueeze(0);
    let p = best_of(20, || own.matmul(&w));
    let a = best_of(20, || &y + own.matmul(&w));
    let plain = best_of(20, || q_t.index_select(0, &columns));
    println!("outlier parts (8x24x2048): gather {g:.3} ms (plain index_select {plain:.3}), dequantise {d:.3}, product {p:.3}, product+add {a:.3}");
}

/// Decoder-step sizes: LLM.int8 (with a few outlier columns) against residual activations.
fn few_rows() {
    for (k, n) in [(512, 512), (512, 2048), (2048, 512)] {
        let w = Tensor::randn([n, k], (Kind::Float, tch::Device::Cpu)) * 0.05;
        let int8 = Linear::int8_from(&w, 6.0);
        let residual = Linear::int8_residual_from(&w);
        for m in [1, 8, 16, 32, 64, 128] {
            let x = Tensor::randn([m, k], (Kind::Float, tch::Device::Cpu));
            let _ = x.narrow(1, 0, 8).fill_(8.0);
            tch::no_grad(|| {
                let i = best_of(20, || int8.forward(&x));
                let r = best_of(20, || residual.forward(&x));
                println!("{m}x{k}x{n}: int8 with 8 outlier columns {i:.3} ms, residual {r:.3} ms");
            });
        }
    }
}
