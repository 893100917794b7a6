#!/usr/bin/env node
// Streams an audio file to FeatureService.Transcribe with @grpc/grpc-js, the API loaded at run
// time from proto/asr/v1/*.proto by @grpc/proto-loader (no generated code).
//
//   node transcribe.js clip.wav --server 127.0.0.1:50051 --language zh
//   node transcribe.js clip.wav --realtime            # paced like a live source, partials shown
//   node transcribe.js - --raw s16le --sample-rate 16000 < pcm.raw
//   node transcribe.js clip.wav --no-fallback --json  # one JSON line (what the tests compare)
//
// The stream (proto/asr/v1/feature_service.proto): one `config` message (TranscribeAudioConfig:
// the audio format and the TranscriptionOptions), then the file's bytes as `audio` chunks of
// any size; ending the request stream ends the audio. The server answers with `partial` events
// (only when asked), `segment` events, then one `summary`. Partial results go to stderr,
// segments to stdout as they come (with --json stdout holds only the final JSON line).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// The API: proto/asr/v1/*.proto of this repository, or ASR_PROTO_DIR.
const PROTO_ROOT = path.resolve(process.env.ASR_PROTO_DIR || path.join(__dirname, '..', '..', 'proto'));
// Bytes per audio message when the file is sent as fast as it is read.
const CHUNK_BYTES = 64 * 1024;
// With --realtime: audio per message, and the pause between messages (ms).
const REALTIME_STEP_MS = 100;
const BYTES_PER_SAMPLE = { s16le: 2, f32le: 4 };
const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

const USAGE = `usage: node transcribe.js FILE|- [options]
  --server ADDR          feature service: host:port or http://host:port (default 127.0.0.1:50051)
  --language CODE        Whisper language code, e.g. zh; empty: detected from the first 30 s
  --task transcribe|translate
  --beam N               beam width; 1 = greedy (default)
  --timestamps           timestamped segments
  --no-fallback          decode each window once at temperature 0 and keep it (deterministic)
  --seed N               seed of the fallback's sampling, with each window's audio (default 0)
  --adapter NAME         LoRA adapter of the model service's registry
  --adapter-scale X      0.0..1.0 (default 1.0)
  --partial              ask for partial results (shown on stderr)
  --partial-interval S   audio seconds between partial re-decodes (server default 1.0)
  --realtime             send the audio at its real-time rate (implies --partial)
  --raw s16le|f32le      the input is headerless PCM; with --sample-rate HZ and --channels N
  --json                 print one JSON line at the end`;

function parse() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      server: { type: 'string', default: '127.0.0.1:50051' },
      language: { type: 'string', default: '' },
      task: { type: 'string', default: 'transcribe' },
      beam: { type: 'string', default: '1' },
      timestamps: { type: 'boolean', default: false },
      'no-fallback': { type: 'boolean', default: false },
      seed: { type: 'string', default: '0' },
      adapter: { type: 'string', default: '' },
      'adapter-scale': { type: 'string' },
      partial: { type: 'boolean', default: false },
      'partial-interval': { type: 'string' },
      realtime: { type: 'boolean', default: false },
      raw: { type: 'string' },
      'sample-rate': { type: 'string', default: '16000' },
      channels: { type: 'string', default: '1' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help || positionals.length !== 1) {
    console.error(USAGE);
    process.exit(values.help ? 0 : 2);
  }
  if (!['transcribe', 'translate'].includes(values.task)) {
    throw new Error(`--task must be transcribe or translate, not ${values.task}`);
  }
  if (values.raw !== undefined && !(values.raw in BYTES_PER_SAMPLE)) {
    throw new Error(`--raw must be s16le or f32le, not ${values.raw}`);
  }
  if (!/^[0-9]{1,20}$/.test(values.seed) || BigInt(values.seed) >= 2n ** 64n) {
    throw new Error(`--seed: not an unsigned 64-bit integer: ${values.seed}`);
  }
  return { ...values, file: positionals[0] };
}

function loadApi() {
  const definition = protoLoader.loadSync('asr/v1/feature_service.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto (snake_case)
    enums: String, // enum values by name, e.g. 'TASK_TRANSCRIBE'
    longs: Number,
    defaults: true,
    oneofs: true, // the name of the set oneof member, e.g. response.event === 'segment'
  });
  return grpc.loadPackageDefinition(definition).asr.v1;
}

function target(address) {
  // host:port, http://host:port (plaintext, as the Rust tools take it) or https://host:port.
  let secure = false;
  let t = address;
  if (t.startsWith('http://')) t = t.slice('http://'.length);
  else if (t.startsWith('https://')) { t = t.slice('https://'.length); secure = true; }
  t = t.replace(/\/+$/, '');
  const host = t.replace(/:\d+$/, '').replace(/^\[|\]$/g, '');
  const loopback = host === 'localhost' || host === '::1' || host.startsWith('127.');
  return { target: t, secure, loopback };
}

function options(args) {
  // Sent as given: the service names the field when the width is out of range.
  const decoding = { beam_size: parseInt(args.beam, 10) };
  if (!Number.isInteger(decoding.beam_size) || decoding.beam_size < 0) {
    throw new Error(`--beam: not a width: ${args.beam}`);
  }
  // uint64 (checked in parse): a decimal string, which the proto loader takes for 64-bit fields.
  decoding.seed = args.seed;
  if (args['no-fallback']) {
    // `optional` fields set to the value that turns each behaviour off (see the comments in
    // transcription.proto); left out they mean the openai-whisper defaults.
    Object.assign(decoding, {
      temperature: 0,
      temperature_increment: 0,
      compression_ratio_threshold: 0,
      log_prob_threshold: -Infinity,
      no_speech_threshold: 1,
    });
  }
  const opts = {
    language: args.language,
    task: args.task === 'translate' ? 'TASK_TRANSLATE' : 'TASK_TRANSCRIBE',
    decoding,
    timestamps: args.timestamps,
    adapter: args.adapter,
    partial_results: args.partial || args.realtime,
  };
  if (args['adapter-scale'] !== undefined) opts.adapter_scale = parseFloat(args['adapter-scale']);
  if (args['partial-interval'] !== undefined) {
    opts.partial_interval_seconds = parseFloat(args['partial-interval']);
  }
  return opts;
}

function audioFormat(args) {
  if (args.raw === undefined) return null; // unset: encoded, container detected from the bytes
  return {
    raw_pcm: {
      sample_format: args.raw === 'f32le' ? 'SAMPLE_FORMAT_F32LE' : 'SAMPLE_FORMAT_S16LE',
      sample_rate_hz: parseInt(args['sample-rate'], 10),
      channels: parseInt(args.channels, 10),
    },
  };
}

// Bytes per second of audio, to pace --realtime; null when unknown here (only raw PCM and
// RIFF WAVE are understood by this client; the server decodes everything else).
function byteRate(args, data) {
  if (args.raw !== undefined) {
    return parseInt(args['sample-rate'], 10) * parseInt(args.channels, 10) * BYTES_PER_SAMPLE[args.raw];
  }
  if (data.length < 12 || data.toString('ascii', 0, 4) !== 'RIFF' || data.toString('ascii', 8, 12) !== 'WAVE') {
    return null;
  }
  let byteRateField = null;
  let dataBytes = null;
  for (let at = 12; at + 8 <= data.length;) {
    const id = data.toString('ascii', at, at + 4);
    const size = data.readUInt32LE(at + 4);
    if (id === 'fmt ' && at + 16 <= data.length) byteRateField = data.readUInt32LE(at + 16);
    if (id === 'data') { dataBytes = Math.min(size, data.length - at - 8); break; }
    at += 8 + size + (size % 2);
  }
  if (!byteRateField || !dataBytes) return null;
  const seconds = dataBytes / byteRateField;
  return data.length / seconds;
}

// google.rpc.Status and google.rpc.BadRequest (the parts this client reads), to decode the
// `grpc-status-details-bin` trailer that INVALID_ARGUMENT carries.
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'Any', id: 3 },
              },
            },
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
            BadRequest: {
              fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
                },
              },
            },
          },
        },
      },
    },
  },
});

function errorDetails(error) {
  const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === error.code) || 'UNKNOWN';
  const violations = [];
  const raw = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (raw.length > 0) {
    const status = rpcTypes.lookupType('google.rpc.Status').decode(raw[0]);
    for (const any of status.details) {
      if (any.type_url.endsWith('/google.rpc.BadRequest')) {
        const bad = rpcTypes.lookupType('google.rpc.BadRequest').decode(any.value);
        for (const v of bad.field_violations) violations.push({ field: v.field, description: v.description });
      }
    }
  }
  return { code: codeName, message: error.details || error.message, field_violations: violations };
}

class LiveLine {
  constructor() { this.tty = process.stderr.isTTY; this.shown = false; }

  partial(p) {
    if (this.tty) {
      process.stderr.write(`\r\x1b[K${p.audio_seconds.toFixed(1).padStart(6)}s  ${p.stable_text}\x1b[2m${p.unstable_text}\x1b[0m`);
      this.shown = true;
    } else {
      process.stderr.write(`partial ${p.audio_seconds.toFixed(2)}s: ${p.stable_text}|${p.unstable_text}\n`);
    }
  }

  clear() {
    if (this.shown) { process.stderr.write('\r\x1b[K'); this.shown = false; }
  }
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Writes respecting the stream's back-pressure.
function write(call, message) {
  return new Promise((resolve) => {
    if (call.write(message)) resolve();
    else call.once('drain', resolve);
  });
}

async function send(call, args, data) {
  const config = { options: options(args) };
  const format = audioFormat(args);
  if (format) config.format = format;
  await write(call, { config });
  let step = CHUNK_BYTES;
  let pause = 0;
  if (args.realtime) {
    const rate = byteRate(args, data);
    if (rate === null) {
      console.error("warning: cannot tell the audio's duration here; sending it unpaced");
    } else {
      step = Math.max(1, Math.ceil((rate * REALTIME_STEP_MS) / 1000));
      pause = REALTIME_STEP_MS;
    }
  }
  let nextAt = Date.now();
  for (let start = 0; start < data.length; start += step) {
    if (pause > 0) {
      const delay = nextAt - Date.now();
      if (delay > 0) await sleep(delay);
      nextAt += pause;
    }
    await write(call, { audio: data.subarray(start, start + step) });
  }
  call.end();
}

async function main() {
  const args = parse();
  const data = args.file === '-' ? fs.readFileSync(0) : fs.readFileSync(args.file);
  const api = loadApi();
  const { target: address, secure, loopback } = target(args.server);
  const client = new api.FeatureService(
    address,
    secure ? grpc.credentials.createSsl() : grpc.credentials.createInsecure(),
    {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      // A proxy from the environment must not take loopback traffic.
      ...(loopback ? { 'grpc.enable_http_proxy': 0 } : {}),
    },
  );
  const live = new LiveLine();
  const segments = [];
  const partials = [];
  let summary = null;
  const call = client.Transcribe();
  const done = new Promise((resolve, reject) => {
    call.on('data', (response) => {
      if (response.event === 'partial') {
        partials.push(response.partial);
        if (args.partial || args.realtime) live.partial(response.partial);
      } else if (response.event === 'segment') {
        const s = response.segment;
        segments.push(s);
        if (!args.json) {
          live.clear();
          const t = (x) => x.toFixed(2).padStart(7);
          console.log(`[${t(s.start_seconds)} -> ${t(s.end_seconds)}] ${s.text.trim()}`);
        }
      } else if (response.event === 'summary') {
        summary = response.summary;
      }
    });
    call.on('error', reject);
    call.on('status', (status) => { if (status.code === grpc.status.OK) resolve(); });
  });
  // A failed write (the server ended the call) surfaces as the call's error.
  send(call, args, data).catch(() => {});
  try {
    await done;
  } catch (error) {
    live.clear();
    const details = errorDetails(error);
    console.error(`error: transcribing ${args.file}: ${details.code}: ${details.message}`);
    for (const v of details.field_violations) console.error(`  field ${v.field}: ${v.description}`);
    if (args.json) console.log(JSON.stringify({ error: details }));
    client.close();
    return 1;
  }
  live.clear();
  client.close();
  if (summary === null) {
    console.error('error: the stream ended without a summary');
    return 1;
  }
  // The whole text: the segments' texts joined by a space.
  const text = segments.map((s) => s.text).join(' ');
  // The language used (given or detected); each segment carries it too.
  const language = summary.language || (segments.length ? segments[0].language : '');
  if (args.json) {
    console.log(JSON.stringify({
      text,
      language,
      language_probability: summary.language_probability ?? null,
      segments: segments.map((s) => ({
        id: s.id,
        start: s.start_seconds,
        end: s.end_seconds,
        text: s.text,
        avg_logprob: s.avg_logprob,
        no_speech_prob: s.no_speech_prob,
        temperature: s.temperature,
        window_index: s.window_index,
      })),
      partial_count: partials.length,
      last_stable_text: partials.length ? partials[partials.length - 1].stable_text : '',
      audio_seconds: summary.audio_seconds,
      processing_seconds: summary.processing_seconds,
      model_name: summary.model_name,
      precision: summary.precision,
      window_count: summary.window_count,
    }));
  } else {
    console.error(
      `${summary.audio_seconds.toFixed(2)} s of audio in ${summary.processing_seconds.toFixed(2)} s `
      + `(RTF ${summary.real_time_factor.toFixed(3)}), language ${language}, `
      + `${summary.model_name} ${summary.precision}, ${summary.window_count} window(s), `
      + `${partials.length} partial result(s)`,
    );
  }
  return 0;
}

main().then(
  (code) => { process.exitCode = code; },
  (error) => { console.error(`error: ${error.message}`); process.exitCode = 1; },
);
