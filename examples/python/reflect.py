#!/usr/bin/env python3
"""Lists and describes the services of a gRPC server through server reflection, as
`grpcurl -plaintext ADDR list|describe` does; no .proto file is needed.

    python reflect.py --server 127.0.0.1:50051 list                        # services
    python reflect.py --server 127.0.0.1:50051 list asr.v1.FeatureService  # its methods
    python reflect.py --server 127.0.0.1:50051 describe asr.v1.FeatureService.Transcribe
    python reflect.py --server 127.0.0.1:50051 describe asr.v1.TranscriptionOptions asr.v1.Task
    python reflect.py --server 127.0.0.1:50051 describe                    # every service

The descriptors come from grpcio-reflection's ProtoReflectionDescriptorDatabase, which speaks
grpc.reflection.v1alpha. Servers may offer only grpc.reflection.v1 (tonic's, and so both asr
services, do): the messages of the two versions are the same, only the method path differs,
so this client asks v1 first and falls back to v1alpha (as grpcurl does).
"""

import argparse
import sys

from asr_client import channel

import grpc  # noqa: E402
from google.protobuf import descriptor_pb2  # noqa: E402
from google.protobuf.descriptor_pool import DescriptorPool  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2  # noqa: E402
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: E402
    ProtoReflectionDescriptorDatabase,
)

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


class _V1Stub:
    """grpc.reflection.v1's stub, with v1alpha's (wire-identical) message classes."""

    def __init__(self, chan):
        self.ServerReflectionInfo = chan.stream_stream(
            V1_METHOD,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )


def reflection_database(chan):
    """A descriptor database over the server's reflection service (v1, else v1alpha), and the
    version used."""
    database = ProtoReflectionDescriptorDatabase(chan)
    v1alpha_stub = database._stub
    database._stub = _V1Stub(chan)
    try:
        database.get_services()
        return database, "v1"
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    database._stub = v1alpha_stub
    database.get_services()
    return database, "v1alpha"


# ---- printing descriptors back as .proto text, with the comments the server sent ----

# FileDescriptorProto field numbers, for locations in SourceCodeInfo.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM, _ONEOF = 2, 3, 4, 8
_VALUE, _METHOD = 2, 2

_SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}


class Printer:
    def __init__(self, file_proto):
        self.comments = {}
        for location in file_proto.source_code_info.location:
            if location.leading_comments:
                self.comments[tuple(location.path)] = location.leading_comments
        self.lines = []

    def comment(self, path, indent):
        text = self.comments.get(tuple(path), "")
        for line in text.rstrip("\n").split("\n") if text else []:
            self.lines.append(f"{indent}//{line}" if line else f"{indent}//")

    def out(self, line, indent=""):
        self.lines.append(indent + line)

    def method(self, m, path, indent=""):
        self.comment(path, indent)
        arg = ("stream " if m.client_streaming else "") + m.input_type
        ret = ("stream " if m.server_streaming else "") + m.output_type
        self.out(f"rpc {m.name} ( {arg} ) returns ( {ret} );", indent)

    def service(self, s, path):
        self.comment(path, "")
        self.out(f"service {s.name} {{")
        for i, m in enumerate(s.method):
            self.method(m, path + [_METHOD, i], "  ")
        self.out("}")

    def enum(self, e, path, indent=""):
        self.comment(path, indent)
        self.out(f"enum {e.name} {{", indent)
        for i, v in enumerate(e.value):
            self.comment(path + [_VALUE, i], indent + "  ")
            self.out(f"{v.name} = {v.number};", indent + "  ")
        self.out("}", indent)

    def field(self, f, path, indent):
        self.comment(path, indent)
        if f.type_name:
            kind = f.type_name
        else:
            kind = _SCALARS.get(f.type, "?")
        label = ""
        if f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            label = "repeated "
        elif f.proto3_optional:
            label = "optional "
        self.out(f"{label}{kind} {f.name} = {f.number};", indent)

    def message(self, msg, path, indent=""):
        self.comment(path, indent)
        self.out(f"message {msg.name} {{", indent)
        inner = indent + "  "
        for i, nested in enumerate(msg.nested_type):
            if not nested.options.map_entry:
                self.message(nested, path + [_NESTED, i], inner)
        for i, nested in enumerate(msg.enum_type):
            self.enum(nested, path + [_NESTED_ENUM, i], inner)
        # Real oneofs group their fields; synthetic ones (proto3 `optional`) do not.
        real_oneofs = {
            f.oneof_index for f in msg.field
            if f.HasField("oneof_index") and not f.proto3_optional
        }
        done = set()
        for i, f in enumerate(msg.field):
            if f.HasField("oneof_index") and f.oneof_index in real_oneofs:
                if f.oneof_index in done:
                    continue
                done.add(f.oneof_index)
                self.comment(path + [_ONEOF, f.oneof_index], inner)
                self.out(f"oneof {msg.oneof_decl[f.oneof_index].name} {{", inner)
                for j, g in enumerate(msg.field):
                    if g.HasField("oneof_index") and g.oneof_index == f.oneof_index:
                        self.field(g, path + [_FIELD, j], inner + "  ")
                self.out("}", inner)
            else:
                self.field(f, path + [_FIELD, i], inner)
        self.out("}", indent)


def find(file_proto, symbol):
    """(kind, descriptor proto, source path) of a fully qualified symbol in its file."""
    package = file_proto.package
    prefix = package + "." if package else ""
    if not symbol.startswith(prefix):
        return None
    rest = symbol[len(prefix):]
    for i, s in enumerate(file_proto.service):
        if rest == s.name:
            return "service", s, [_SERVICE, i]
        for j, m in enumerate(s.method):
            if rest == f"{s.name}.{m.name}":
                return "method", m, [_SERVICE, i, _METHOD, j]

    def in_messages(messages, path, scope):
        for i, msg in enumerate(messages):
            name = scope + msg.name
            here = path + [i]
            if rest == name:
                return "message", msg, here
            for k, e in enumerate(msg.enum_type):
                if rest == f"{name}.{e.name}":
                    return "enum", e, here + [_NESTED_ENUM, k]
            for k, f in enumerate(msg.field):
                if rest == f"{name}.{f.name}":
                    return "field", f, here + [_FIELD, k]
            hit = in_messages(msg.nested_type, here + [_NESTED], name + ".")
            if hit:
                return hit
        return None

    for i, e in enumerate(file_proto.enum_type):
        if rest == e.name:
            return "enum", e, [_ENUM, i]
    return in_messages(file_proto.message_type, [_MESSAGE], "")


def file_of(database, symbol):
    """The FileDescriptorProto defining `symbol`. Python's descriptor database indexes
    messages, enums and services but not methods or fields: for those, the parent's file."""
    candidates = [symbol]
    if "." in symbol:
        candidates.append(symbol.rsplit(".", 1)[0])
    for candidate in candidates:
        try:
            return database.FindFileContainingSymbol(candidate)
        except KeyError:
            continue
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
    raise KeyError(symbol)


def describe(database, pool, symbol):
    file_proto = file_of(database, symbol)
    pool.FindFileByName(file_proto.name)  # resolves every import, or fails here
    hit = find(file_proto, symbol)
    if hit is None:
        raise KeyError(symbol)
    kind, proto, path = hit
    printer = Printer(file_proto)
    printer.out(f"{symbol} is {'an' if kind == 'enum' else 'a'} {kind}:")
    if kind == "service":
        printer.service(proto, path)
    elif kind == "method":
        printer.method(proto, path)
    elif kind == "message":
        printer.message(proto, path)
    elif kind == "enum":
        printer.enum(proto, path)
    else:
        printer.field(proto, path, "")
    return "\n".join(printer.lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="127.0.0.1:50051",
                   help="host:port or http://host:port (default %(default)s)")
    p.add_argument("verb", choices=["list", "describe"])
    p.add_argument("symbols", nargs="*", metavar="SYMBOL",
                   help="list: a service (its methods); describe: services, methods, messages, "
                        "enums or fields (default: every service)")
    args = p.parse_args()
    try:
        database, version = reflection_database(channel(args.server))
        pool = DescriptorPool(database)
        services = sorted(database.get_services())
        if args.verb == "list" and not args.symbols:
            print("\n".join(services))
        elif args.verb == "list":
            for symbol in args.symbols:
                service = pool.FindServiceByName(symbol)
                print("\n".join(m.full_name for m in service.methods))
        else:
            symbols = args.symbols or services
            print("\n\n".join(describe(database, pool, s) for s in symbols))
    except grpc.RpcError as error:
        print(f"error: reflection at {args.server}: {error.code().name}: {error.details()}",
              file=sys.stderr)
        return 1
    except KeyError as error:
        print(f"error: symbol not found: {error.args[0]}", file=sys.stderr)
        return 1
    print(f"(server reflection {version})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
