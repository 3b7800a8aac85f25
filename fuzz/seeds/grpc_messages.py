#!/usr/bin/env python3
"""Writes the grpc_messages seeds (fuzz/corpus/grpc_messages/): one valid
request per RPC, protobuf-encoded by hand. Byte 0 is the method's index in
METHODS of fuzz_targets/grpc_messages.rs; the names are the records the
harness creates at start (app/db, k1, k2, o1, t1, c1, p1, r1).
Run once from the repository root: python3 fuzz/seeds/grpc_messages.py"""
import hashlib
import os


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


def f(num, v):
    """A field: int -> varint, bool -> varint, str/bytes -> length-delimited."""
    if isinstance(v, bool):
        return varint(num << 3) + varint(int(v))
    if isinstance(v, int):
        return varint(num << 3) + varint(v)
    if isinstance(v, str):
        v = v.encode()
    return varint(num << 3 | 2) + varint(len(v)) + v


def msg(*fields):
    return b"".join(fields)


SHA = hashlib.sha256(b"hello").digest()
target = msg(f(1, "t2"), f(2, "https://api.example.net:8443/base"), f(4, 2000))
cred = msg(f(1, "c2"), f(2, "t1"), f(3, "query"), f(6, "api_key"))
proxy = msg(f(1, "p2"), f(2, "t1"), f(3, "c1"), f(4, "allow"), f(6, "uid=4242"),
            f(8, "o1"), f(11, "suspend"))
rule = msg(f(1, "p1"), f(2, "r2"), f(3, 5), f(4, "deny"), f(5, "POST"),
           f(6, "^/admin"), f(7, msg(f(1, "x-tenant"), f(2, "^a+$"))),
           f(8, msg(f(1, "debug"), f(2, "1"))), f(9, "no admin"))

SEEDS = [
    ("Secrets.Get", msg(f(1, "app/db"))),
    ("Secrets.Put", msg(f(1, "app/db"), f(2, b"new-value"), f(3, 1),
                        f(4, msg(f(1, "team"), f(2, "a"))), f(5, True), f(8, 3))),
    ("Secrets.List", msg(f(1, "app/"), f(2, 10))),
    ("Secrets.History", msg(f(1, "app/db"))),
    ("Secrets.Delete", msg(f(1, "app/db"), f(2, 1))),
    ("Secrets.Undelete", msg(f(1, "app/db"), f(2, 1))),
    ("Secrets.Destroy", msg(f(1, "app/db"), f(2, 1))),
    ("Secrets.Watch", msg(f(1, "app/"), f(1, "app/db"))),
    ("System.Status", b""),
    ("System.RotateRoot", b""),
    ("Keys.Create", msg(f(1, "k3"), f(2, "ecdsa-p256"))),
    ("Keys.List", msg(f(1, "k"))),
    ("Keys.Get", msg(f(1, "k1"))),
    ("Keys.Sign", msg(f(1, "k1"), f(2, b"hello"))),
    ("Keys.Verify", msg(f(1, "k1"), f(3, SHA), f(4, "sha256"), f(5, b"\x30" * 70))),
    ("Keys.Rotate", msg(f(1, "k2"))),
    ("Keys.DisableVersion", msg(f(1, "k2"), f(2, 1))),
    ("Keys.EnableVersion", msg(f(1, "k1"), f(2, 1))),
    ("Keys.Destroy", msg(f(1, "k4"))),
    ("Keys.Jwks", msg(f(1, "k1"), f(1, "k2"))),
    ("Keys.MintToken", msg(f(1, "k1"), f(2, "ks_test_000000000000000000000000000000000aaaaaa"), f(3, 60))),
    ("ApiKeys.Issue", msg(f(1, "o2"), f(2, "read"), f(3, "test"), f(4, 3600),
                          f(5, "127.0.0.0/8"), f(7, msg(f(1, "k"), f(2, "v"))))),
    ("ApiKeys.Verify", msg(f(1, "ks_live_000000000000000000000000000000000aaaaaa"),
                           f(2, "127.0.0.1"), f(3, "read"))),
    ("ApiKeys.List", msg(f(1, "o1"), f(3, True), f(4, 5))),
    ("ApiKeys.Get", msg(f(1, "ak_0123456789abcdef01234567"))),
    ("ApiKeys.Rotate", msg(f(1, "ak_0123456789abcdef01234567"), f(2, 60))),
    ("ApiKeys.Revoke", msg(f(1, "ak_0123456789abcdef01234567"))),
    ("ApiKeys.RevokeOwner", msg(f(1, "o3"))),
    ("Audit.Export", msg(f(1, 1))),
    ("Audit.Query", msg(f(2, "secret.get"), f(3, "app/db"), f(8, 5))),
    ("Audit.Tail", msg(f(1, 3))),
    ("Audit.Hash", msg(f(1, b"app/db"))),
    ("Audit.Prune", msg(f(1, 1))),
    ("Proxy.PutTarget", msg(f(1, target))),
    ("Proxy.ListTargets", b""),
    ("Proxy.DeleteTarget", msg(f(1, "t3"))),
    ("Proxy.PutCredential", msg(f(1, cred), f(2, b"vendor-secret-2"))),
    ("Proxy.ListCredentials", b""),
    ("Proxy.DeleteCredential", msg(f(1, "c3"))),
    ("Proxy.PutProxy", msg(f(1, proxy))),
    ("Proxy.GetProxy", msg(f(1, "p1"))),
    ("Proxy.ListProxies", b""),
    ("Proxy.DeleteProxy", msg(f(1, "p3"))),
    ("Proxy.PutRule", msg(f(1, rule))),
    ("Proxy.ListRules", msg(f(1, "p1"))),
    ("Proxy.DeleteRule", msg(f(1, "p1"), f(2, "r4"))),
    ("Proxy.Test", msg(f(1, "p1"), f(2, "GET"), f(3, "/items/42"),
                       f(4, msg(f(1, "x-tenant"), f(2, "aaa"))), f(5, "debug=1"))),
    ("Proxy.Requests", msg(f(1, "p1"), f(4, 10))),
    ("Proxy.Telemetry", msg(f(1, "p1"), f(2, "minute"), f(3, 5))),
    ("Proxy.Unsuspend", msg(f(1, "p1"), f(2, "uid=4242"))),
    ("Proxy.CaCertificate", b""),
]

out = "fuzz/corpus/grpc_messages"
os.makedirs(out, exist_ok=True)
for i, (name, body) in enumerate(SEEDS):
    with open(os.path.join(out, f"{i:02d}-{name}"), "wb") as fh:
        fh.write(bytes([i]) + body)
print(f"{len(SEEDS)} seeds in {out}")
