#!/usr/bin/env python3
"""Writes the audio seeds of the fuzz targets (scripts/fuzz.sh runs it with the venv).

    fuzz_seeds.py OUT_DIR CLIP.wav [CLIP.wav ...] [--small]

For each clip: the clip re-encoded as wav (s16, f32, stereo 44.1 kHz), rf64, aiff, flac,
ogg/vorbis and mp3, each also cut at several lengths (truncated files are what clients send
by mistake), written to OUT_DIR/audio_container/. The other targets get the same audio in
the byte layout their first bytes choose (see shared/fuzz-targets/src). `--small` keeps 0.05 s
of each clip and no cuts: the committed seeds in fuzz/seeds/.
"""
import hashlib
import io
import struct
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

# (name, soundfile format, subtype, rate, channels)
ENCODINGS = [
    ("s16.wav", "WAV", "PCM_16", 16000, 1),
    ("f32.wav", "WAV", "FLOAT", 16000, 1),
    ("stereo44k.wav", "WAV", "PCM_16", 44100, 2),
    ("u8.wav", "WAV", "PCM_U8", 8000, 1),
    ("rf64.wav", "RF64", "PCM_24", 22050, 1),
    ("aiff", "AIFF", "PCM_16", 16000, 1),
    ("flac", "FLAC", "PCM_16", 16000, 1),
    ("stereo48k.flac", "FLAC", "PCM_24", 48000, 2),
    ("ogg", "OGG", "VORBIS", 16000, 1),
    ("mp3", "MP3", "MPEG_LAYER_III", 16000, 1),
    ("stereo44k.mp3", "MP3", "MPEG_LAYER_III", 44100, 2),
]
CUTS = [4, 12, 44, 100, 1000, 4096]


def resample(samples, rate):
    """Linear interpolation is enough for seeds: they only need to be valid audio."""
    n = int(len(samples) * rate / 16000)
    return np.interp(np.arange(n) * 16000 / rate, np.arange(len(samples)), samples)


def encode(samples, fmt, subtype, rate, channels):
    data = resample(samples, rate).astype(np.float32)
    if channels == 2:
        data = np.stack([data, data[::-1]], axis=1)
    out = io.BytesIO()
    sf.write(out, data, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def put(out, target, name, data):
    folder = out / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def main():
    args = [a for a in sys.argv[1:] if a != "--small"]
    small = "--small" in sys.argv
    out, clips = Path(args[0]), [Path(p) for p in args[1:]]
    for clip in clips:
        samples, rate = sf.read(clip, dtype="float32", always_2d=True)
        samples = samples.mean(axis=1)
        if rate != 16000:
            samples = resample(samples, 16000 * 16000 / rate)  # back to 16 kHz
        if small:
            samples = samples[:800]
        tag = hashlib.sha1(clip.name.encode()).hexdigest()[:8]
        for name, fmt, subtype, enc_rate, channels in ENCODINGS:
            data = encode(samples, fmt, subtype, enc_rate, channels)
            pieces = [("", data)] + ([] if small else [(f".cut{n}", data[:n]) for n in CUTS + [len(data) // 2]])
            for suffix, piece in pieces:
                put(out, "audio_container", f"{tag}.{name}{suffix}", piece)
                # audio_pipeline: first byte < 128 = detected container, 0 = 80 mels.
                put(out, "audio_pipeline", f"{tag}.{name}{suffix}", b"\x00" + piece)
        s16 = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
        f32 = samples.astype("<f4").tobytes()
        # audio_pipeline raw PCM: 0x80 = s16, 80 mels; rate index 1 = 16 kHz; 1 channel.
        put(out, "audio_pipeline", f"{tag}.raw-s16", bytes([0x80, 1, 1]) + s16)
        # 0x83 = f32, 128 mels; rate index 3 = 44.1 kHz (the audio is read as 44.1k); 2 ch.
        put(out, "audio_pipeline", f"{tag}.raw-f32", bytes([0x83, 3, 2]) + f32)
        # audio_pcm: format bit, rate index (6 = 16 kHz), channel index (1 = mono),
        # chunk cycle (count byte, then one size byte each).
        put(out, "audio_pcm", f"{tag}.s16", bytes([0, 6, 1, 1, 7]) + s16)
        put(out, "audio_pcm", f"{tag}.f32-stereo", bytes([1, 9, 2, 2, 2, 3]) + f32)
        # audio_resample: rate index (9 = 44.1 kHz, 4 = 8 kHz), chunk cycle, f32 samples.
        put(out, "audio_resample", f"{tag}.44k", bytes([9, 0, 255]) + f32)
        put(out, "audio_resample", f"{tag}.8k", bytes([4, 1, 2, 5]) + f32)
        # audio_mel: n_mels bit (0 = 80, 1 = 128), chunk cycle, f32 samples.
        put(out, "audio_mel", f"{tag}.80", bytes([0, 0, 6]) + f32)
        put(out, "audio_mel", f"{tag}.128", bytes([1, 1, 1, 255]) + f32)


if __name__ == "__main__":
    main()
