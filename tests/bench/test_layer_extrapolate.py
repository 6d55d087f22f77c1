#!/usr/bin/env python3
"""bench/layer_extrapolate.py on synthetic gpu_model_bench.sh summaries: the per-MoE-layer
cost is the step difference over the layer difference, the 61-layer step is the first run
plus the remaining layers at that cost, both sides alike; with several runs per layer count
each quantity is their median; bad inputs are refused with a message naming the problem.

Usage: test_layer_extrapolate.py PATH/TO/layer_extrapolate.py"""
import json
import os
import random
import subprocess
import sys
import tempfile


def summary(layers, points):
    """A summary.json as gpu_model_bench.sh writes it, reduced to what the script reads.
    points: (batch, ctx, epic step ms, torch step ms, epic prefill tok/s, torch prefill tok/s)."""
    rows = []
    for b, c, es, ts, ep, tp in points:
        rows.append({"batch": b, "ctx": c,
                     "epic": {"decode_step_ms_p50": es, "prefill_tokens_per_s": ep},
                     "torch": {"decode_tokens_per_s_p50": b / (ts / 1e3), "prefill_tokens_per_s": tp}})
    return {"bench": "gpu_model", "device": "synthetic", "layers": layers, "baseline": {}, "points": rows}


def run(script, *dirs):
    return subprocess.run([sys.executable, script, *dirs], capture_output=True, text=True)


def close(a, b, tol=1e-3):
    return abs(a - b) <= tol * max(1.0, abs(b))


def main():
    script = sys.argv[1]
    rnd = random.Random(int(os.environ.get("EPIC_TEST_SEED", "7")))
    k1, k2 = 4, 4 + rnd.randint(1, 3)
    pts1, pts2, want = [], [], {}
    for b in (1, 32, 128):
        es1, ts1 = rnd.uniform(1, 8), rnd.uniform(5, 90)
        e_layer, t_layer = rnd.uniform(0.2, 5), rnd.uniform(1, 25)
        ep1, tp1 = rnd.uniform(2e4, 9e4), rnd.uniform(2e4, 9e4)
        e_tok, t_tok = rnd.uniform(1e-6, 5e-6), rnd.uniform(1e-6, 5e-6)  # s per token per layer
        pts1.append((b, 1024, es1, ts1, ep1, tp1))
        pts2.append((b, 1024, es1 + (k2 - k1) * e_layer, ts1 + (k2 - k1) * t_layer,
                     1 / (1 / ep1 + (k2 - k1) * e_tok), 1 / (1 / tp1 + (k2 - k1) * t_tok)))
        e61, t61 = es1 + (61 - k1) * e_layer, ts1 + (61 - k1) * t_layer
        p_e61, p_t61 = 1 / ep1 + (61 - k1) * e_tok, 1 / tp1 + (61 - k1) * t_tok
        want[b] = {"e_layer": e_layer, "t_layer": t_layer, "e61": e61, "t61": t61,
                   "tps61": b / (e61 / 1e3), "dec61": t61 / e61, "pre61": p_t61 / p_e61}
    pts2.append((512, 1024, 1, 1, 1, 1))  # only in the second run: left out

    def check(res):
        assert [p["batch"] for p in res["points"]] == [1, 32, 128], res["points"]
        for p in res["points"]:
            w = want[p["batch"]]
            ed, td, q = p["epic_decode"], p["torch_decode"], p["ratio_epic_over_torch"]
            checks = [(ed["step_ms_per_moe_layer"], w["e_layer"]), (td["step_ms_per_moe_layer"], w["t_layer"]),
                      (ed["step_ms_61_layers"], w["e61"]), (td["step_ms_61_layers"], w["t61"]),
                      (ed["tokens_per_s_61_layers"], w["tps61"]), (q["decode_61_layers"], w["dec61"]),
                      (q["prefill_61_layers"], w["pre61"])]
            for got, exp in checks:
                assert close(got, exp), (p["batch"], got, exp)

    def scaled(pts, f):  # every time f times longer (rates f times lower)
        return [(b, c, es * f, ts * f, ep / f, tp / f) for b, c, es, ts, ep, tp in pts]

    with tempfile.TemporaryDirectory() as d:
        a, b = os.path.join(d, "a"), os.path.join(d, "b")
        os.mkdir(a)
        os.mkdir(b)
        json.dump(summary(k1, pts1), open(os.path.join(a, "summary.json"), "w"))
        json.dump(summary(k2, pts2), open(os.path.join(b, "summary.json"), "w"))
        r = run(script, a, b)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["layers"] == [k1, k2] and res["runs"] == [1, 1], (res["layers"], res["runs"])
        check(res)
        print("ok - per-layer cost and 61-layer extrapolation for %d points (K %d and %d)" % (3, k1, k2))
        # three runs per layer count, one 3% slower and one 4% faster than the above: the
        # medians are the first runs' values, so the results are too
        dirs = {}
        for name, k, pts in (("a", k1, pts1), ("b", k2, pts2)):
            dirs[name] = [os.path.join(d, name)]
            for i, f in enumerate((1.03, 0.96)):
                p = os.path.join(d, "%s%d" % (name, i))
                os.mkdir(p)
                json.dump(summary(k, scaled(pts, f)), open(os.path.join(p, "summary.json"), "w"))
                dirs[name].append(p)
        r = run(script, ",".join(dirs["a"]), ",".join(dirs["b"]))
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["runs"] == [3, 3], res["runs"]
        check(res)
        print("ok - three runs per layer count: medians")
        r = run(script, ",".join([a, b]), b)
        assert r.returncode != 0 and "differ in layer count" in r.stderr, r.stderr
        print("ok - runs of two layer counts on one side refused")
        r = run(script, b, a)
        assert r.returncode != 0 and "more layers" in r.stderr, r.stderr
        print("ok - runs in the wrong order refused")
        r = run(script, a, os.path.join(d, "missing"))
        assert r.returncode != 0 and "summary.json" in r.stderr, r.stderr
        print("ok - a missing summary named")


if __name__ == "__main__":
    main()
