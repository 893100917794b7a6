"""The recipe's labels, collator and loss with HF transformers, for training parity tests.

Reads one JSON job on stdin: {"model": HF dir, "texts": [...], "features": path of a float32
.npy [N, n_mels, 3000]}. Builds labels as the notebook does (WhisperProcessor with language
Chinese and task transcribe; DataCollatorSpeechSeq2SeqWithPadding: pad with -100, strip the
leading start token when every row has it), the decoder inputs as the model makes them
(shift_tokens_right), and the fp32 loss of the model on them. Prints JSON
{"labels": [[...]], "decoder_input_ids": [[...]], "loss": float}.
"""
import json
import sys

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.modeling_whisper import shift_tokens_right


def main():
    job = json.load(sys.stdin)
    processor = WhisperProcessor.from_pretrained(job["model"], language="chinese", task="transcribe")
    model = WhisperForConditionalGeneration.from_pretrained(job["model"], torch_dtype=torch.float32).eval()
    label_features = [{"input_ids": processor.tokenizer(t).input_ids} for t in job["texts"]]
    batch = processor.tokenizer.pad(label_features, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch.attention_mask.ne(1), -100)
    start = model.config.decoder_start_token_id
    if (labels[:, 0] == start).all().cpu().item():
        labels = labels[:, 1:]
    decoder_input_ids = shift_tokens_right(labels, model.config.pad_token_id, start)
    features = torch.from_numpy(np.load(job["features"]))
    with torch.no_grad():
        loss = model(input_features=features, labels=labels).loss.item()
    print(json.dumps({"labels": labels.tolist(), "decoder_input_ids": decoder_input_ids.tolist(), "loss": loss}))


if __name__ == "__main__":
    main()
