//! Where decoding time goes: `cargo run --release -p asr-whisper --example profile -- MODEL_DIR [int8|fp32]`.
//! `ASR_THREADS=N` sets the intra-op threads (default 2).
use std::time::Instant;

use asr_whisper::{LoadOptions, LoadedModel, Precision};
use tch::{Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let precision = if args.get(2).map(String::as_str) == Some("fp32") {
        Precision::Fp32
    } else {
        Precision::Int8
    };
    tch::set_num_threads(
        std::env::var("ASR_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(2),
    );
    let mut m = LoadedModel::load(
        &dir,
        LoadOptions {
            precision,
            output_projection: match std::env::var("ASR_PROFILE_PROJECTION").as_deref() {
                Ok("int8") => Some(asr_whisper::OutputProjection::Int8),
                Ok("bf16") => Some(asr_whisper::OutputProjection::BFloat16),
                Ok("tied") => Some(asr_whisper::OutputProjection::Tied),
                _ => None,
            },
            ..Default::default()
        },
    )?;
    // ASR_PROFILE_COMPUTE=bf16: the linears' products and the encoder's attention in bf16.
    if std::env::var("ASR_PROFILE_COMPUTE").as_deref() == Ok("bf16") {
        m.model.set_compute_kind(Some(Kind::BFloat16));
    }
    let model = &m.model;
    println!("after load: {}", rss());
    attention_timings();
    tch::no_grad(|| {
        for batch in [1i64, 2] {
            // ASR_PROFILE_MEL=FILE.npy: real windows `[2, 80, 3000]` (random ones otherwise).
            let mel = match std::env::var("ASR_PROFILE_MEL") {
                Ok(path) => Tensor::read_npy(path).expect("mel npy").narrow(0, 0, batch),
                Err(_) => Tensor::randn([batch, 80, 3000], (Kind::Float, tch::Device::Cpu)),
            };
            let _ = model.encoder.forward(&mel);
            // The fastest of three runs: other processes on a small machine add noise.
            let mut best = f64::INFINITY;
            let mut enc = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
            for _ in 0..3 {
                let t = Instant::now();
                enc = model.encoder.forward(&mel);
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("encoder batch {batch}: {best:.3} s (best of 3), {}", rss());
            if std::env::var("ASR_PROFILE_ENCODER_ONLY").is_ok() {
                continue;
            }
            let enc8 = enc.repeat([8 / batch, 1, 1]);
            for b in [1i64, 8] {
                let e = enc8.narrow(0, 0, b);
                let mut cache = model.decoder.new_cache(&e);
                let prompt = Tensor::from_slice(&[50258i64, 50260, 50359, 50363])
                    .unsqueeze(0)
                    .repeat([b, 1]);
                let _ = model.decoder.forward(&prompt, &mut cache);
                let tok = Tensor::from_slice(&[400i64]).unsqueeze(0).repeat([b, 1]);
                let n = 50;
                let t = Instant::now();
                for _ in 0..n {
                    let _ = model
                        .decoder
                        .forward(&tok, &mut cache)
                        .select(1, -1)
                        .argmax(-1, false);
                }
                println!(
                    "  decoder step batch {b}: {:.2} ms",
                    t.elapsed().as_secs_f64() * 1000.0 / n as f64
                );
                // On to position 400 (a repetition loop runs to the 448-token limit).
                for _ in cache.offset()..390 {
                    let _ = model.decoder.forward(&tok, &mut cache);
                }
                let t = Instant::now();
                for _ in 0..n / 5 {
                    let _ = model.decoder.forward(&tok, &mut cache);
                }
                println!(
                    "  decoder step batch {b} at position 400: {:.2} ms",
                    t.elapsed().as_secs_f64() * 1000.0 / (n / 5) as f64
                );
            }
        }
    });
    Ok(())
}

/// One encoder layer's self-attention (whisper-base: 8 heads, 1500 positions): libtorch's
/// float32 kernel against the bfloat16 one where the CPU has it.
fn attention_timings() {
    let make = || Tensor::randn([1, 1500, 8, 64], (Kind::Float, tch::Device::Cpu)).transpose(1, 2);
    let (q, k, v) = (make(), make(), make());
    let best_of = |f: &dyn Fn() -> Tensor| {
        let _ = f();
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let _ = f();
                t.elapsed().as_secs_f64() * 1000.0
            })
            .fold(f64::INFINITY, f64::min)
    };
    let sdpa = best_of(&|| {
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, false, None, false)
    });
    print!("encoder self-attention [1, 8, 1500, 64]: libtorch f32 {sdpa:.1} ms");
    if asr_whisper::attention_bf16::supported() {
        let ours =
            best_of(&|| asr_whisper::attention_bf16::attend(&q, &k, &v).expect("bf16 kernel"));
        print!(", bf16 products {ours:.1} ms");
    }
    println!();
}

fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}
