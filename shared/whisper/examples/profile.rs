//! Where decoding time goes: `cargo run --release -p asr-whisper --example profile -- MODEL_DIR [int8|fp32]`.
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
    tch::set_num_threads(2);
    let m = LoadedModel::load(
        &dir,
        LoadOptions {
            precision,
            ..Default::default()
        },
    )?;
    let model = &m.model;
    println!("after load: {}", rss());
    tch::no_grad(|| {
        for batch in [1i64, 2] {
            let mel = Tensor::randn([batch, 80, 3000], (Kind::Float, tch::Device::Cpu));
            let _ = model.encoder.forward(&mel);
            let t = Instant::now();
            let enc = model.encoder.forward(&mel);
            println!(
                "encoder batch {batch}: {:.3} s, {}",
                t.elapsed().as_secs_f64(),
                rss()
            );
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
            }
        }
    });
    Ok(())
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
