"""CTranslate2 (faster-whisper's engine) decoding of given log-mel windows, so decoders can be
compared on identical features.

usage: ct2_generate.py CT2_DIR FEATURES.npy < jobs.json > tokens.json
FEATURES.npy: [N, n_mels, 3000] float32 normalised windows; jobs.json: a list of
{"beam": B, "prompt": [token ids], "count": C}, each decoding the first C windows.
The windows are encoded once (the encoder is most of the cost) and each job decodes them as
faster-whisper's transcribe does (suppress_blank, the model's suppress tokens, patience 1,
length_penalty 1). Prints, per job, the generated token ids of each window.
"""
import json
import sys

import ctranslate2
import numpy as np

BATCH = 8


def main():
    model_dir, features_path = sys.argv[1], sys.argv[2]
    jobs = json.load(sys.stdin)
    features = np.ascontiguousarray(np.load(features_path), dtype=np.float32)
    count = max((job["count"] for job in jobs), default=0)
    model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=2)
    # generate() takes the encoder's output in place of the features.
    encoded = [np.array(model.encode(ctranslate2.StorageView.from_array(features[i:i + BATCH])))
               for i in range(0, count, BATCH)]
    encoded = np.concatenate(encoded) if encoded else np.zeros((0,), dtype=np.float32)
    out = []
    for job in jobs:
        tokens = []
        for i in range(0, job["count"], BATCH):
            batch = np.ascontiguousarray(encoded[i:min(i + BATCH, job["count"])])
            results = model.generate(ctranslate2.StorageView.from_array(batch),
                                     [job["prompt"]] * len(batch), beam_size=job["beam"],
                                     patience=1.0, length_penalty=1.0, max_length=448,
                                     suppress_blank=True, suppress_tokens=[-1])
            tokens += [r.sequences_ids[0] for r in results]
        out.append(tokens)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
