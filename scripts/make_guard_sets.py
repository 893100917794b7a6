#!/usr/bin/env python3
"""Guard sets: speech the base model should keep reading after fine-tuning on the espeak corpus.

Sentences come from the same pool as make_corpus.py (selected, deduplicated, sorted by sha1),
after the 850 that the corpus uses, so no guard sentence is in train/dev/test. Sets written
under --out, each as <name>.jsonl ({"audio", "text", "duration_s"}) plus <name>/*.wav:

    espeak-f2      the corpus voice with espeak's +f2 variant (female), 50 sentences
    espeak-slow    the corpus voice at 120 words/min (espeak's default is 175), 50 sentences
    espeak-fast    the corpus voice at 260 words/min, 50 sentences
    espeak-noisy   the corpus voice with white noise at 10 dB SNR, 50 sentences
    aishell-noisy  the two AISHELL-1 recordings with white noise at 10 dB SNR, 3 draws each
    mix-espeak     150 more sentences in the three variant voices (50 each), every other
                   clip with noise at 10 dB SNR; never evaluated: labelled guard-domain data
                   for `asr train --mix`

Noise is seeded per clip (sha1 of its name), so every run writes the same files.
Standard library only (like make_corpus.py):
    python scripts/make_guard_sets.py --sentences sentences.json --aishell assets/aishell \\
        --out assets/guard
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import wave
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_corpus import RATE, SPLITS, VOICE, load_sentences, select, sha1_hex  # noqa: E402

SNR_DB = 10.0
PER_SET = 50
VARIANTS = {
    "f2": ["-v", VOICE + "+f2"],
    "slow": ["-v", VOICE, "-s", "120"],
    "fast": ["-v", VOICE, "-s", "260"],
    "plain": ["-v", VOICE],
}
# (set name, espeak variants (cycled), noise on every n-th clip (0: none), sentences)
SETS = (
    ("espeak-f2", ("f2",), 0, PER_SET),
    ("espeak-slow", ("slow",), 0, PER_SET),
    ("espeak-fast", ("fast",), 0, PER_SET),
    ("espeak-noisy", ("plain",), 1, PER_SET),
    ("mix-espeak", ("f2", "slow", "fast"), 2, 3 * PER_SET),
)


def read_wav(path: str) -> array.array:
    with wave.open(path, "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), path
        samples = array.array("h")
        samples.frombytes(w.readframes(w.getnframes()))
    return samples


def write_wav(path: str, samples: array.array) -> None:
    part = path + ".part"
    with wave.open(part, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.tobytes())
    os.replace(part, path)


def add_noise(samples: array.array, seed: str) -> array.array:
    """White Gaussian noise at SNR_DB below the clip's mean power, clipped to int16."""
    power = sum(s * s for s in samples) / max(1, len(samples))
    sigma = math.sqrt(power / (10 ** (SNR_DB / 10)))
    rng = random.Random(int(sha1_hex(seed)[:16], 16))
    return array.array("h", (max(-32768, min(32767, round(s + rng.gauss(0.0, sigma)))) for s in samples))


def synth(job: tuple[str, list[str], bool, str, str]) -> tuple[str, int]:
    text, voice_args, noisy, out_path, tmp_dir = job
    raw = os.path.join(tmp_dir, os.path.basename(out_path) + ".raw.wav")
    part = out_path + ".16k.wav"
    try:
        subprocess.run(["espeak-ng", *voice_args, "-w", raw, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # -G: guard against clipping when the variant voices are louder than 0 dBFS.
        subprocess.run(["sox", "-D", "-G", raw, "-r", str(RATE), "-c", "1", "-b", "16", "-t", "wav", part],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        samples = read_wav(part)
        if noisy:
            samples = add_noise(samples, os.path.basename(out_path))
        write_wav(out_path, samples)
    finally:
        for p in (raw, part):
            if os.path.exists(p):
                os.remove(p)
    return out_path, len(samples)


def write_manifest(out: str, name: str, rows: list[tuple[str, str, int]]) -> None:
    total = 0.0
    with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for rel, text, frames in rows:
            d = frames / RATE
            total += d
            f.write(json.dumps({"audio": rel, "text": text, "duration_s": round(d, 3)}, ensure_ascii=False) + "\n")
    print(f"  {name:13s}: {len(rows):4d} clips, {total / 60:.1f} min")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", required=True)
    ap.add_argument("--aishell", required=True, help="directory with manifest.jsonl and the AISHELL wavs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    pool = select(load_sentences(args.sentences))[sum(n for _, n in SPLITS):]
    need = sum(n for *_, n in SETS)
    if len(pool) < need:
        print(f"make_guard_sets: only {len(pool)} sentences outside the corpus, need {need}", file=sys.stderr)
        return 1

    os.makedirs(args.out, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix="make_guard.", dir=args.out)
    jobs, meta, start = [], [], 0
    for name, variants, noise_every, n in SETS:
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        for i, text in enumerate(pool[start:start + n]):
            variant = variants[i % len(variants)]
            noisy = noise_every > 0 and i % noise_every == 0
            rel = f"{name}/{sha1_hex(text)[:16]}.wav"
            jobs.append((text, VARIANTS[variant], noisy, os.path.join(args.out, rel), tmp_dir))
            meta.append((name, rel, text))
        start += n
    try:
        with Pool(max(1, args.jobs)) as workers:
            frames = dict(workers.imap(synth, jobs, chunksize=4))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    for name, *_ in SETS:
        write_manifest(args.out, name, [(rel, text, frames[os.path.join(args.out, rel)])
                                        for set_name, rel, text in meta if set_name == name])

    os.makedirs(os.path.join(args.out, "aishell-noisy"), exist_ok=True)
    rows = []
    with open(os.path.join(args.aishell, "manifest.jsonl"), encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            clean = read_wav(os.path.join(args.aishell, entry["audio"]))
            stem = os.path.splitext(os.path.basename(entry["audio"]))[0]
            for draw in range(3):
                rel = f"aishell-noisy/{stem}-{draw}.wav"
                write_wav(os.path.join(args.out, rel), add_noise(clean, rel))
                rows.append((rel, entry["text"], len(clean)))
    write_manifest(args.out, "aishell-noisy", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
