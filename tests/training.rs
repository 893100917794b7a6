//! Training semantics against HF transformers on whisper-base: labels, decoder inputs and the
//! loss as the recipe's notebook makes them (WhisperProcessor with language Chinese, the
//! speech seq2seq collator, `shift_tokens_right`, the model's cross-entropy).

use asr_whisper::labels::{collate_labels, label_loss, label_tokens};
use asr_whisper::{Precision, Task};
use e2e_support::run_reference;
use e2e_support::whisper_base::{first_windows, load, model_dir, test_clips};

#[test]
fn labels_and_loss_match_the_recipes_collator() {
    let clips = test_clips(4);
    let mut texts: Vec<String> = clips.iter().map(|c| c.text.clone()).collect();
    // A row of another length, and Latin text, so padding and the byte-level BPE both show.
    texts[1] = format!("{} Hello, world", texts[1]);
    let windows = first_windows(&clips);
    let dir = tempfile::tempdir().expect("tempdir");
    let features = dir.path().join("features.npy");
    asr_audio::npy::write_f32(
        std::fs::File::create(&features).expect("npy"),
        &[windows.len(), 80, 3000],
        &windows.concat(),
    )
    .expect("write");
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
        let mel = model.batch(&windows);
        let encoded = model.model.encoder.forward(&mel);
        let mut cache = model.model.decoder.new_cache(&encoded);
        let logits = model
            .model
            .decoder
            .forward(&batch.decoder_input_ids, &mut cache);
        label_loss(&logits, &batch.labels).double_value(&[])
    });
    let theirs = hf["loss"].as_f64().expect("loss");
    println!("labels and decoder inputs identical to HF's on {} rows; loss ours {loss:.6}, HF {theirs:.6}", texts.len());
    assert!((loss - theirs).abs() <= 1e-4, "loss {loss} vs HF {theirs}");
}
