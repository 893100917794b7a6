"""Shared helpers of the Python examples: the stubs generated from proto/ with grpcio-tools,
channels from the addresses the Rust tools take, and gRPC errors with their
google.rpc.BadRequest field violations.

The stubs are generated into gen/ (git-ignored) the first time a script runs, and again
whenever a .proto file changes. `./generate.sh` (= `python asr_client.py`) does it by hand.
"""

import fcntl
import hashlib
import importlib.resources
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The API: proto/asr/v1/*.proto, package asr.v1. ASR_PROTO_DIR points elsewhere (a copy of
# proto/ next to a client living outside this repository).
PROTO_ROOT = Path(os.environ.get("ASR_PROTO_DIR", HERE.parent.parent / "proto")).resolve()
GEN = HERE / "gen"
STAMP = ".proto-sha256"
# Largest message sent or received (an example's features are about 1 MB; responses are small).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def proto_files():
    files = sorted((PROTO_ROOT / "asr" / "v1").glob("*.proto"))
    if not files:
        sys.exit(f"no .proto files under {PROTO_ROOT / 'asr' / 'v1'} (set ASR_PROTO_DIR)")
    return files


def _fingerprint(files):
    import grpc_tools

    digest = hashlib.sha256()
    digest.update(getattr(grpc_tools, "__version__", "").encode())
    for path in files:
        digest.update(path.relative_to(PROTO_ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def protoc_args(out_dir, files):
    """The grpc_tools.protoc command line (the first argument is protoc's argv[0])."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    return [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(f) for f in files],
    ]


def generate(force=False, verbose=False):
    """Generates the stubs into gen/ unless they are there and match the .proto files.

    Several clients may start at once (the tests run them side by side): one generates under a
    lock, into a fresh folder that replaces gen/ whole.
    """
    from grpc_tools import protoc

    files = proto_files()
    fingerprint = _fingerprint(files)
    stamp = GEN / STAMP
    if not force and stamp.exists() and stamp.read_text() == fingerprint:
        return
    with open(HERE / ".gen.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and stamp.exists() and stamp.read_text() == fingerprint:
            return
        fresh = Path(tempfile.mkdtemp(prefix="gen.", dir=HERE))
        os.chmod(fresh, 0o755)  # mkdtemp makes it private
        try:
            args = protoc_args(fresh, files)
            if verbose:
                print("python -m " + " ".join(args), file=sys.stderr)
            if protoc.main(args) != 0:
                sys.exit("grpc_tools.protoc failed on " + ", ".join(map(str, files)))
            (fresh / STAMP).write_text(fingerprint)
            old = None
            if GEN.exists():
                old = Path(tempfile.mkdtemp(prefix="gen.old.", dir=HERE))
                os.rename(GEN, old / "gen")
            os.rename(fresh, GEN)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)


def load_stubs():
    """Generates the stubs if needed and puts gen/ on sys.path: `from asr.v1 import ...` works
    after this."""
    generate()
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))


def channel(address):
    """A channel to `address`: `host:port`, `http://host:port` (plaintext, as the Rust tools take
    it) or `https://host:port` (TLS with the system roots)."""
    import grpc

    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    target = address
    secure = False
    if target.startswith("http://"):
        target = target[len("http://") :]
    elif target.startswith("https://"):
        target, secure = target[len("https://") :], True
    target = target.rstrip("/")
    host = target.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "::1") or host.startswith("127."):
        # A proxy from the environment must not take loopback traffic.
        options.append(("grpc.enable_http_proxy", 0))
    if secure:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
    return grpc.insecure_channel(target, options=options)


def error_details(error):
    """(code name, message, [(field, description)]) of a grpc.RpcError; the field violations
    come from the google.rpc.BadRequest detail that INVALID_ARGUMENT carries."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    code = error.code().name if error.code() else "UNKNOWN"
    violations = []
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend((v.field, v.description) for v in bad.field_violations)
    return code, error.details() or "", violations


def report_error(error, what):
    """Prints a gRPC error to stderr (code, message, one line per bad field) and returns a
    dict of it for JSON output."""
    code, message, violations = error_details(error)
    print(f"error: {what}: {code}: {message}", file=sys.stderr)
    for field, description in violations:
        print(f"  field {field}: {description}", file=sys.stderr)
    return {
        "code": code,
        "message": message,
        "field_violations": [{"field": f, "description": d} for f, d in violations],
    }


if __name__ == "__main__":
    generate(force=True, verbose=True)
    print(f"stubs of {len(proto_files())} .proto files in {GEN}", file=sys.stderr)
