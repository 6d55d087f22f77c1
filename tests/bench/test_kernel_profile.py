#!/usr/bin/env python3
"""bench/kernel_profile.py on a synthetic ncu CSV: per-kernel sums, shares and launch counts,
units converted, parameter lists dropped (template arguments kept), --last-step limited to
the last forward, and bad inputs refused with a message naming the problem.

Usage: test_kernel_profile.py PATH/TO/kernel_profile.py"""
import json
import os
import subprocess
import sys
import tempfile

HEAD = ['ID', 'Process ID', 'Process Name', 'Host Name', 'Kernel Name', 'Context', 'Stream',
        'Block Size', 'Grid Size', 'Device', 'CC', 'Section Name', 'Metric Name', 'Metric Unit',
        'Metric Value']


def row(i, name, unit, value, metric="gpu__time_duration.sum"):
    return [str(i), "1", "bench_model", "host", name, "1", "7", "(256, 1, 1)", "(1, 1, 1)", "0",
            "9.0", "Command line profiler metrics", metric, unit, value]


def write(path, rows, head=HEAD):
    with open(path, "w") as f:
        f.write("==PROF== Connected to process 1\n")  # ncu's own lines are not CSV rows
        for r in [head] + rows:
            f.write(",".join('"%s"' % c for c in r) + "\n")


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True)


def main():
    script = sys.argv[1]
    launches = [  # (kernel name as ncu prints it, unit, value)
        ("k_embed(WeightArgs, const int *, long, float *, int)", "us", "5.0"),
        ("void <unnamed>::k_quant_fp8<8>(const float *, long, long)", "ns", "1,500"),
        ("k_fp8_wgmma(epic_cuk_fp8_wgmma_args)", "ms", "2.5"),
        ("k_row_pick_merge(const float *, long)", "us", "3.0"),
        ("k_embed(WeightArgs, const int *, long, float *, int)", "us", "4.0"),
        ("k_fp8_wgmma(epic_cuk_fp8_wgmma_args)", "us", "1000"),
        ("void <unnamed>::k_quant_fp8<1>(const float *, long, long)", "nsecond", "2000"),
        ("k_row_pick_merge(const float *, long)", "us", "2.0"),
        ("k_copy_rows(long, long, const unsigned int *)", "us", "270"),  # after the step
    ]
    rows = [row(i, n, u, v) for i, (n, u, v) in enumerate(launches)]
    rows.insert(3, row(99, "k_other(int)", "us", "7.0", metric="dram__bytes.sum"))  # ignored
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "ncu.csv")
        write(p, rows)
        r = run(script, p)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["scope"] == "all" and s["launches"] == 9, s
        want_total = 5 + 1.5 + 2500 + 3 + 4 + 1000 + 2 + 2 + 270
        assert abs(s["total_us"] - want_total) < 1e-6, s["total_us"]
        k = {x["name"]: x for x in s["kernels"]}
        assert s["kernels"][0]["name"] == "k_fp8_wgmma", s["kernels"][0]
        assert k["k_fp8_wgmma"]["launches"] == 2 and abs(k["k_fp8_wgmma"]["us"] - 3500) < 1e-6
        assert abs(k["k_fp8_wgmma"]["share"] - round(3500 / want_total, 4)) < 1e-9
        assert "k_quant_fp8<8>" in k and "k_quant_fp8<1>" in k, list(k)  # template args kept
        assert abs(k["k_quant_fp8<8>"]["us"] - 1.5) < 1e-9 and abs(k["k_quant_fp8<1>"]["us"] - 2) < 1e-9
        assert "k_other" not in k
        r = run(script, p, "--last-step", "--top", "2")
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["scope"] == "last_step" and s["launches"] == 4, s  # embed .. pick_merge
        assert abs(s["total_us"] - (4 + 1000 + 2 + 2)) < 1e-6, s["total_us"]
        assert [x["name"] for x in s["kernels"]] == ["k_fp8_wgmma", "k_embed"], s["kernels"]
        # refusals name the problem
        bad = os.path.join(d, "bad.csv")
        write(bad, [row(0, "k_embed(int)", "furlong", "1")])
        r = run(script, bad)
        assert r.returncode != 0 and "furlong" in r.stderr, r.stderr
        write(bad, [r_[:-1] for r_ in rows], head=HEAD[:-1])
        r = run(script, bad)
        assert r.returncode != 0 and "Metric Value" in r.stderr, r.stderr
        write(bad, [row(0, "k_fp8_wgmma(int)", "us", "1")])
        r = run(script, bad, "--last-step")
        assert r.returncode != 0 and "k_embed" in r.stderr, r.stderr
        r = run(script, os.path.join(d, "missing.csv"))
        assert r.returncode != 0 and "cannot read" in r.stderr, r.stderr
    print("kernel_profile.py: sums, shares, units, names, --last-step and refusals checked")


if __name__ == "__main__":
    main()
