#!/usr/bin/env python3
"""A keyseal gRPC client written with Python grpcio, for the end-to-end tests.

It is the "client nobody here wrote": it talks to keyseald over its Unix
socket with stubs generated from proto/ at test time (PYTHONPATH must name
the directory holding the generated `keyseal/v1/*_pb2*.py`), or with generic
calls carrying hand-encoded bytes (health, reflection, malformed input).

Every subcommand prints JSON lines on stdout and exits 0 when the call
succeeded, 3 when it ended with a gRPC error (printed as
{"ok": false, "code": "NOT_FOUND", "details": "..."}), 2 on usage errors.

Subcommands:
  get NAME [--version N]        {"ok": true, "name", "version", "value_hex"}
  put NAME [--cas N] [--value-hex H]
                                value from H or stdin; {"ok": true, "name", "version"}
  watch [NAME|PREFIX/ ...]      {"ready": true} once the stream is open, then
                                one {"name", "version", "kind"} line per event
  health [--service S]          grpc.health.v1.Health/Check with hand-encoded
                                bytes; {"ok": true, "response_hex"}
  raw METHOD [--hex H] [--fill N]
                                unary call with raw request bytes (H, or N
                                bytes of a length-delimited field 2);
                                {"ok": true, "response_hex"}
  reflect-list                  server reflection list_services;
                                {"ok": true, "services": [...]}
  reflect-symbol SYMBOL         server reflection file_containing_symbol;
                                {"ok": true, "files": [{"name", "package",
                                "services": {SERVICE: [[METHOD, client_streaming,
                                server_streaming], ...]}}]}
  batch                         one channel, many calls: each stdin line is a
                                JSON array of the arguments of one of the
                                commands above (not watch/batch); answers one
                                JSON line each

The socket comes from --socket. Python grpcio sends the socket path as the
HTTP/2 :authority of a unix: target, which hyper rejects; the channel sets
grpc.default_authority to "localhost".
"""

import argparse
import binascii
import json
import sys

import grpc

EXIT_RPC_ERROR = 3


def emit(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def channel(sock):
    return grpc.insecure_channel(
        "unix://" + sock, options=[("grpc.default_authority", "localhost")]
    )


def rpc_failed(e):
    emit({"ok": False, "code": e.code().name, "details": e.details() or ""})
    return EXIT_RPC_ERROR


# --- minimal protobuf wire format (for hand-encoded messages) ---------------


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num, data):
    return varint((num << 3) | 2) + varint(len(data)) + data


def parse_fields(buf):
    """Yields (field number, wire type, value) of a serialized message."""
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 2:
            n, i = read_varint(buf, i)
            v = buf[i : i + n]
            if len(v) != n:
                raise ValueError("truncated length-delimited field")
            i += n
        elif wt == 1:
            v, i = buf[i : i + 8], i + 8
        elif wt == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise ValueError("unsupported wire type %d" % wt)
        yield num, wt, v


def read_varint(buf, i):
    shift = 0
    n = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def raw_unary(ch, method, request, timeout):
    # No serializers: request and response are bytes on the wire.
    call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
    return call(request, timeout=timeout)


# --- subcommands --------------------------------------------------------------


def cmd_get(a, ch):
    from keyseal.v1 import secrets_pb2, secrets_pb2_grpc

    stub = secrets_pb2_grpc.SecretsStub(ch)
    r = stub.Get(secrets_pb2.GetRequest(name=a.name, version=a.version), timeout=a.timeout)
    emit(
        {
            "ok": True,
            "name": r.name,
            "version": r.version,
            "value_hex": binascii.hexlify(r.value).decode(),
        }
    )
    return 0


def cmd_put(a, ch):
    from keyseal.v1 import secrets_pb2, secrets_pb2_grpc

    stub = secrets_pb2_grpc.SecretsStub(ch)
    if a.value_hex is not None:
        value = binascii.unhexlify(a.value_hex)
    else:
        value = sys.stdin.buffer.read()
    req = secrets_pb2.PutRequest(name=a.name, value=value)
    if a.cas is not None:
        req.cas = a.cas
    r = stub.Put(req, timeout=a.timeout)
    emit({"ok": True, "name": r.name, "version": r.version})
    return 0


def cmd_watch(a, ch):
    from keyseal.v1 import secrets_pb2, secrets_pb2_grpc

    stub = secrets_pb2_grpc.SecretsStub(ch)
    # No deadline: the test kills this process when done.
    call = stub.Watch(secrets_pb2.WatchRequest(names=a.names))
    # The server subscribes before it answers with headers, so once the
    # initial metadata is here no event can be missed.
    call.initial_metadata()
    emit({"ready": True})
    for ev in call:
        emit({"name": ev.name, "version": ev.version, "kind": ev.kind})
    emit({"ok": True, "end": True})
    return 0


def cmd_health(a, ch):
    req = field_bytes(1, a.service.encode()) if a.service else b""
    r = raw_unary(ch, "/grpc.health.v1.Health/Check", req, a.timeout)
    emit({"ok": True, "response_hex": binascii.hexlify(r).decode()})
    return 0


def cmd_raw(a, ch):
    if a.fill is not None:
        req = field_bytes(2, b"\0" * a.fill)
    else:
        req = binascii.unhexlify(a.hex)
    r = raw_unary(ch, a.method, req, a.timeout)
    emit({"ok": True, "response_hex": binascii.hexlify(r).decode()})
    return 0


REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def reflect(ch, request, timeout):
    """One request on the reflection stream; returns the response fields."""
    call = ch.stream_stream(REFLECTION, request_serializer=None, response_deserializer=None)
    responses = list(call(iter([request]), timeout=timeout))
    if len(responses) != 1:
        raise ValueError("expected one reflection response, got %d" % len(responses))
    return list(parse_fields(responses[0]))


def reflection_error(fields):
    for num, _, v in fields:
        if num == 7:  # error_response
            return {f: (val.decode() if isinstance(val, bytes) else val) for f, _, val in parse_fields(v)}
    return None


def cmd_reflect_list(a, ch):
    fields = reflect(ch, field_bytes(7, b"*"), a.timeout)  # list_services
    err = reflection_error(fields)
    if err is not None:
        emit({"ok": False, "reflection_error": err})
        return EXIT_RPC_ERROR
    services = []
    for num, _, v in fields:
        if num == 6:  # list_services_response
            for snum, _, svc in parse_fields(v):
                if snum == 1:  # ServiceResponse
                    for nnum, _, name in parse_fields(svc):
                        if nnum == 1:
                            services.append(name.decode())
    emit({"ok": True, "services": sorted(services)})
    return 0


def cmd_reflect_symbol(a, ch):
    from google.protobuf import descriptor_pb2

    fields = reflect(ch, field_bytes(4, a.symbol.encode()), a.timeout)
    err = reflection_error(fields)
    if err is not None:
        emit({"ok": False, "reflection_error": err})
        return EXIT_RPC_ERROR
    files = []
    for num, _, v in fields:
        if num == 4:  # file_descriptor_response
            for fnum, _, fd_bytes in parse_fields(v):
                if fnum == 1:
                    fd = descriptor_pb2.FileDescriptorProto.FromString(fd_bytes)
                    files.append(
                        {
                            "name": fd.name,
                            "package": fd.package,
                            "services": {
                                s.name: [
                                    [m.name, m.client_streaming, m.server_streaming]
                                    for m in s.method
                                ]
                                for s in fd.service
                            },
                        }
                    )
    emit({"ok": True, "files": files})
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("get")
    s.add_argument("name")
    s.add_argument("--version", type=int, default=0)
    s.set_defaults(fn=cmd_get)

    s = sub.add_parser("put")
    s.add_argument("name")
    s.add_argument("--cas", type=int)
    s.add_argument("--value-hex")
    s.set_defaults(fn=cmd_put)

    s = sub.add_parser("watch")
    s.add_argument("names", nargs="*")
    s.set_defaults(fn=cmd_watch)

    s = sub.add_parser("health")
    s.add_argument("--service", default="")
    s.set_defaults(fn=cmd_health)

    s = sub.add_parser("raw")
    s.add_argument("method")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--hex")
    g.add_argument("--fill", type=int)
    s.set_defaults(fn=cmd_raw)

    s = sub.add_parser("reflect-list")
    s.set_defaults(fn=cmd_reflect_list)

    s = sub.add_parser("reflect-symbol")
    s.add_argument("symbol")
    s.set_defaults(fn=cmd_reflect_symbol)

    s = sub.add_parser("batch")
    s.set_defaults(fn=None)

    a = p.parse_args()
    with channel(a.socket) as ch:
        if a.cmd != "batch":
            return run_one(a, ch)
        for line in sys.stdin:
            argv = json.loads(line)
            if not argv or argv[0] in ("watch", "batch"):
                emit({"ok": False, "code": "USAGE", "details": "not in a batch"})
                continue
            run_one(p.parse_args(["--socket", a.socket, "--timeout", str(a.timeout)] + argv), ch)
        return 0


def run_one(a, ch):
    try:
        return a.fn(a, ch)
    except grpc.RpcError as e:
        return rpc_failed(e)


if __name__ == "__main__":
    sys.exit(main())
