"""The PEFT side of `asr bench train-speed`: training speed and peak memory of an architecture
from its HF config alone (random weights), LoRA on q_proj/v_proj, the same batch and label
length as ours, one optimiser step per batch as Seq2SeqTrainer does with fp16=True: autocast
to fp16, GradScaler, clip_grad_norm 1.0, AdamW on the adapter's parameters.

bitsandbytes (the notebook's int8 base) is not on the GPU machines here, so the base is float:
fp32 weights under fp16 autocast (what the Trainer does for a model that is not quantised),
or fp16 weights with --base fp16.

  python tests/reference/peft_train_speed.py --config CONFIG.json [--device cuda] [--steps 10]

Prints one human line per figure and a last line of JSON.
"""
import argparse
import json
import os
import subprocess
import threading
import time

import torch


def gpu_memory_poll(stop, peak):
    """Peak MiB of this process as nvidia-smi reports it (the same measure as ours)."""
    pid = str(os.getpid())
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
        except OSError:
            return
        for line in out.splitlines():
            fields = [f.strip() for f in line.split(",")]
            if fields[0] == pid and len(fields) > 1 and fields[1].isdigit():
                peak[0] = max(peak[0], int(fields[1]))
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--base", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--label-tokens", type=int, default=20)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--alpha", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = WhisperConfig.from_json_file(args.config)
    started = time.time()
    with device:
        model = WhisperForConditionalGeneration(config)
    if args.base == "fp16":
        model = model.half()
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=["q_proj", "v_proj"], bias="none")
    model = get_peft_model(model, lora)
    # LoRA weights train in fp32 whatever the base (as PEFT's autocast_adapter_dtype does).
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    build_seconds = time.time() - started

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    generator = torch.Generator().manual_seed(7)
    n_mels = config.num_mel_bins
    batch = args.batch_size
    features = (torch.rand(batch, n_mels, 3000, generator=generator) * 2 - 1).to(device)
    if args.base == "fp16":
        features = features.half()
    prompt = torch.tensor([50258, 50260, 50359, 50363])
    labels = torch.stack([
        torch.cat([prompt, torch.randint(0, 50000, (args.label_tokens,), generator=generator),
                   torch.tensor([50257])])
        for _ in range(batch)]).to(device)
    # The collator strips the leading start token; the model shifts labels right itself.
    labels = labels[:, 1:]

    stop, peak = threading.Event(), [0]
    poll = threading.Thread(target=gpu_memory_poll, args=(stop, peak), daemon=True)
    if cuda:
        poll.start()
    losses = []
    timed_from = None
    for step in range(args.warmup_steps + args.steps):
        if step == args.warmup_steps:
            if cuda:
                torch.cuda.synchronize()
            timed_from = time.time()
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = model(input_features=features, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.time() - timed_from
    stop.set()
    samples_per_second = args.steps * batch / seconds
    print(f"PEFT training speed: {args.config} ({n_mels} mels, {config.encoder_layers} + "
          f"{config.decoder_layers} layers, d_model {config.d_model}), random weights, {device}")
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    print(f"base {args.base}, fp16 autocast {cuda}, batch {batch}, {args.label_tokens + 5} label tokens, "
          f"{args.warmup_steps} warm-up + {args.steps} timed steps (model built in {build_seconds:.1f} s)")
    print(f"losses: first {losses[0]:.3f}, last {losses[-1]:.3f}")
    allocated = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0
    print(f"samples/s {samples_per_second:.3f}   s/step {seconds / args.steps:.3f}   peak GPU memory "
          f"{peak[0]} MiB (nvidia-smi), {allocated:.0f} MiB allocated by torch")
    print(json.dumps({"samples_per_second": samples_per_second, "peak_gpu_mib": peak[0],
                      "max_allocated_mib": allocated, "base": args.base}))


if __name__ == "__main__":
    main()
