//! Where a training step's time goes: `cargo run --release -p asr-whisper --example
//! train_profile -- MODEL_DIR [f32|bf16]` (int8 base, recipe LoRA, batch 4, 20 label tokens).
use std::time::Instant;

use asr_whisper::labels::{collate_labels, label_loss};
use asr_whisper::{Adapter, LoadOptions, LoadedModel, LoraConfig, OutputProjection};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let mut m = LoadedModel::load(
        &dir,
        LoadOptions {
            output_projection: Some(OutputProjection::Tied),
            ..Default::default()
        },
    )?;
    m.model.set_compute_kind(
        (args.get(2).map(String::as_str) == Some("bf16")).then_some(Kind::BFloat16),
    );
    let adapter = Adapter::init(LoraConfig::default(), &m.model.linear_sites(), Device::Cpu)?;
    m.model.attach(&adapter);
    // As the trainer: bitsandbytes' symmetric 8-bit activations on the int8 base.
    m.model.set_symmetric_int8(true);
    adapter.set_training(true);
    // ASR_PROFILE_MEL=FILE.npy: real windows `[N, 80, 3000]`, repeated to 4 (random ones
    // otherwise; their outliers differ from speech's, which moves the int8 layers' paths).
    let mel = match std::env::var("ASR_PROFILE_MEL") {
        Ok(path) => {
            let real = Tensor::read_npy(path)?;
            let n = real.size()[0];
            real.repeat([4 / n + 1, 1, 1]).narrow(0, 0, 4)
        }
        Err(_) => Tensor::randn([4, 80, 3000], (Kind::Float, Device::Cpu)),
    };
    let rows: Vec<Vec<i64>> = (0..4).map(|_| vec![50258_i64; 20]).collect();
    let labels = collate_labels(&rows, 50258, 50257);
    // ROUNDS=N steps (default 3); the first warms up and is left out of the median.
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(2);
    let mut totals = Vec::new();
    for round in 0..rounds {
        let t = Instant::now();
        let encoded = m.model.encoder.forward(&mel);
        let t_enc = t.elapsed().as_secs_f64();
        let mut cache = m.model.decoder.new_cache(&encoded);
        let logits = m
            .model
            .decoder
            .forward(&labels.decoder_input_ids, &mut cache);
        let loss = label_loss(&logits, &labels.labels);
        let t_fwd = t.elapsed().as_secs_f64();
        loss.backward();
        let t_all = t.elapsed().as_secs_f64();
        println!(
            "round {round}: encoder fwd {t_enc:.3} s, decoder+loss {:.3} s, backward {:.3} s, total {t_all:.3} s",
            t_fwd - t_enc,
            t_all - t_fwd
        );
        if round > 0 {
            totals.push(t_all);
        }
        for p in adapter.trainable_tensors() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
    totals.sort_by(f64::total_cmp);
    println!(
        "median total {:.3} s, min {:.3} s",
        totals[totals.len() / 2],
        totals[0]
    );
    Ok(())
}
