#!/usr/bin/env python3
"""Ingests a JSONL manifest through a feature service, starts a LoRA training job on the model
service and follows its progress events to the end.

    python train.py data/train.jsonl --dataset mine --output-adapter mine-lora \\
        --server 127.0.0.1:50051 --eval-manifest data/dev.jsonl --epochs 1

The manifest has one {"audio": PATH, "text": TRANSCRIPT} per line, PATH relative to the
manifest's folder (the format of `asr ingest` and `asr train --local`).

1. FeatureService.Ingest: one `config` (IngestAudioConfig: dataset, mode, split, language),
   then per example an `example` header (id, text) followed by its file as `audio` chunks.
   The feature service decodes each file and stores its log-mel frames in the model service's
   dataset store; the single response lists one IngestAck per example.
2. ModelService.StartTraining on the stored dataset (the model service's address is
   --model-service, or the one the feature service reports in GetInfo).
3. ModelService.WatchTraining: the job's events from index 0 until its final event.
"""

import argparse
import json
import sys
from pathlib import Path

from asr_client import channel, load_stubs, report_error

load_stubs()

import grpc  # noqa: E402
from asr.v1 import datasets_pb2, feature_service_pb2, feature_service_pb2_grpc  # noqa: E402
from asr.v1 import model_service_pb2_grpc, training_pb2  # noqa: E402

CHUNK_BYTES = 64 * 1024


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path, help="JSONL manifest of the training examples")
    p.add_argument("--server", default="127.0.0.1:50051",
                   help="feature service: host:port or http://host:port (default %(default)s)")
    p.add_argument("--model-service", default="",
                   help="model service address; empty: the one the feature service relays to")
    p.add_argument("--dataset", required=True, help="dataset name in the model service")
    p.add_argument("--split", default="train", help="split of the manifest's examples")
    p.add_argument("--eval-manifest", type=Path,
                   help="JSONL manifest of evaluation examples, stored as split --eval-split")
    p.add_argument("--eval-split", default="eval")
    p.add_argument("--language", default="zh", help="Whisper language code of the speech")
    p.add_argument("--max-examples", type=int, help="only the first N examples of each manifest")
    p.add_argument("--output-adapter", required=True, help="registry name of the trained adapter")
    # The job's settings; 0 / unset = the recipe's defaults (see training.proto).
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = 4)")
    p.add_argument("--lora-alpha", type=float, default=0.0, help="lora_alpha (0 = 64)")
    p.add_argument("--target-modules", default="", help="comma-separated, e.g. q_proj,v_proj")
    p.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0 = 1e-3)")
    p.add_argument("--epochs", type=float, default=0.0, help="epochs (0 = 3)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0 = epochs)")
    p.add_argument("--batch-size", type=int, default=0, help="examples per forward pass (0 = 4)")
    p.add_argument("--grad-accum", type=int, default=0, help="forward passes per step (0 = 4)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 50)")
    p.add_argument("--logging-steps", type=int, default=0, help="steps between step events (0 = 25)")
    p.add_argument("--seed", type=int, help="seed (default 42)")
    p.add_argument("--no-watch", action="store_true", help="start the job and return")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line at the end: ingestion counts, job id, final state")
    return p.parse_args()


def read_manifest(path, limit):
    root = path.parent
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if "audio" not in entry or "text" not in entry:
                sys.exit(f"{path}:{number}: each line needs \"audio\" and \"text\"")
            audio = root / entry["audio"]
            # The example id: the audio path relative to the manifest's folder (as `asr ingest`).
            entries.append((Path(entry["audio"]).as_posix(), entry["text"], audio))
            if limit is not None and len(entries) >= limit:
                break
    return entries


def ingest_requests(args, entries, split):
    yield feature_service_pb2.IngestAudioRequest(config=feature_service_pb2.IngestAudioConfig(
        dataset=args.dataset,
        # Re-running after an interruption stores only the missing examples (duplicates are
        # rejected per example, the stream goes on).
        mode=datasets_pb2.INGEST_MODE_CREATE_OR_APPEND,
        split=split,
        language=args.language,
    ))
    for example_id, text, audio in entries:
        yield feature_service_pb2.IngestAudioRequest(
            example=feature_service_pb2.AudioExampleHeader(id=example_id, text=text))
        with open(audio, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield feature_service_pb2.IngestAudioRequest(audio=chunk)


def ingest(stub, args, manifest, split):
    entries = read_manifest(manifest, args.max_examples)
    response = stub.Ingest(ingest_requests(args, entries, split))
    duplicates = 0
    for ack in response.results:
        if ack.status == datasets_pb2.EXAMPLE_STATUS_REJECTED:
            if ack.rejection == datasets_pb2.REJECTION_REASON_DUPLICATE_ID:
                duplicates += 1
            else:
                reason = datasets_pb2.RejectionReason.Name(ack.rejection)
                print(f"rejected {ack.example_id}: {reason}: {ack.message}", file=sys.stderr)
    info = response.dataset_info
    print(f"ingested {manifest} into {response.dataset}/{split}: {response.accepted_count} of "
          f"{len(entries)} stored ({duplicates} already there, "
          f"{response.rejected_count - duplicates} rejected), "
          f"{response.accepted_audio_seconds:.1f} s of audio; the dataset holds "
          f"{info.example_count} examples, {info.audio_hours * 3600:.1f} s", flush=True)
    return {"split": split, "sent": len(entries), "accepted": response.accepted_count,
            "rejected": response.rejected_count, "duplicates": duplicates,
            "dataset_examples": info.example_count}


def start_request(args):
    hyper = training_pb2.TrainingHyperparameters(
        learning_rate=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        logging_steps=args.logging_steps,
        language=args.language,
    )
    # `optional` fields: set only when given, unset = the documented default.
    if args.warmup_steps is not None:
        hyper.warmup_steps = args.warmup_steps
    if args.seed is not None:
        hyper.seed = args.seed
    request = training_pb2.StartTrainingRequest(
        train_dataset=datasets_pb2.DatasetRef(dataset=args.dataset, split=args.split),
        lora=training_pb2.LoraConfig(
            r=args.lora_r,
            alpha=args.lora_alpha,
            target_modules=[m for m in args.target_modules.split(",") if m],
        ),
        hyperparameters=hyper,
        output_adapter=args.output_adapter,
    )
    if args.eval_manifest is not None:
        request.eval_dataset.CopyFrom(
            datasets_pb2.DatasetRef(dataset=args.dataset, split=args.eval_split))
    return request


def print_event(event):
    kind = event.WhichOneof("event")
    e = getattr(event, kind)
    if kind == "job_started":
        line = (f"started: {e.train_example_count} examples, {e.max_steps} steps "
                f"({e.steps_per_epoch} per epoch), trainable params {e.trainable_parameters:,} "
                f"of {e.total_parameters:,} on {e.device}")
    elif kind == "resumed":
        line = f"resumed from {e.checkpoint or '(start)'} at step {e.from_step}"
    elif kind == "step_logged":
        line = (f"step {e.global_step:>5}  epoch {e.epoch:5.2f}  loss {e.loss:.4f}  "
                f"lr {e.learning_rate:.3e}  grad_norm {e.grad_norm:.3f}  "
                f"samples/s {e.samples_per_second:.2f}")
    elif kind == "evaluated" and not e.results:
        line = f"epoch {e.epoch:.2f} done at step {e.global_step} (no eval set)"
    elif kind == "evaluated":
        line = "\n".join(
            f"eval at step {e.global_step} (epoch {e.epoch:.2f}): {r.name} loss {r.loss:.4f}"
            + (f", CER {r.cer * 100:.2f}%" if r.HasField("cer") else "")
            for r in e.results)
    elif kind == "checkpoint_saved":
        line = f"checkpoint {e.name}" + (" (best so far)" if e.is_best else "")
    elif kind == "job_finished":
        line = (f"finished at step {e.global_step}: adapter {e.adapter!r} from "
                f"{e.best_checkpoint}, train loss {e.train_loss:.4f}, "
                f"{e.train_runtime_seconds:.1f} s")
    elif kind == "job_failed":
        line = f"FAILED at step {e.global_step}: {e.reason}"
    elif kind == "job_cancelled":
        line = f"cancelled at step {e.global_step}"
    else:
        line = f"{kind}"
    print(f"[{event.index:>3}] {line}", flush=True)
    return kind


def main():
    args = parse_args()
    features = feature_service_pb2_grpc.FeatureServiceStub(channel(args.server))
    result = {"dataset": args.dataset, "ingested": []}
    what = "ingesting"
    try:
        result["ingested"].append(ingest(features, args, args.manifest, args.split))
        if args.eval_manifest is not None:
            result["ingested"].append(ingest(features, args, args.eval_manifest, args.eval_split))

        what = "asking the feature service for its model service"
        address = args.model_service or features.GetInfo(
            feature_service_pb2.GetInfoRequest()).model_service_address
        if not address:
            sys.exit("no --model-service given, and the feature service relays to none")
        models = model_service_pb2_grpc.ModelServiceStub(channel(address))

        what = f"starting the job on the model service at {address}"
        job = models.StartTraining(start_request(args))
        print(f"job {job.id} {training_pb2.TrainingJobState.Name(job.state)} on {address}",
              flush=True)
        result["job_id"] = job.id
        if not args.no_watch:
            what = f"watching job {job.id}"
            final, steps = None, 0
            for event in models.WatchTraining(
                    training_pb2.WatchTrainingRequest(job_id=job.id, from_event_index=0)):
                kind = print_event(event)
                steps += kind == "step_logged"
                if kind in ("job_finished", "job_failed", "job_cancelled"):
                    final = event
            result["step_events"] = steps
            if final is not None and final.WhichOneof("event") == "job_finished":
                result["global_step"] = final.job_finished.global_step
                result["train_loss"] = final.job_finished.train_loss
                result["adapter"] = final.job_finished.adapter
            job = models.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job.id))
        result["state"] = training_pb2.TrainingJobState.Name(job.state)
        if job.error:
            result["error"] = job.error
    except grpc.RpcError as error:
        result["error"] = report_error(error, what)
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        return 1
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    ok = result["state"] in ("TRAINING_JOB_STATE_SUCCEEDED",) or (
        args.no_watch and result["state"] in ("TRAINING_JOB_STATE_QUEUED",
                                              "TRAINING_JOB_STATE_RUNNING"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
