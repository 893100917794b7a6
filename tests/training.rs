//! Training semantics against HF transformers on whisper-base: labels, decoder inputs and the
//! loss as the recipe's notebook makes them (WhisperProcessor with language Chinese, the
//! speech seq2seq collator, `shift_tokens_right`, the model's cross-entropy).

use asr_whisper::labels::{collate_labels, label_loss, label_tokens};
use asr_whisper::{LoadedModel, Precision, Task};
use e2e_support::run_reference;
use e2e_support::whisper_base::{first_windows, load, model_dir, test_clips, write_windows_npy};
use tch::Tensor;

/// Decoder logits for `decoder_input_ids` on the encoded `mel` (gradients flow when enabled).
fn teacher_forced(model: &LoadedModel, mel: &Tensor, decoder_input_ids: &Tensor) -> Tensor {
    let encoded = model.model.encoder.forward(mel);
    let mut cache = model.model.decoder.new_cache(&encoded);
    model.model.decoder.forward(decoder_input_ids, &mut cache)
}

#[test]
fn labels_and_loss_match_the_recipes_collator() {
    let clips = test_clips(4);
    let mut texts: Vec<String> = clips.iter().map(|c| c.text.clone()).collect();
    // A row of another length, and Latin text, so padding and the byte-level BPE both show.
    texts[1] = format!("{} Hello, world", texts[1]);
    let windows = first_windows(&clips);
    let dir = tempfile::tempdir().expect("tempdir");
    let features = dir.path().join("features.npy");
    write_windows_npy(&features, &windows);
    let job = serde_json::json!({"model": model_dir(), "texts": texts, "features": features});
    let hf: serde_json::Value =
        serde_json::from_str(&run_reference("hf_labels.py", &[], Some(&job.to_string())))
            .expect("json");
    let rows =
        |key: &str| -> Vec<Vec<i64>> { serde_json::from_value(hf[key].clone()).expect("rows") };

    let model = load(Precision::Fp32);
    let g = &model.generation;
    let tokens: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| label_tokens(&model.tokenizer, g, t, Some("zh"), Task::Transcribe))
        .collect::<anyhow::Result<_>>()
        .expect("labels");
    let batch = collate_labels(&tokens, g.decoder_start_token_id, g.eos_token_id);
    assert_eq!(
        Vec::<Vec<i64>>::try_from(&batch.labels).expect("labels"),
        rows("labels")
    );
    assert_eq!(
        Vec::<Vec<i64>>::try_from(&batch.decoder_input_ids).expect("inputs"),
        rows("decoder_input_ids")
    );

    let loss = tch::no_grad(|| {
        let logits = teacher_forced(&model, &model.batch(&windows), &batch.decoder_input_ids);
        label_loss(&logits, &batch.labels).double_value(&[])
    });
    let theirs = hf["loss"].as_f64().expect("loss");
    println!("labels and decoder inputs identical to HF's on {} rows; loss ours {loss:.6}, HF {theirs:.6}", texts.len());
    assert!((loss - theirs).abs() <= 1e-4, "loss {loss} vs HF {theirs}");
}

/// AdamW, the linear schedule with warmup and global-norm clipping against torch's and HF's
/// over 12 steps of random gradients (some clipped).
#[test]
fn optimiser_matches_torch_adamw_with_hf_schedule() {
    use asr_whisper::optim::{clip_grad_norm, AdamW, AdamWConfig, LinearSchedule};
    tch::manual_seed(8);
    let shapes = [[3i64, 4], [1, 5]];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, (tch::Kind::Float, tch::Device::Cpu)))
        .collect();
    let steps = 12;
    let grads: Vec<Vec<Tensor>> = (0..steps)
        .map(|i| {
            shapes
                .iter()
                .map(|s| {
                    Tensor::randn(*s, (tch::Kind::Float, tch::Device::Cpu)) * (1.0 + i as f64 * 0.3)
                })
                .collect()
        })
        .collect();
    let as_rows = |t: &Tensor| Vec::<Vec<f32>>::try_from(t).expect("rows");
    let job = serde_json::json!({
        "params": init.iter().map(as_rows).collect::<Vec<_>>(),
        "grads": grads.iter().map(|g| g.iter().map(as_rows).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "lr": 1e-2, "warmup": 3, "total": steps, "max_grad_norm": 1.0, "weight_decay": 0.01,
    });
    let torch_out: serde_json::Value = serde_json::from_str(&run_reference(
        "adamw_reference.py",
        &[],
        Some(&job.to_string()),
    ))
    .expect("json");

    let params: Vec<Tensor> = init
        .iter()
        .map(|t| t.copy().set_requires_grad(true))
        .collect();
    let config = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        ..Default::default()
    };
    let schedule = LinearSchedule {
        base_lr: 1e-2,
        warmup: 3,
        total: steps,
    };
    let mut opt = AdamW::new(params.iter().map(Tensor::shallow_clone).collect(), config);
    for (step, step_grads) in grads.iter().enumerate() {
        for (p, g) in params.iter().zip(step_grads) {
            (p * g).sum(tch::Kind::Float).backward();
        }
        let norm = clip_grad_norm(&params, 1.0);
        let lr = schedule.lr(step as i64);
        let theirs_lr = torch_out["lrs"][step].as_f64().expect("lr");
        let theirs_norm = torch_out["norms"][step].as_f64().expect("norm");
        assert!(
            (lr - theirs_lr).abs() < 1e-12,
            "step {step}: lr {lr} vs {theirs_lr}"
        );
        assert!(
            (norm - theirs_norm).abs() < 1e-4 * theirs_norm,
            "step {step}: norm {norm} vs {theirs_norm}"
        );
        opt.step(lr);
        opt.zero_grad();
    }
    let mut worst = 0f64;
    for (i, p) in params.iter().enumerate() {
        let theirs: Vec<Vec<f32>> =
            serde_json::from_value(torch_out["params"][i].clone()).expect("params");
        let theirs = Tensor::from_slice(&theirs.concat()).view(p.size().as_slice());
        worst = worst.max((p.detach() - theirs).abs().max().double_value(&[]));
    }
    println!(
        "AdamW + schedule + clipping: parameters after {steps} steps within {worst:.2e} of torch's"
    );
    assert!(worst < 1e-5, "parameters differ by {worst}");
}

/// The pieces together, as one training loop will run them: the recipe's LoRA on the int8
/// whisper-base (frozen), labels from the collator, AdamW at lr 1e-3 with clipping. A few
/// steps on 4 clips must bring their loss well down (the adapter can fit them).
#[test]
fn recipe_lora_on_the_int8_base_fits_a_few_clips() {
    use asr_whisper::optim::{clip_grad_norm, AdamW, AdamWConfig};
    use asr_whisper::{Adapter, LoraConfig};
    tch::manual_seed(0);
    let clips = test_clips(4);
    let windows = first_windows(&clips);
    let mut model = load(Precision::Int8);
    let adapter = Adapter::init(
        LoraConfig::default(),
        &model.model.linear_sites(),
        tch::Device::Cpu,
    )
    .expect("adapter");
    model.model.attach(&adapter);
    adapter.set_training(true);
    let g = &model.generation;
    let tokens: Vec<Vec<i64>> = clips
        .iter()
        .map(|c| label_tokens(&model.tokenizer, g, &c.text, Some("zh"), Task::Transcribe))
        .collect::<anyhow::Result<_>>()
        .expect("labels");
    let batch = collate_labels(&tokens, g.decoder_start_token_id, g.eos_token_id);
    let mel = model.batch(&windows);
    let params = adapter.trainable_tensors();
    let mut opt = AdamW::new(
        params.iter().map(Tensor::shallow_clone).collect(),
        AdamWConfig::default(),
    );
    let mut losses = Vec::new();
    for _ in 0..5 {
        let logits = teacher_forced(&model, &mel, &batch.decoder_input_ids);
        let loss = label_loss(&logits, &batch.labels);
        loss.backward();
        clip_grad_norm(&params, 1.0);
        opt.step(1e-3);
        opt.zero_grad();
        losses.push(loss.double_value(&[]));
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    println!(
        "int8 base + LoRA r=4 on 4 clips, 5 AdamW steps: loss {}",
        losses
            .iter()
            .map(|l| format!("{l:.3}"))
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    let (trainable, all) = model.model.parameter_counts();
    println!(
        "{}",
        asr_whisper::lora::trainable_parameters_line(trainable, all)
    );
    assert!(last < 0.5 * first, "loss went from {first} to {last}");
}

/// `asr adapters merge --quantize int8`'s core on whisper-base: an adapter folded into the
/// weights and stored int8 (bitsandbytes' layout) loads back as int8 layers of the same size
/// as the int8 base, and its logits stay as close to the attached adapter's as int8 itself is
/// to fp32.
#[test]
fn merged_int8_model_matches_the_attached_adapter() {
    use asr_whisper::adapter_io::quantize_linears;
    use asr_whisper::weights::read_model_tensors;
    use asr_whisper::{Adapter, LoraConfig, Weights, Whisper, WhisperConfig};
    use tch::{Device, Kind};
    let clips = test_clips(2);
    let mel = load(Precision::Int8).batch(&first_windows(&clips));
    let g = load(Precision::Int8).generation;
    let prompt = Tensor::from_slice(
        &g.prompt(Some("zh"), Task::Transcribe, false)
            .expect("prompt"),
    )
    .unsqueeze(0)
    .repeat([2, 1]);
    let dir = model_dir();
    tch::manual_seed(11);
    let mut int8 = load(Precision::Int8);
    let adapter = Adapter::init(
        LoraConfig::default(),
        &int8.model.linear_sites(),
        Device::Cpu,
    )
    .expect("adapter");
    tch::no_grad(|| {
        for t in adapter.trainable_tensors() {
            // B away from zero so that the adapter changes the outputs.
            t.shallow_clone().copy_(&(t.randn_like() * 0.002));
        }
    });
    int8.model.attach(&adapter);
    let mut fp32 = load(Precision::Fp32);
    fp32.model.attach(&adapter);
    let logits = |m: &LoadedModel| tch::no_grad(|| teacher_forced(m, &mel, &prompt));
    let (attached_int8, attached_fp32) = (logits(&int8), logits(&fp32));

    let mut tensors = read_model_tensors(&dir).expect("tensors");
    adapter.merge_into(&mut tensors).expect("merge");
    let layers: Vec<String> = int8
        .model
        .linear_sites()
        .into_iter()
        .filter(|s| !s.bias_only)
        .map(|s| s.name)
        .collect();
    quantize_linears(&mut tensors, &layers).expect("quantise");
    assert_eq!(tensors[&format!("{}.weight", layers[0])].kind(), Kind::Int8);
    let config = WhisperConfig::from_file(&dir.join("config.json")).expect("config");
    let merged = Whisper::load(
        Weights::from_map(tensors, Device::Cpu, Kind::Float)
            .with_int8_linears(asr_whisper::linear::DEFAULT_OUTLIER_THRESHOLD),
        &config,
    )
    .expect("merged int8 model");
    let base_int8 = Whisper::load(
        Weights::from_dir(&dir, Device::Cpu, Kind::Float)
            .expect("weights")
            .with_int8_linears(asr_whisper::linear::DEFAULT_OUTLIER_THRESHOLD),
        &config,
    )
    .expect("int8 base");
    assert_eq!(merged.weight_bytes(), base_int8.weight_bytes());
    let merged_model = LoadedModel {
        model: merged,
        ..load(Precision::Int8)
    };
    let merged_logits = logits(&merged_model);

    let scale = attached_fp32.abs().max().double_value(&[]);
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) / scale;
    let merged_vs_attached = diff(&merged_logits, &attached_int8);
    let int8_vs_fp32 = diff(&attached_int8, &attached_fp32);
    let merged_vs_fp32 = diff(&merged_logits, &attached_fp32);
    println!(
        "logits relative to their scale {scale:.1}: merged int8 vs attached int8 {merged_vs_attached:.2e}, vs attached fp32 {merged_vs_fp32:.2e}; attached int8 vs fp32 {int8_vs_fp32:.2e}"
    );
    assert!(
        merged_vs_fp32 <= 1.5 * int8_vs_fp32 && merged_vs_attached <= 2.0 * int8_vs_fp32,
        "the merged int8 model is further from the adapter than int8 is from fp32"
    );
}
