"""Audio fixtures and reference resampling for the differential tests.

  audio_tools.py upsample IN16K.wav RATE OUT.wav   # band-limited stereo copy at RATE (soxr VHQ):
                                                    # L = x, R = 0.5 x + 0.1 sin(2 pi 440 t)
  audio_tools.py tone RATE SECONDS OUT.wav          # 1 kHz sine at 0.5 FS, mono float32
  audio_tools.py soxr16k IN.wav OUT.npy             # downmix (mean) + soxr VHQ to 16 kHz, float32
  audio_tools.py encode IN.wav FORMAT OUT           # FORMAT: flac | ogg | mp3 (libsndfile)
"""
import sys

import numpy as np
import soundfile as sf
import soxr


def upsample(src, rate, out):
    x, sr = sf.read(src, dtype="float64")
    assert sr == 16000 and x.ndim == 1, (sr, x.shape)
    left = soxr.resample(x, sr, rate, quality="VHQ")
    t = np.arange(len(left)) / rate
    right = 0.5 * left + 0.1 * np.sin(2 * np.pi * 440.0 * t)
    sf.write(out, np.stack([left, right], axis=1).astype(np.float32), rate, subtype="FLOAT")


def tone(rate, seconds, out):
    t = np.arange(int(rate * seconds)) / rate
    sf.write(out, (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32), rate, subtype="FLOAT")


def soxr16k(src, out):
    x, sr = sf.read(src, dtype="float32", always_2d=True)
    mono = x.mean(axis=1, dtype=np.float64).astype(np.float32) if x.shape[1] > 1 else x[:, 0]
    y = mono if sr == 16000 else soxr.resample(mono, sr, 16000, quality="VHQ")
    np.save(out, np.ascontiguousarray(y, dtype=np.float32))


def encode(src, fmt, out):
    x, sr = sf.read(src, dtype="float32")
    if fmt == "flac":
        sf.write(out, x, sr, format="FLAC", subtype="PCM_16")
    elif fmt == "ogg":
        sf.write(out, x, sr, format="OGG", subtype="VORBIS")
    elif fmt == "mp3":
        sf.write(out, x, sr, format="MP3", subtype="MPEG_LAYER_III")
    else:
        raise SystemExit(f"unknown format {fmt}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "upsample":
        upsample(args[0], int(args[1]), args[2])
    elif cmd == "tone":
        tone(int(args[0]), float(args[1]), args[2])
    elif cmd == "soxr16k":
        soxr16k(args[0], args[1])
    elif cmd == "encode":
        encode(args[0], args[1], args[2])
    else:
        raise SystemExit(__doc__)
