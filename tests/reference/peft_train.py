"""The recipe with HF PEFT and Seq2SeqTrainer, the reference of `asr bench train`.

Reads one JSON job on stdin:
  {"model": HF dir, "train": JSONL manifest, "test": JSONL manifest, "extra": [wav paths],
   "max_train": int|null, "max_test": int|null, "r": 4, "alpha": 64, "dropout": 0.05,
   "lr": 1e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1, "seed": 42, "threads": 2,
   "generation_max_length": 96}
Trains a LoRA adapter on q_proj/v_proj of the fp32 model as the notebook does (get_peft_model,
Seq2SeqTrainer with the speech collator, remove_unused_columns=False, label_names=["labels"]),
on the CPU, with features computed before the clock starts. Greedy CER on the test manifest and
the transcripts of the extra clips come before and after training.
Prints JSON: {"train_seconds", "samples_per_second", "train_loss", "peak_rss_bytes",
              "cer_before", "cer_after", "extra_before": [...], "extra_after": [...]}.
"""
import json
import os
import resource
import sys
import tempfile
import time
import unicodedata

import soundfile as sf
import torch


def manifest(path, limit):
    base = os.path.dirname(path)
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    rows = rows[:limit] if limit else rows
    return [(os.path.join(base, r["audio"]), r["text"]) for r in rows]


def audio(path):
    samples, rate = sf.read(path, dtype="float32")
    assert rate == 16000 and samples.ndim == 1, (path, rate)
    return samples


def normalise(text):
    return [c.lower() for c in text if unicodedata.category(c)[0] in "LN"]


def edit_distance(a, b):
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a):
        current = [i + 1]
        for j, cb in enumerate(b):
            current.append(min(previous[j] + (ca != cb), previous[j + 1] + 1, current[j] + 1))
        previous = current
    return previous[-1]


def cer(hypotheses, references):
    edits = chars = 0
    for h, r in zip(hypotheses, references):
        r = normalise(r)
        edits += edit_distance(normalise(h), r)
        chars += len(r)
    return edits / max(chars, 1)


def main():
    job = json.load(sys.stdin)
    torch.set_num_threads(job.get("threads", 2))
    from peft import LoraConfig, get_peft_model
    from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments, WhisperForConditionalGeneration,
                              WhisperProcessor, set_seed)

    set_seed(job.get("seed", 42))
    processor = WhisperProcessor.from_pretrained(job["model"], language="chinese", task="transcribe")
    model = WhisperForConditionalGeneration.from_pretrained(job["model"], torch_dtype=torch.float32)
    model.config.forced_decoder_ids = None
    model.config.suppress_tokens = []
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer

    def features(paths):
        return [extractor(audio(p), sampling_rate=16000, return_tensors="pt").input_features[0] for p in paths]

    train = manifest(job["train"], job.get("max_train"))
    test = manifest(job["test"], job.get("max_test"))
    train_set = [{"input_features": f, "labels": tokenizer(t).input_ids}
                 for f, (_, t) in zip(features([p for p, _ in train]), train)]
    test_features = features([p for p, _ in test])
    extra_features = features(job.get("extra", []))
    max_new = job.get("generation_max_length", 96) - 4

    def transcribe(feature_list):
        model.eval()
        texts = []
        with torch.no_grad():
            for i in range(0, len(feature_list), 16):
                batch = torch.stack(feature_list[i:i + 16])
                out = model.generate(input_features=batch, language="zh", task="transcribe",
                                     do_sample=False, num_beams=1, max_new_tokens=max_new)
                texts += tokenizer.batch_decode(out, skip_special_tokens=True)
        return texts

    cer_before = cer(transcribe(test_features), [t for _, t in test])
    extra_before = transcribe(extra_features) if extra_features else []

    model = get_peft_model(model, LoraConfig(r=job.get("r", 4), lora_alpha=job.get("alpha", 64),
                                             target_modules=["q_proj", "v_proj"],
                                             lora_dropout=job.get("dropout", 0.05), bias="none"))
    model.print_trainable_parameters()

    def collate(rows):
        batch = {"input_features": torch.stack([r["input_features"] for r in rows])}
        labels = tokenizer.pad([{"input_ids": r["labels"]} for r in rows], return_tensors="pt")
        ids = labels["input_ids"].masked_fill(labels.attention_mask.ne(1), -100)
        if (ids[:, 0] == model.config.decoder_start_token_id).all().item():
            ids = ids[:, 1:]
        batch["labels"] = ids
        return batch

    with tempfile.TemporaryDirectory() as out:
        args = Seq2SeqTrainingArguments(
            output_dir=out, per_device_train_batch_size=job.get("batch_size", 4),
            gradient_accumulation_steps=job.get("grad_accum", 1), learning_rate=job.get("lr", 1e-3),
            num_train_epochs=job.get("epochs", 1), warmup_steps=0, max_grad_norm=1.0,
            use_cpu=True, fp16=False, save_strategy="no", eval_strategy="no", logging_steps=10,
            report_to=[], remove_unused_columns=False, label_names=["labels"],
            seed=job.get("seed", 42), dataloader_num_workers=0, disable_tqdm=True)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_set, data_collator=collate)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    cer_after = cer(transcribe(test_features), [t for _, t in test])
    extra_after = transcribe(extra_features) if extra_features else []
    print(json.dumps({
        "train_seconds": seconds,
        "samples_per_second": len(train_set) * job.get("epochs", 1) / seconds,
        "train_loss": result.training_loss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cer_before": cer_before, "cer_after": cer_after,
        "extra_before": extra_before, "extra_after": extra_after,
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
