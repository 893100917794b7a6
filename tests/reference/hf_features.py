"""Reference log-mel features from HF transformers' WhisperFeatureExtractor.

Reads a JSON list of jobs on stdin and writes one float32 .npy per job:
  {"audio": "clip.wav",            # any file soundfile reads; downmixed to mono
   "n_mels": 80,                    # 80 or 128
   "mode": "default" | "prefix",    # default: fe(audio) as users call it (pad/truncate to 30 s)
                                    # prefix: the first 30 s window as openai-whisper slices a
                                    #   longer clip: fe(audio[:480159], truncation=False,
                                    #   padding="longest"), 3000 frames of real audio
   "resample": "soxr_vhq" | null,   # resample non-16 kHz audio with python-soxr first
   "path": "numpy" | "torch" | null,# force HF's numpy or torch extraction path
   "out": "ref.npy"}                # written with shape [n_mels, 3000]
Also `--mel-filters N OUT` dumps the extractor's mel filter bank ([201, N], float64).
"""
import json
import sys

import numpy as np
import soundfile as sf
from transformers import WhisperFeatureExtractor

SAMPLE_RATE = 16000
WINDOW = 480000
# Frames 0..2999 of a long clip need samples up to 160 * 2999 + 199 = 480039; a prefix of
# 480159 samples gives exactly 3000 frames with HF's "drop the last frame" rule.
PREFIX = 480159


def load_mono(path, resample):
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1, dtype=np.float64).astype(np.float32) if audio.shape[1] > 1 else audio[:, 0]
    if rate != SAMPLE_RATE:
        if resample != "soxr_vhq":
            raise SystemExit(f"{path}: {rate} Hz needs a resampler")
        import soxr

        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="VHQ").astype(np.float32)
    return audio


def extract(job, extractors):
    n_mels = job.get("n_mels", 80)
    fe = extractors.setdefault(n_mels, WhisperFeatureExtractor(feature_size=n_mels))
    audio = load_mono(job["audio"], job.get("resample"))
    mode = job.get("mode", "default")
    if mode == "prefix":
        kwargs = dict(truncation=False, padding="longest")
        audio = audio[:PREFIX]
    else:
        kwargs = {}
    path = job.get("path")
    if path == "numpy":
        padded = audio if mode == "prefix" else np.pad(audio[:WINDOW], (0, max(0, WINDOW - len(audio))))
        feats = fe._np_extract_fbank_features(padded[None, :], "cpu")[0]
    else:
        feats = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", **kwargs).input_features[0]
    feats = np.ascontiguousarray(feats[:, :3000], dtype=np.float32)
    assert feats.shape == (n_mels, 3000), feats.shape
    return feats


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--mel-filters":
        fe = WhisperFeatureExtractor(feature_size=int(sys.argv[2]))
        np.save(sys.argv[3], np.asarray(fe.mel_filters, dtype=np.float64))
        return
    jobs = json.load(sys.stdin)
    extractors = {}
    for job in jobs:
        np.save(job["out"], extract(job, extractors))
    print(f"wrote {len(jobs)} reference feature windows", file=sys.stderr)


if __name__ == "__main__":
    main()
