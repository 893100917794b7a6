"""Checks an HF Whisper directory made by `asr convert --from ct2` against its source.

  check_converted.py DST [AUDIO.wav ...] [--ct2 assets/whisper-base-ct2]
                     [--manifest corpus/test.jsonl --limit 10] [--language zh]

1. Loading: WhisperForConditionalGeneration.from_pretrained(DST) with output_loading_info
   must report no missing, unexpected or mismatched keys and log no "newly initialized"
   weights; model.safetensors loaded with load_state_dict(strict=True) must give every
   parameter but the tied proj_out.weight, which must share the embeddings' storage;
   WhisperProcessor.from_pretrained(DST) must load offline.
2. Same input, both engines: the HF encoder and the CTranslate2 encoder (the source directory,
   float32) on the same HF log-mel features (max |difference|), and greedy token ids of
   CTranslate2's generate against HF's generate on those features.
3. End to end: HF (fp32, CPU, greedy, language forced, no timestamps) against faster-whisper
   on the source directory (beam_size 1, temperature 0, without_timestamps, float32), each
   with its own feature extraction. Texts side by side. The two front ends differ (HF pads the
   audio to 30 s before the log-mel and normalises over the window; faster-whisper normalises
   over the clip and pads the log-mel with zeros), which can change a greedy decode; so HF is
   also run on faster-whisper's own log-mel window, where it must give faster-whisper's tokens.
Exit status 1 if the same-features comparisons (2, and HF on faster-whisper's features) differ.
AUDIO: 16 kHz mono wav files. The manifest is JSON lines with "audio" (relative to the
manifest's folder) and "text" (printed as the reference).
"""
import argparse
import io
import json
import logging
import os
import sys

import numpy as np
import soundfile as sf
import torch


def load_audio(path):
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 16000 and audio.ndim == 1, (path, rate, audio.shape)
    return audio


def check_loading(dst):
    from safetensors.torch import load_file
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    hf_logging.get_logger().addHandler(handler)
    model, info = WhisperForConditionalGeneration.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    hf_logging.get_logger().removeHandler(handler)
    log = captured.getvalue()
    problems = {k: v for k, v in info.items() if v}
    print(f"from_pretrained loading info: {dict((k, len(v)) for k, v in info.items())}")
    assert not problems, f"loading problems: {problems}"
    assert "newly initialized" not in log and "not initialized" not in log, log
    if log.strip():
        print(f"transformers said while loading: {log.strip()}")

    state = load_file(os.path.join(dst, "model.safetensors"))
    expected = set(model.state_dict().keys())
    absent = expected - set(state)
    assert absent <= {"proj_out.weight"}, f"parameters absent from model.safetensors: {sorted(absent)}"
    assert set(state) <= expected, f"tensors HF does not know: {sorted(set(state) - expected)}"
    fresh = WhisperForConditionalGeneration(model.config)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert set(missing) <= {"proj_out.weight"} and not unexpected, (missing, unexpected)
    fresh.tie_weights()
    assert fresh.proj_out.weight.data_ptr() == fresh.model.decoder.embed_tokens.weight.data_ptr()
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model.safetensors: {len(state)} tensors, {sum(t.numel() for t in state.values())} values, "
          f"dtypes {sorted({str(t.dtype) for t in state.values()})}; HF model: {n_params} parameters, "
          f"all loaded (proj_out.weight tied to embed_tokens)")
    processor = WhisperProcessor.from_pretrained(dst)
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>"])
    print(f"WhisperProcessor: {type(tok).__name__}, prompt ids {ids}, timestamp_begin {tok.all_special_ids[-1] + 1}")
    model.eval()
    return model, processor


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dst")
    parser.add_argument("audio", nargs="*")
    parser.add_argument("--ct2", default="assets/whisper-base-ct2")
    parser.add_argument("--manifest")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--language", default="zh")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    clips = [(path, None) for path in args.audio]
    if args.manifest:
        root = os.path.dirname(args.manifest)
        with open(args.manifest, encoding="utf-8") as f:
            for line in list(f)[: args.limit]:
                entry = json.loads(line)
                clips.append((os.path.join(root, entry["audio"]), entry.get("text")))

    model, processor = check_loading(args.dst)
    if not clips:
        return 0

    import ctranslate2
    from faster_whisper import WhisperModel

    from faster_whisper.audio import pad_or_trim

    fw = WhisperModel(args.ct2, device="cpu", compute_type="float32", cpu_threads=args.threads)
    ct2 = fw.model
    tok = processor.tokenizer
    prompt = [tok.convert_tokens_to_ids(t) for t in
              ["<|startoftranscript|>", f"<|{args.language}|>", "<|transcribe|>", "<|notimestamps|>"]]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")

    same_text = same_tokens = same_fw = 0
    worst_encoder = encoder_scale = 0.0
    worst_mel = [0.0, 0.0]
    rows = []
    for path, reference in clips:
        audio = load_audio(path)
        features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ours_enc = model.model.encoder(features).last_hidden_state.numpy()
            generated = model.generate(features, language=args.language, task="transcribe",
                                       return_timestamps=False, num_beams=1, do_sample=False)
        hf_ids = [t for t in generated[0].tolist() if t not in prompt and t != eot]
        hf_text = tok.decode(hf_ids, skip_special_tokens=True).strip()

        storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy()))
        ct2_enc = np.array(ct2.encode(storage, to_cpu=True))
        worst_encoder = max(worst_encoder, float(np.abs(ct2_enc - ours_enc).max()))
        encoder_scale = max(encoder_scale, float(np.abs(ours_enc).max()))
        result = ct2.generate(storage, [prompt], beam_size=1, max_length=448, suppress_blank=True)[0]
        ct2_ids = [t for t in result.sequences_ids[0] if t != eot]
        same_tokens += ct2_ids == hf_ids

        segments, _ = fw.transcribe(audio, language=args.language, task="transcribe", beam_size=1,
                                    temperature=0.0, without_timestamps=True, vad_filter=False,
                                    condition_on_previous_text=False)
        segments = list(segments)
        fw_text = "".join(s.text for s in segments).strip()
        fw_ids = [t for s in segments for t in s.tokens if t < eot]
        same_text += fw_text == hf_text
        # HF on faster-whisper's window: the clip's log-mel (+160 samples), padded with zeros.
        fw_features = fw.feature_extractor(audio)
        window = torch.from_numpy(pad_or_trim(fw_features[:, : fw_features.shape[-1] - 1]))[None]
        with torch.no_grad():
            on_fw = model.generate(window.float(), language=args.language, task="transcribe",
                                   return_timestamps=False, num_beams=1, do_sample=False)
        on_fw_ids = [t for t in on_fw[0].tolist() if t not in prompt and t != eot]
        frames = len(audio) // 160
        mel_diff = (features[0] - window[0]).abs()
        worst_mel[0] = max(worst_mel[0], float(mel_diff[:, :frames].max()))
        worst_mel[1] = max(worst_mel[1], float(mel_diff[:, frames + 1 :].max()) if frames + 1 < 3000 else 0.0)
        same_fw += on_fw_ids == fw_ids
        rows.append((os.path.basename(path), reference, hf_text, fw_text, ct2_ids == hf_ids, on_fw_ids == fw_ids))

    print(f"\n{'clip':<26} {'same':<5} text")
    for name, reference, hf_text, fw_text, tokens_equal, fw_equal in rows:
        mark = "yes" if hf_text == fw_text else "NO"
        print(f"{name:<26} {mark:<5} HF:             {hf_text}")
        print(f"{'':<26} {'':<5} faster-whisper: {fw_text}")
        if reference is not None:
            print(f"{'':<26} {'':<5} reference:      {reference}")
        if not tokens_equal:
            print(f"{'':<26} {'':<5} (greedy token ids on HF's features differ)")
        if not fw_equal:
            print(f"{'':<26} {'':<5} (HF on faster-whisper's features differs from faster-whisper)")
    n = len(rows)
    print(f"\nencoder on the same features: max |HF - CTranslate2| = {worst_encoder:.3g} (max |HF| = {encoder_scale:.3g})")
    print(f"log-mel windows, HF vs faster-whisper front end: max |difference| {worst_mel[0]:.3g} over the clips' "
          f"frames, {worst_mel[1]:.3g} over the padding")
    print(f"greedy token ids on the same features, HF vs CTranslate2: {same_tokens}/{n} identical")
    print(f"greedy token ids on faster-whisper's features, HF vs faster-whisper: {same_fw}/{n} identical")
    print(f"texts end to end (own front ends), HF on DST vs faster-whisper on {args.ct2}: {same_text}/{n} identical")
    return 0 if same_tokens == n and same_fw == n else 1


if __name__ == "__main__":
    sys.exit(main())
