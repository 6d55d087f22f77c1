#!/usr/bin/env python3
"""Derive a checkpoint whose MTP layer predicts the main model's next token well.

The fixtures' MTP layers are random: a draft is never accepted, so greedy MTP runs only
ever take the reject path and show no gain. This tool rewrites a DeepSeek-V3-style
checkpoint (HF safetensors, BF16 or FP8 block-scaled) so that every block's residual
contribution is scaled by ALPHA (the output projections: self_attn.o_proj and every
mlp ... down_proj, main layers and the MTP layer alike; FP8 weights through their
weight_scale_inv, BF16 ones by a power of two, so exactly). The main model then mostly
maps a token to a fixed successor (its embedding through the final norm and the LM head),
with the context (attention, experts) nudging it. The MTP layer is set to make the same
map from the next token: eh_proj = [I | 0] (it takes enorm(embedding) only), enorm = 1,
shared_head.norm = model.norm, shared_head.head = lm_head, its embed_tokens = the main
one. So a draft is mostly accepted and sometimes not, and every op still runs (the
engine's accept and reject paths, KV rollback, the benchmark's gain at high acceptance).
The derived weights are test data, not a model.

Usage: mtp_successor.py SRC_DIR DST_DIR [--alpha A]   (A a power of two, default 0.125)
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
from array import array


def read_shard(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    return header, data, n


def write_shard(path, header_bytes, data):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        f.write(data)


def span(header, name):
    b, e = header[name]["data_offsets"]
    return b, e


def bf16_scale(raw, alpha):
    """BF16 values times a power of two (exact unless they leave the normal range)."""
    h = array("H")
    h.frombytes(bytes(raw))
    out = array("H", bytes(len(raw)))
    for i, v in enumerate(h):
        f = struct.unpack("<f", struct.pack("<I", v << 16))[0] * alpha
        out[i] = struct.unpack("<I", struct.pack("<f", f))[0] >> 16
    return out.tobytes()


def f32_scale(raw, alpha):
    a = array("f")
    a.frombytes(bytes(raw))
    return array("f", (x * alpha for x in a)).tobytes()


def main(argv):
    ap = argparse.ArgumentParser(
        prog="mtp_successor.py",
        description="Derive a checkpoint whose MTP layer mostly drafts the main model's next "
        "token (test data; see the module's docstring).")
    ap.add_argument("src", help="checkpoint directory (config.json, safetensors, index)")
    ap.add_argument("dst", help="output directory (created; the other files are copied)")
    ap.add_argument("--alpha", type=float, default=0.125,
                    help="factor on every output projection, a power of two (default 0.125; "
                    "smaller: more drafts accepted)")
    a = ap.parse_args(argv[1:])
    alpha = a.alpha
    if not (alpha > 0 and math.frexp(alpha)[0] == 0.5):
        print("mtp_successor.py: --alpha must be a power of two, got %g" % alpha, file=sys.stderr)
        return 2
    args = [a.src, a.dst]
    src, dst = args
    cfg = json.load(open(os.path.join(src, "config.json")))
    if not cfg.get("num_nextn_predict_layers"):
        print("mtp_successor.py: %s has no MTP layer" % src, file=sys.stderr)
        return 1
    mtp = "model.layers.%d." % cfg["num_hidden_layers"]
    d = cfg["hidden_size"]
    os.makedirs(dst, exist_ok=True)
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    shards = sorted(set(index.values()))
    loaded = {s: read_shard(os.path.join(src, s)) for s in shards}

    def raw(name):
        header, data, _ = loaded[index[name]]
        b, e = span(header, name)
        return data[b:e]

    def put(name, value):
        header, data, _ = loaded[index[name]]
        b, e = span(header, name)
        if len(value) != e - b:
            raise SystemExit("mtp_successor.py: %s: %d bytes, expected %d"
                             % (name, len(value), e - b))
        data[b:e] = value

    def dtype(name):
        return loaded[index[name]][0][name]["dtype"]

    scaled = 0
    for name in list(index):
        if not (name.endswith("self_attn.o_proj.weight") or
                (".mlp." in name and name.endswith("down_proj.weight"))):
            continue
        scale = name[: -len("weight")] + "weight_scale_inv"
        if scale in index:  # FP8: the block scales carry the factor
            if dtype(scale) != "F32":
                raise SystemExit("mtp_successor.py: %s is %s, expected F32" % (scale, dtype(scale)))
            put(scale, f32_scale(raw(scale), alpha))
        elif dtype(name) == "BF16":
            put(name, bf16_scale(raw(name), alpha))
        else:
            raise SystemExit("mtp_successor.py: %s is %s without scales" % (name, dtype(name)))
        scaled += 1

    eh = mtp + "eh_proj.weight"
    if dtype(eh) != "BF16" or loaded[index[eh]][0][eh]["shape"] != [d, 2 * d]:
        raise SystemExit("mtp_successor.py: %s: expected BF16 [%d, %d]" % (eh, d, 2 * d))
    ident = array("H", bytes(2 * d * 2 * d))
    for r in range(d):
        ident[r * 2 * d + r] = 0x3F80  # 1.0 on the embedding half (columns 0..d-1)
    put(eh, ident.tobytes())
    enorm = mtp + "enorm.weight"
    one = {"BF16": struct.pack("<H", 0x3F80), "F32": struct.pack("<f", 1.0)}[dtype(enorm)]
    put(enorm, one * d)
    for to, frm in ((mtp + "shared_head.norm.weight", "model.norm.weight"),
                    (mtp + "shared_head.head.weight", "lm_head.weight"),
                    (mtp + "embed_tokens.weight", "model.embed_tokens.weight")):
        if to in index:
            if dtype(to) != dtype(frm):
                raise SystemExit("mtp_successor.py: %s is %s, %s %s"
                                 % (to, dtype(to), frm, dtype(frm)))
            put(to, raw(frm))

    for s, (header, data, n) in loaded.items():
        with open(os.path.join(src, s), "rb") as f:
            f.seek(8)
            header_bytes = f.read(n)
        write_shard(os.path.join(dst, s), header_bytes, data)
    for f in os.listdir(src):
        p = os.path.join(src, f)
        if os.path.isfile(p) and not f.endswith(".safetensors"):
            shutil.copyfile(p, os.path.join(dst, f))
    print("mtp_successor.py: %s -> %s: %d output projections x %g, MTP layer set to the "
          "successor map" % (src, dst, scaled, alpha))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
