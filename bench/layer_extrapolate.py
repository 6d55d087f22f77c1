#!/usr/bin/env python3
"""Per-layer cost and 61-layer extrapolation from two gpu_model_bench.sh runs (issue #7).

A K-layer cut of the DeepSeek-V3 config is 3 dense layers, K - 3 MoE layers and the
embedding / LM head. Scaling a K-layer step by 61 / K (bench_model's
decode_step_ms_61_layers_linear) also scales the LM head and the dense layers, which a
small K over-represents. Here two runs that differ only in the layer count (K1 < K2, both
above first_k_dense_replace, so the extra layers are MoE layers) give, for EPIC and for the
PyTorch baseline alike:

  per MoE layer = (step(K2) - step(K1)) / (K2 - K1)
  step(61)      = step(K1) + (61 - K1) x per MoE layer

for the p50 decode step (decode tokens/s = batch / step) and for prefill time per token.
The ratio EPIC / baseline is then taken at 61 layers and per MoE layer.

Usage: layer_extrapolate.py OUT_K1 OUT_K2 [--layers-total 61]
  OUT_K*: the OUT directories of two bench/gpu_model_bench.sh runs (their summary.json),
  or of several runs each, comma-separated (e.g. the script repeated in one command: a
  point's step times are the median over the runs that measured it, on each side and at
  each layer count; "runs" says how many there were). Step times move by a few percent
  between runs, and a ratio near a target wants more than one.
Prints one JSON object (and a table on stderr).
"""
import argparse
import json
import statistics
import os
import sys


def load(out_dir):
    path = os.path.join(out_dir, "summary.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"layer_extrapolate: cannot read {path}: {e}")


def steps(row):
    """(epic decode step s, torch decode step s, epic prefill s/token, torch prefill s/token)."""
    b = row["batch"]
    e, t = row["epic"], row["torch"]
    ed = e.get("decode_step_ms_p50")
    td = t.get("decode_tokens_per_s_p50")
    ep, tp = e.get("prefill_tokens_per_s"), t.get("prefill_tokens_per_s")
    return (ed / 1e3 if ed else None, b / td if td else None, 1 / ep if ep else None,
            1 / tp if tp else None)


def load_runs(arg):
    """The summaries of the comma-separated OUT directories in arg, one layer count."""
    runs = [load(d) for d in arg.split(",") if d]
    if not runs:
        sys.exit(f"layer_extrapolate: no OUT directory in {arg!r}")
    if len({r["layers"] for r in runs}) != 1:
        sys.exit(f"layer_extrapolate: the runs {arg} differ in layer count")
    return runs


def median_steps(runs, key):
    """steps() of point key, each quantity the median over the runs that measured it."""
    got = [steps(r) for s in runs for r in s["points"] if (r["batch"], r["ctx"]) == key]
    if not got:
        return None
    return tuple(statistics.median(v) if v else None
                 for v in ([x[i] for x in got if x[i] is not None] for i in range(4)))


def extrapolate(v1, v2, k1, k2, total):
    if v1 is None or v2 is None:
        return None, None
    per = (v2 - v1) / (k2 - k1)
    return per, v1 + (total - k1) * per


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_k1")
    ap.add_argument("out_k2")
    ap.add_argument("--layers-total", type=int, default=61)
    a = ap.parse_args()
    runs1, runs2 = load_runs(a.out_k1), load_runs(a.out_k2)
    s1 = runs1[0]
    k1, k2 = s1["layers"], runs2[0]["layers"]
    if k2 <= k1:
        sys.exit(f"layer_extrapolate: the second run must have more layers ({k1} vs {k2})")
    keys = []  # the first runs' points, in their order
    for s in runs1:
        for r in s["points"]:
            if (r["batch"], r["ctx"]) not in keys:
                keys.append((r["batch"], r["ctx"]))
    rows = []
    for key in keys:
        a1, a2 = median_steps(runs1, key), median_steps(runs2, key)
        if not a2:
            continue
        out = {"batch": key[0], "ctx": key[1]}
        for i, name in enumerate(("epic_decode", "torch_decode", "epic_prefill", "torch_prefill")):
            per, full = extrapolate(a1[i], a2[i], k1, k2, a.layers_total)
            unit = "step_ms" if "decode" in name else "us_per_token"
            scale = 1e3 if "decode" in name else 1e6
            out[name] = {
                f"{unit}_k{k1}": a1[i] and round(a1[i] * scale, 4),
                f"{unit}_k{k2}": a2[i] and round(a2[i] * scale, 4),
                f"{unit}_per_moe_layer": per and round(per * scale, 4),
                f"{unit}_{a.layers_total}_layers": full and round(full * scale, 4),
                "tokens_per_s_%d_layers" % a.layers_total:
                    full and round((key[0] if "decode" in name else 1) / full, 2),
            }
        ed, td = out["epic_decode"], out["torch_decode"]
        ep, tp = out["epic_prefill"], out["torch_prefill"]
        ratio = lambda x, y: round(y / x, 3) if x and y and x > 0 and y > 0 else None
        out["ratio_epic_over_torch"] = {
            "decode_%d_layers" % a.layers_total: ratio(ed[f"step_ms_{a.layers_total}_layers"],
                                                       td[f"step_ms_{a.layers_total}_layers"]),
            "decode_per_moe_layer": ratio(ed["step_ms_per_moe_layer"], td["step_ms_per_moe_layer"]),
            f"decode_k{k1}": ratio(ed[f"step_ms_k{k1}"], td[f"step_ms_k{k1}"]),
            "prefill_%d_layers" % a.layers_total: ratio(ep[f"us_per_token_{a.layers_total}_layers"],
                                                        tp[f"us_per_token_{a.layers_total}_layers"]),
        }
        rows.append(out)
    res = {"bench": "gpu_model_layers", "device": s1.get("device"), "layers": [k1, k2],
           "layers_total": a.layers_total, "baseline": s1.get("baseline"),
           "runs": [len(runs1), len(runs2)],
           "method": "per MoE layer = (step(K2) - step(K1)) / (K2 - K1); "
                     "step(total) = step(K1) + (total - K1) * per MoE layer; both sides alike",
           "points": rows}
    n = a.layers_total
    print(f"{'B':>5} {'ctx':>6} | {'epic ms/layer':>13} {'torch ms/layer':>14} | "
          f"{'epic dec@%d' % n:>11} {'torch dec@%d' % n:>12} {'ratio':>6} | {'prefill ratio':>13}",
          file=sys.stderr)
    for r in rows:
        ed, td, q = r["epic_decode"], r["torch_decode"], r["ratio_epic_over_torch"]
        f = lambda v: "-" if v is None else f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
        print(f"{r['batch']:>5} {r['ctx']:>6} | {f(ed['step_ms_per_moe_layer']):>13} "
              f"{f(td['step_ms_per_moe_layer']):>14} | {f(ed['tokens_per_s_%d_layers' % n]):>11} "
              f"{f(td['tokens_per_s_%d_layers' % n]):>12} {f(q['decode_%d_layers' % n]):>6} | "
              f"{f(q['prefill_%d_layers' % n]):>13}", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
