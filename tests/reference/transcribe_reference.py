"""Reference transcriptions with HF transformers or faster-whisper, for parity tests and benchmarks.

Reads one JSON job on stdin:
  {"engine": "hf" | "faster-whisper",
   "model": "assets/whisper-base" (HF dir) or "assets/whisper-base-ct2" (CTranslate2 dir),
   "audio": [16 kHz wav paths], "language": "zh", "beam_size": 1, "batch_size": 8,
   "compute_type": "float32" | "int8" (faster-whisper), "threads": 2}
Prints JSON: {"texts": [...], "seconds": wall time of the transcription loop,
              "peak_rss_bytes": ru_maxrss after the run}.
"""
import json
import resource
import sys
import time

import numpy as np
import soundfile as sf


def load(path):
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 16000 and audio.ndim == 1, (path, rate, audio.shape)
    return audio


def hf(job, clips):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.set_num_threads(job.get("threads", 2))
    processor = WhisperProcessor.from_pretrained(job["model"])
    model = WhisperForConditionalGeneration.from_pretrained(job["model"], torch_dtype=torch.float32).eval()
    texts, batch = [], job.get("batch_size", 8)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(clips), batch):
            features = processor.feature_extractor(clips[i:i + batch], sampling_rate=16000, return_tensors="pt").input_features
            out = model.generate(features, language=job.get("language"), task="transcribe",
                                 num_beams=job.get("beam_size", 1), do_sample=False, max_new_tokens=224)
            texts += processor.batch_decode(out, skip_special_tokens=True)
    return texts, time.perf_counter() - start


def faster(job, clips):
    from faster_whisper import WhisperModel

    model = WhisperModel(job["model"], device="cpu", compute_type=job.get("compute_type", "float32"),
                         cpu_threads=job.get("threads", 2))
    texts = []
    start = time.perf_counter()
    for clip in clips:
        segments, _ = model.transcribe(clip, language=job.get("language"), beam_size=job.get("beam_size", 1),
                                       without_timestamps=True, condition_on_previous_text=False,
                                       temperature=0.0, vad_filter=False)
        texts.append("".join(s.text for s in segments))
    return texts, time.perf_counter() - start


def main():
    job = json.load(sys.stdin)
    clips = [load(p) for p in job["audio"]]
    texts, seconds = (hf if job["engine"] == "hf" else faster)(job, clips)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"texts": [t.strip() for t in texts], "seconds": seconds, "peak_rss_bytes": peak}, ensure_ascii=False))


if __name__ == "__main__":
    main()
