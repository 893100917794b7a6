"""A tiny random Whisper built with transformers, and its outputs, for exact parity tests.

usage: tiny_whisper.py OUT_DIR N_MELS N_INPUTS MAX_NEW_TOKENS
Writes OUT_DIR/model/ (config.json, generation_config.json, model.safetensors) and:
  inputs.npy   [N, n_mels, 3000] random normalised-log-mel-like inputs (float32)
  encoder.npy  [3, 1500, d_model]  encoder outputs of the first 3 inputs
  tokens.json  the teacher-forced decoder tokens (prompt + 8 random text tokens)
  logits.npy   [3, T, vocab]      decoder logits for those tokens
  generated.json  greedy generate() output for every input (tokens after the prompt)
"""
import json
import os
import sys

import numpy as np
import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

SOT, ZH, TRANSCRIBE, TRANSLATE, NO_TIMESTAMPS = 50258, 50260, 50359, 50358, 50363
# whisper-base's generation_config suppress_tokens (non-speech symbols), as HF ships it.
SUPPRESS = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 359,
            503, 522, 542, 873, 893, 902, 918, 922, 931, 1350, 1853, 1982, 2460, 2627, 3246, 3253, 3268,
            3536, 3846, 3961, 4183, 4667, 6585, 6647, 7273, 9061, 9383, 10428, 10929, 11938, 12033,
            12331, 12562, 13793, 14157, 14635, 15265, 15618, 16553, 16604, 18362, 18956, 20075, 21675,
            22520, 26130, 26161, 26435, 28279, 29464, 31650, 32302, 32470, 36865, 42863, 47425, 49870,
            50254, 50258, 50358, 50359, 50360, 50361, 50362]


def main():
    out, n_mels, n_inputs, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(1234)
    config = WhisperConfig(
        vocab_size=51865, num_mel_bins=n_mels, d_model=64, encoder_layers=2, encoder_attention_heads=4,
        decoder_layers=2, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
        eos_token_id=50257, decoder_start_token_id=SOT, init_std=0.4,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=SOT, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257,
        no_timestamps_token_id=NO_TIMESTAMPS, is_multilingual=True, max_length=448,
        lang_to_id={"<|en|>": 50259, "<|zh|>": ZH}, task_to_id={"transcribe": TRANSCRIBE, "translate": TRANSLATE},
        suppress_tokens=SUPPRESS, begin_suppress_tokens=[220, 50257], max_initial_timestamp_index=50,
    )
    model_dir = os.path.join(out, "model")
    model.save_pretrained(model_dir, safe_serialization=True)

    inputs = torch.randn(n_inputs, n_mels, 3000, generator=torch.Generator().manual_seed(99))
    np.save(os.path.join(out, "inputs.npy"), inputs.numpy())
    prompt = [SOT, ZH, TRANSCRIBE, NO_TIMESTAMPS]
    text = torch.randint(300, 20000, (8,), generator=torch.Generator().manual_seed(7)).tolist()
    tokens = prompt + text
    with torch.no_grad():
        encoder = model.model.encoder(inputs[:3]).last_hidden_state
        logits = model(input_features=inputs[:3], decoder_input_ids=torch.tensor([tokens] * 3)).logits
        generated = model.generate(inputs, language="zh", task="transcribe", max_new_tokens=max_new,
                                   do_sample=False, num_beams=1)
        timestamped = model.generate(inputs, language="zh", task="transcribe", max_new_tokens=max_new,
                                     do_sample=False, num_beams=1, return_timestamps=True)
        if not torch.is_tensor(timestamped):
            timestamped = timestamped["sequences"]
    np.save(os.path.join(out, "encoder.npy"), encoder.numpy())
    np.save(os.path.join(out, "logits.npy"), logits.numpy())
    rows = generated.tolist()
    # Keep the generated part: drop the prompt if generate() returned it.
    rows = [row[len(prompt):] if row[:len(prompt)] == prompt else row for row in rows]
    # generate() pads finished rows; cut after the first end-of-text.
    rows = [row[: row.index(50257) + 1] if 50257 in row else row for row in rows]
    ts_prompt = [SOT, ZH, TRANSCRIBE]
    ts_rows = [row[len(ts_prompt):] if row[:len(ts_prompt)] == ts_prompt else row for row in timestamped.tolist()]
    ts_rows = [row[: row.index(50257) + 1] if 50257 in row else row for row in ts_rows]
    json.dump({"prompt": prompt, "tokens": tokens, "generated": rows,
               "timestamp_prompt": ts_prompt, "generated_timestamps": ts_rows}, open(os.path.join(out, "tokens.json"), "w"))
    print(f"tiny whisper ({n_mels} mels): generated lengths {[len(r) for r in rows]}", file=sys.stderr)


if __name__ == "__main__":
    main()
