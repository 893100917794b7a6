"""Times HF WhisperFeatureExtractor on the clips `asr bench features` times ours on.

Usage: bench_hf_features.py CLIPS.json N_MELS REPEATS
CLIPS.json: {"clips": [wav paths], "windows": [wav paths of exactly 30 s]}.
Prints one JSON object: seconds spent per path and set, after one warm-up pass. Runs on one
thread (torch.set_num_threads(1)); pin the process to a core with taskset for one core.
"""
import json
import sys
import time

import numpy as np
import soundfile as sf
import torch
import transformers.models.whisper.feature_extraction_whisper as fe_module
from transformers import WhisperFeatureExtractor


def load(paths):
    return [sf.read(p, dtype="float32")[0] for p in paths]


def timed(fe, clips, repeats):
    for clip in clips[:3]:  # warm-up
        fe(clip, sampling_rate=16000, return_tensors="np")
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for clip in clips:
            fe(clip, sampling_rate=16000, return_tensors="np")
        best = min(best, time.perf_counter() - start)
    return best


def main():
    spec = json.load(open(sys.argv[1]))
    n_mels, repeats = int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    clips, windows = load(spec["clips"]), load(spec["windows"])
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    result = {
        "torch_clips_s": timed(fe, clips, repeats),
        "torch_windows_s": timed(fe, windows, repeats),
    }
    # HF's numpy path: what __call__ runs when torch is not importable.
    fe_module.is_torch_available = lambda: False
    result["numpy_clips_s"] = timed(fe, clips, repeats)
    result["numpy_windows_s"] = timed(fe, windows, repeats)
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
