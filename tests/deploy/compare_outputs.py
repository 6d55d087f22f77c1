#!/usr/bin/env python3
"""Compare two `epic generate --json --dump-logits` results: the JSON lines must carry
the same prompt_ids, output_ids, finish_reason and text, and the logits the same shape
and agree within --tol (floating-point reassociation across ranks).
Usage: compare_outputs.py REF.json REF.npy GOT.json GOT.npy [--tol 1e-4]
Prints one line; exit 0 when they match."""
import argparse
import ast
import json
import struct
import sys


def last_json(path):
    lines = [l for l in open(path, encoding="utf-8") if l.lstrip().startswith("{")]
    if not lines:
        raise ValueError(f"{path}: no JSON line")
    return json.loads(lines[-1])


def read_npy_f32(path):
    """(shape, values) of a little-endian float32 C-order .npy file."""
    with open(path, "rb") as f:
        b = f.read()
    if b[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not a .npy file")
    major = b[6]
    if major == 1:
        hlen, off = struct.unpack("<H", b[8:10])[0], 10
    else:
        hlen, off = struct.unpack("<I", b[8:12])[0], 12
    hdr = ast.literal_eval(b[off:off + hlen].decode("latin1"))
    if hdr["descr"] != "<f4" or hdr["fortran_order"]:
        raise ValueError(f"{path}: expected C-order <f4, got {hdr}")
    data = b[off + hlen:]
    n = 1
    for d in hdr["shape"]:
        n *= d
    if len(data) != 4 * n:
        raise ValueError(f"{path}: {len(data)} data bytes for shape {hdr['shape']}")
    return tuple(hdr["shape"]), struct.unpack(f"<{n}f", data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref_json")
    ap.add_argument("ref_npy")
    ap.add_argument("got_json")
    ap.add_argument("got_npy")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    try:
        ref, got = last_json(a.ref_json), last_json(a.got_json)
        problems = []
        for k in ("prompt_ids", "output_ids", "finish_reason", "text"):
            if ref.get(k) != got.get(k):
                problems.append(f"{k}: {got.get(k)!r} != single-process {ref.get(k)!r}")
        rs, rv = read_npy_f32(a.ref_npy)
        gs, gv = read_npy_f32(a.got_npy)
        worst = 0.0
        if rs != gs:
            problems.append(f"logits shape {gs} != single-process {rs}")
        else:
            worst = max((abs(x - y) for x, y in zip(rv, gv)), default=0.0)
            if not worst <= a.tol:
                problems.append(f"logits differ by {worst:.3g} > {a.tol:g}")
    except (OSError, ValueError, KeyError) as e:
        print(f"compare: {e}")
        return 1
    if problems:
        print("compare: MISMATCH: " + "; ".join(problems))
        return 1
    print(f"compare: same output ({len(ref['output_ids'])} tokens), logits {rs} max diff {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
