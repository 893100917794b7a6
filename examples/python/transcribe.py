#!/usr/bin/env python3
"""Streams an audio file to FeatureService.Transcribe and prints the results.

    python transcribe.py clip.wav --server 127.0.0.1:50051 --language zh
    python transcribe.py clip.wav --realtime            # paced like a live source, partials shown
    python transcribe.py - --raw s16le --sample-rate 16000 < pcm.raw
    python transcribe.py clip.wav --no-fallback --json  # one JSON line (what the tests compare)

The stream is the one proto/asr/v1/feature_service.proto documents: one `config` message
(TranscribeAudioConfig: the audio format and the TranscriptionOptions), then the file's bytes
as `audio` chunks of any size; half-closing the request stream ends the audio. The server
answers with `partial` events (only when asked), `segment` events, then one `summary`.

Partial results go to stderr as they come; segments go to stdout as they come (with --json
stdout holds only the final JSON line).
"""

import argparse
import json
import sys
import time
import wave

from asr_client import channel, load_stubs, report_error

load_stubs()

import grpc  # noqa: E402
from asr.v1 import audio_pb2, common_pb2, feature_service_pb2, transcription_pb2  # noqa: E402
from asr.v1 import feature_service_pb2_grpc  # noqa: E402

# Bytes per audio message when the file is sent as fast as it is read.
CHUNK_BYTES = 64 * 1024
# With --realtime: audio per message, and the pause between messages (seconds).
REALTIME_STEP = 0.1
BYTES_PER_SAMPLE = {"s16le": 2, "f32le": 4}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="audio file (wav, flac, mp3, ogg, mp4/aac, ...) or - for stdin")
    p.add_argument("--server", default="127.0.0.1:50051",
                   help="feature service: host:port or http://host:port (default %(default)s)")
    p.add_argument("--language", default="",
                   help="Whisper language code, e.g. zh; empty: detected from the first 30 s")
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    p.add_argument("--beam", type=int, default=1, help="beam width; 1 = greedy")
    p.add_argument("--timestamps", action="store_true",
                   help="timestamped segments (long-form decoding at the end of the stream)")
    p.add_argument("--no-fallback", action="store_true",
                   help="decode each window once at temperature 0 and keep it: no temperature "
                        "fallback and no compression / log-prob / no-speech tests "
                        "(deterministic; the fallback samples)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fallback's sampling (with each window's audio; default 0)")
    p.add_argument("--adapter", default="", help="LoRA adapter of the model service's registry")
    p.add_argument("--adapter-scale", type=float, help="0.0..1.0 (default 1.0)")
    p.add_argument("--partial", action="store_true",
                   help="ask for partial results while the audio arrives (shown on stderr)")
    p.add_argument("--partial-interval", type=float,
                   help="audio seconds between partial re-decodes (server default 1.0)")
    p.add_argument("--realtime", action="store_true",
                   help="send the audio at its real-time rate, as a live source (implies --partial)")
    p.add_argument("--raw", choices=sorted(BYTES_PER_SAMPLE),
                   help="the input is headerless PCM in this sample format")
    p.add_argument("--sample-rate", type=int, default=16000, help="with --raw: Hz")
    p.add_argument("--channels", type=int, default=1, help="with --raw: interleaved channels")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line at the end: text, language, segments, summary")
    return p.parse_args()


def options(args):
    decoding = transcription_pb2.DecodingOptions(beam_size=args.beam, seed=args.seed)
    if args.no_fallback:
        # `optional` fields: set to the value that turns each behaviour off (see the comments
        # in transcription.proto); unset would mean the openai-whisper defaults.
        decoding.temperature = 0.0
        decoding.temperature_increment = 0.0
        decoding.compression_ratio_threshold = 0.0
        decoding.log_prob_threshold = float("-inf")
        decoding.no_speech_threshold = 1.0
    opts = transcription_pb2.TranscriptionOptions(
        language=args.language,
        task=common_pb2.TASK_TRANSLATE if args.task == "translate" else common_pb2.TASK_TRANSCRIBE,
        decoding=decoding,
        timestamps=args.timestamps,
        adapter=args.adapter,
        partial_results=args.partial or args.realtime,
    )
    if args.adapter_scale is not None:
        opts.adapter_scale = args.adapter_scale
    if args.partial_interval is not None:
        opts.partial_interval_seconds = args.partial_interval
    return opts


def audio_format(args):
    if not args.raw:
        # Unset AudioFormat = encoded, container detected from the bytes.
        return None
    sample_format = {"s16le": audio_pb2.SAMPLE_FORMAT_S16LE, "f32le": audio_pb2.SAMPLE_FORMAT_F32LE}
    return audio_pb2.AudioFormat(raw_pcm=audio_pb2.RawPcmFormat(
        sample_format=sample_format[args.raw],
        sample_rate_hz=args.sample_rate,
        channels=args.channels,
    ))


def read_input(path):
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def byte_rate(args, data):
    """Bytes per second of audio, to pace --realtime; None when unknown here."""
    if args.raw:
        return args.sample_rate * args.channels * BYTES_PER_SAMPLE[args.raw]
    import io
    try:
        with wave.open(io.BytesIO(data)) as w:
            seconds = w.getnframes() / w.getframerate()
    except (wave.Error, EOFError, ZeroDivisionError):
        try:
            import soundfile  # present in this repo's venv; optional elsewhere

            seconds = soundfile.info(io.BytesIO(data)).duration
        except Exception:  # noqa: BLE001 - any failure means "unknown"
            return None
    return len(data) / seconds if seconds > 0 else None


def requests(args, data):
    config = feature_service_pb2.TranscribeAudioConfig(options=options(args))
    fmt = audio_format(args)
    if fmt is not None:
        config.format.CopyFrom(fmt)
    yield feature_service_pb2.TranscribeAudioRequest(config=config)
    if args.realtime:
        rate = byte_rate(args, data)
        if rate is None:
            print("warning: cannot tell the audio's duration here; sending it unpaced",
                  file=sys.stderr)
            step, pause = len(data) or 1, 0.0
        else:
            step, pause = max(1, int(rate * REALTIME_STEP + 0.999)), REALTIME_STEP
        next_at = time.monotonic()
        for start in range(0, len(data), step):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += pause
            yield feature_service_pb2.TranscribeAudioRequest(audio=data[start:start + step])
    else:
        for start in range(0, len(data), CHUNK_BYTES):
            yield feature_service_pb2.TranscribeAudioRequest(audio=data[start:start + CHUNK_BYTES])


class LiveLine:
    """Partial results on stderr: rewritten in place on a terminal, one line each otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.shown = False

    def partial(self, p):
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{p.audio_seconds:6.1f}s  {p.stable_text}\x1b[2m{p.unstable_text}\x1b[0m")
            self.shown = True
        else:
            sys.stderr.write(f"partial {p.audio_seconds:.2f}s: {p.stable_text}|{p.unstable_text}\n")
        sys.stderr.flush()

    def clear(self):
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def main():
    args = parse_args()
    data = read_input(args.file)
    stub = feature_service_pb2_grpc.FeatureServiceStub(channel(args.server))
    live = LiveLine()
    segments, partials, summary = [], [], None
    try:
        for response in stub.Transcribe(requests(args, data)):
            event = response.WhichOneof("event")
            if event == "partial":
                partials.append(response.partial)
                if args.partial or args.realtime:
                    live.partial(response.partial)
            elif event == "segment":
                s = response.segment
                segments.append(s)
                if not args.json:
                    live.clear()
                    print(f"[{s.start_seconds:7.2f} -> {s.end_seconds:7.2f}] {s.text.strip()}",
                          flush=True)
            elif event == "summary":
                summary = response.summary
    except grpc.RpcError as error:
        live.clear()
        details = report_error(error, f"transcribing {args.file}")
        if args.json:
            print(json.dumps({"error": details}, ensure_ascii=False))
        return 1
    live.clear()
    if summary is None:
        print("error: the stream ended without a summary", file=sys.stderr)
        return 1
    # The whole text: the segments' texts joined by a space.
    text = " ".join(s.text for s in segments)
    # The language used (given or detected); each segment carries it too.
    language = summary.language or (segments[0].language if segments else "")
    if args.json:
        print(json.dumps({
            "text": text,
            "language": language,
            "language_probability": summary.language_probability
            if summary.HasField("language_probability") else None,
            "segments": [{
                "id": s.id, "start": s.start_seconds, "end": s.end_seconds, "text": s.text,
                "avg_logprob": s.avg_logprob, "no_speech_prob": s.no_speech_prob,
                "temperature": s.temperature, "window_index": s.window_index,
            } for s in segments],
            "partial_count": len(partials),
            "last_stable_text": partials[-1].stable_text if partials else "",
            "audio_seconds": summary.audio_seconds,
            "processing_seconds": summary.processing_seconds,
            "model_name": summary.model_name,
            "precision": common_pb2.Precision.Name(summary.precision),
            "window_count": summary.window_count,
        }, ensure_ascii=False))
    else:
        print(f"{summary.audio_seconds:.2f} s of audio in {summary.processing_seconds:.2f} s "
              f"(RTF {summary.real_time_factor:.3f}), language {language}, "
              f"{summary.model_name} {common_pb2.Precision.Name(summary.precision)}, "
              f"{summary.window_count} window(s), {len(partials)} partial result(s)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
