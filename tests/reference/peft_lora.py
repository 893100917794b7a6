"""HF PEFT's LoRA on an HF Whisper, for adapter interoperability tests.

usage:
  peft_lora.py apply MODEL_DIR ADAPTER_DIR INPUTS.npy OUT_DIR < tokens.json
      loads ADAPTER_DIR (ours or PEFT's) onto the model with PeftModel.from_pretrained and
      writes OUT_DIR/logits.npy: decoder logits [3, T, vocab] for the first 3 inputs and the
      teacher-forced tokens, and prints PEFT's trainable-parameter line.
  peft_lora.py make MODEL_DIR ADAPTER_DIR < config.json
      makes a PEFT LoRA adapter (LoraConfig from the JSON: r, lora_alpha, target_modules,
      bias) with random non-zero A, B and biases (seed 5), prints PEFT's trainable-parameter
      line and saves it with save_pretrained. An optional "seed" (default 5) varies the values.
  peft_lora.py init MODEL_DIR ADAPTER_DIR < config.json
      torch.manual_seed(config "seed"), then the model and get_peft_model as the recipe does
      (LoraConfig from the JSON, lora_dropout included); saves the fresh adapter untouched.
  peft_lora.py order N SEED EPOCHS
      prints, as JSON, the order in which HF's Trainer (seed SEED, batch 4) visits N examples
      in each of EPOCHS epochs.
  peft_lora.py combine MODEL_DIR OUT_DIR TYPE DIR:WEIGHT...
      loads each adapter directory, combines them with add_weighted_adapter (combination_type
      TYPE: linear or cat) and saves the result with save_pretrained to OUT_DIR/merged.
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import WhisperForConditionalGeneration


def apply(model_dir, adapter_dir, inputs_path, out_dir):
    tokens = json.load(sys.stdin)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    model.print_trainable_parameters()
    inputs = torch.from_numpy(np.load(inputs_path))[:3]
    with torch.no_grad():
        logits = model(input_features=inputs, decoder_input_ids=torch.tensor([tokens] * len(inputs))).logits
    np.save(os.path.join(out_dir, "logits.npy"), logits.float().numpy())


def make(model_dir, adapter_dir):
    spec = json.load(sys.stdin)
    torch.manual_seed(spec.get("seed", 5))
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"],
                        lora_dropout=0.0, bias=spec.get("bias", "none"))
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or (param.requires_grad and name.endswith(".bias")):
                param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(adapter_dir)


def init(model_dir, adapter_dir):
    spec = json.load(sys.stdin)
    torch.manual_seed(spec["seed"])
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"],
                        lora_dropout=spec.get("lora_dropout", 0.05), bias="none")
    get_peft_model(model, config).save_pretrained(adapter_dir)


def order(n, seed, epochs):
    from transformers import Trainer, TrainingArguments

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(1, 1)

    examples = [{"index": torch.tensor([i])} for i in range(int(n))]
    orders = []
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, use_cpu=True,
                                 seed=int(seed), report_to=[], remove_unused_columns=False,
                                 dataloader_num_workers=0)
        loader = Trainer(model=Probe(), args=args, train_dataset=examples).get_train_dataloader()
        for epoch in range(int(epochs)):
            loader.set_epoch(epoch)  # as the Trainer's loop does at each epoch
            orders.append([int(i) for batch in loader for i in batch["index"].flatten()])
    print(json.dumps(orders))


def combine(model_dir, out_dir, combination, *inputs):
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
    names, weights = [], []
    for i, spec in enumerate(inputs):
        path, weight = spec.rsplit(":", 1)
        name = f"a{i}"
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
        names.append(name)
        weights.append(float(weight))
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination)
    model.save_pretrained(out_dir, selected_adapters=["merged"])


def main():
    if sys.argv[1] == "apply":
        apply(*sys.argv[2:6])
    elif sys.argv[1] == "make":
        make(*sys.argv[2:4])
    elif sys.argv[1] == "init":
        init(*sys.argv[2:4])
    elif sys.argv[1] == "order":
        order(*sys.argv[2:5])
    elif sys.argv[1] == "combine":
        combine(*sys.argv[2:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
