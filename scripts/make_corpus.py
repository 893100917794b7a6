#!/usr/bin/env python3
"""Build a small synthetic Mandarin speech corpus with espeak-ng + sox.

Sentences: the `chinese` field of every record in hsk_sentences_audio's sentences.json
(or one sentence per line of a .txt file). Kept: 5..30 CJK ideographs (U+4E00-U+9FFF,
U+3400-U+4DBF) and no Latin letters (ASCII or fullwidth). Deduplicated, sorted by the hex
sha1 of the UTF-8 bytes; the first 600 are `train`, the next 100 `dev`, the next 150 `test`.

Each sentence is spoken with `espeak-ng -v cmn-latn-pinyin` (plain `-v cmn` on Debian 12
reads the pinyin of each character as English letters/numbers) and converted to 16 kHz mono
16-bit PCM wav with sox. sox runs with -D (no dither): its default dither draws from a
time-seeded RNG, which would make every run produce different files.

Output layout (under --out):
    <split>/<first 16 hex of sha1>.wav
    <split>.jsonl   {"audio": "<split>/<name>.wav", "text": ..., "duration_s": 1.234}

Standard library only, so it also runs outside the project venv:
    python scripts/make_corpus.py --sentences sentences.json --out assets/corpus/espeak
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from multiprocessing import Pool

VOICE = "cmn-latn-pinyin"
RATE = 16000
SPLITS = (("train", 600), ("dev", 100), ("test", 150))
MIN_CHARS, MAX_CHARS = 5, 30

CJK = re.compile("[\u4e00-\u9fff\u3400-\u4dbf]")
LATIN = re.compile("[A-Za-z\uff21-\uff3a\uff41-\uff5a]")


def sha1_hex(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8")).hexdigest()


def n_cjk(s: str) -> int:
    return len(CJK.findall(s))


def load_sentences(path: str) -> list[str]:
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        return [r["chinese"] for r in records]
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def select(sentences: list[str]) -> list[str]:
    kept = {s for s in sentences if MIN_CHARS <= n_cjk(s) <= MAX_CHARS and not LATIN.search(s)}
    return sorted(kept, key=sha1_hex)


def synth(job: tuple[str, str, str]) -> tuple[str, int]:
    """Speak `text` into `out_path` (16 kHz mono s16). Returns (out_path, n_frames)."""
    text, out_path, tmp_dir = job
    raw = os.path.join(tmp_dir, os.path.basename(out_path) + ".raw.wav")
    part = out_path + ".part"
    try:
        subprocess.run(["espeak-ng", "-v", VOICE, "-w", raw, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        subprocess.run(["sox", "-D", raw, "-r", str(RATE), "-c", "1", "-b", "16", "-t", "wav", part],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with wave.open(part, "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), out_path
            frames = w.getnframes()
        os.replace(part, out_path)
    finally:
        for p in (raw, part):
            if os.path.exists(p):
                os.remove(p)
    return out_path, frames


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", required=True, help="sentences.json (records with `chinese`) or .txt")
    ap.add_argument("--out", required=True, help="output directory (e.g. assets/corpus/espeak)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    args = ap.parse_args()

    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            print(f"make_corpus: {tool} not found (apt-get install espeak-ng sox)", file=sys.stderr)
            return 1

    t0 = time.time()
    sentences = select(load_sentences(args.sentences))
    need = sum(n for _, n in SPLITS)
    if len(sentences) < need:
        print(f"make_corpus: only {len(sentences)} usable sentences, need {need}", file=sys.stderr)
        return 1

    splits, start = [], 0
    for name, n in SPLITS:
        splits.append((name, sentences[start:start + n]))
        start += n

    os.makedirs(args.out, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix="make_corpus.", dir=args.out)
    jobs, meta = [], []
    for name, sents in splits:
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        for s in sents:
            rel = f"{name}/{sha1_hex(s)[:16]}.wav"
            jobs.append((s, os.path.join(args.out, rel), tmp_dir))
            meta.append((name, rel, s))

    frames: dict[str, int] = {}
    try:
        with Pool(max(1, args.jobs)) as pool:
            for i, (path, n) in enumerate(pool.imap(synth, jobs, chunksize=4), 1):
                frames[path] = n
                if i % 100 == 0 or i == len(jobs):
                    print(f"  espeak corpus: {i}/{len(jobs)} clips ({time.time() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    # Plausibility check that the voice speaks Mandarin syllables (~0.2-0.4 s per character),
    # not letter names or digit names (which would take several times longer).
    per_char = []
    for (name, rel, s), (_, path, _) in zip(meta, jobs):
        per_char.append(frames[path] / RATE / n_cjk(s))
    per_char.sort()
    median = per_char[len(per_char) // 2]
    print(f"  seconds per character: min {per_char[0]:.3f} median {median:.3f} max {per_char[-1]:.3f}")
    if not 0.15 <= median <= 0.5:
        print(f"make_corpus: implausible speech rate {median:.3f} s/char; is voice {VOICE} speaking Mandarin?",
              file=sys.stderr)
        return 1

    for name, sents in splits:
        total = 0.0
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for split, rel, s in meta:
                if split != name:
                    continue
                d = frames[os.path.join(args.out, rel)] / RATE
                total += d
                f.write(json.dumps({"audio": rel, "text": s, "duration_s": round(d, 3)}, ensure_ascii=False) + "\n")
        print(f"  {name:5s}: {len(sents):4d} clips, {total / 3600:.3f} h, mean {total / len(sents):.2f} s")
    print(f"  espeak corpus done in {time.time() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
