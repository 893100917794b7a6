"""CTranslate2 (faster-whisper's engine) decoding of given log-mel windows, so decoders can be
compared on identical features.

usage: ct2_generate.py CT2_DIR FEATURES.npy BEAM_SIZE < prompt.json > tokens.json
FEATURES.npy: [N, n_mels, 3000] float32 normalised windows; prompt.json: [token ids].
Decodes as faster-whisper's transcribe does (suppress_blank, the model's suppress tokens,
patience 1, length_penalty 1) and prints the generated token ids of each window.
"""
import json
import sys

import ctranslate2
import numpy as np


def main():
    model_dir, features_path, beam = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompt = json.load(sys.stdin)
    features = np.ascontiguousarray(np.load(features_path), dtype=np.float32)
    model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=2)
    out = []
    for i in range(0, len(features), 8):
        batch = features[i:i + 8]
        results = model.generate(ctranslate2.StorageView.from_array(batch), [prompt] * len(batch),
                                 beam_size=beam, patience=1.0, length_penalty=1.0, max_length=448,
                                 suppress_blank=True, suppress_tokens=[-1], return_scores=True)
        out += [r.sequences_ids[0] for r in results]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
