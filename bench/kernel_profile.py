#!/usr/bin/env python3
"""Where a model step's GPU time goes: an ncu kernel list summed per kernel (issue #7).

Reads the CSV that `ncu --csv --metrics gpu__time_duration.sum` prints (bench/kernel_profile.sh
runs it over bench_model) and prints one JSON object: the total kernel time and, per kernel
name (template arguments kept, parameter lists dropped), its launches, microseconds and
share, largest first. With --last-step only the launches of the last forward count: from
the last launch of the marker kernel (the embedding, which starts every forward) to the
last launch of the end kernel (the greedy pick, which ends it); bench_model's last forward
is a decode step.

ncu times every kernel alone with its caches flushed (its default --cache-control all), so
memory-bound kernels read slower than inside a step; the shares say where the time goes,
not what a step takes (bench_model's decode_step_ms does).

Usage: kernel_profile.py NCU_CSV [--last-step] [--top N] [--marker NAME] [--end NAME]
"""
import argparse
import csv
import json
import re
import sys

# to microseconds; ncu versions spell them either way
UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
         "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}


def fail(msg):
    print("kernel_profile: " + msg, file=sys.stderr)
    sys.exit(1)


def short_name(name):
    """The kernel's name without its parameter list and the anonymous-namespace prefix."""
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    name = re.sub(r"^void ", "", name)
    return name.replace("(anonymous namespace)::", "").replace("<unnamed>::", "").strip()


def read_launches(path):
    """[(kernel name, microseconds)] in launch order."""
    try:
        with open(path, newline="") as f:
            lines = [l for l in f if l.startswith('"')]  # ncu's own messages are not quoted
    except OSError as e:
        fail("cannot read %s: %s" % (path, e.strerror))
    rows = list(csv.reader(lines))
    if not rows:
        fail("%s holds no ncu CSV rows (was ncu run with --csv?)" % path)
    head = rows[0]
    need = ["Kernel Name", "Metric Name", "Metric Unit", "Metric Value"]
    missing = [c for c in need if c not in head]
    if missing:
        fail("%s: no column %s in the CSV header" % (path, ", ".join(missing)))
    ki, mi, ui, vi = (head.index(c) for c in need)
    out = []
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(head):
            fail("%s: CSV row %d has %d fields, the header %d" % (path, n, len(r), len(head)))
        if r[mi] != "gpu__time_duration.sum":
            continue
        if r[ui] not in UNITS:
            fail("%s: row %d: unit %r of gpu__time_duration.sum not known" % (path, n, r[ui]))
        try:
            v = float(r[vi].replace(",", ""))
        except ValueError:
            fail("%s: row %d: metric value %r is not a number" % (path, n, r[vi]))
        out.append((short_name(r[ki]), v * UNITS[r[ui]]))
    if not out:
        fail("%s: no gpu__time_duration.sum rows (run ncu with --metrics gpu__time_duration.sum)"
             % path)
    return out


def last_step(launches, marker, end):
    starts = [i for i, (n, _) in enumerate(launches) if n.startswith(marker)]
    if not starts:
        fail("--last-step: no launch of the marker kernel %r" % marker)
    step = launches[starts[-1]:]
    ends = [i for i, (n, _) in enumerate(step) if n.startswith(end)]
    if not ends:
        fail("--last-step: no launch of the end kernel %r after the last %r" % (end, marker))
    return step[:ends[-1] + 1]


def summarise(launches, top):
    total = sum(v for _, v in launches)
    per, calls = {}, {}
    for n, v in launches:
        per[n] = per.get(n, 0.0) + v
        calls[n] = calls.get(n, 0) + 1
    ranked = sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))
    return {"launches": len(launches), "total_us": round(total, 3),
            "kernels": [{"name": n, "launches": calls[n], "us": round(v, 3),
                         "share": round(v / total, 4) if total > 0 else 0.0}
                        for n, v in ranked[:top]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="the output of ncu --csv --metrics gpu__time_duration.sum")
    ap.add_argument("--last-step", action="store_true", help="only the last forward's launches")
    ap.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    ap.add_argument("--marker", default="k_embed", help="first kernel of a forward")
    ap.add_argument("--end", default="k_row_pick_merge", help="last kernel of a forward")
    a = ap.parse_args()
    if a.top < 1:
        fail("--top must be at least 1")
    launches = read_launches(a.csv)
    if a.last_step:
        launches = last_step(launches, a.marker, a.end)
    s = summarise(launches, a.top)
    s = {"bench": "kernel_profile", "source": a.csv, "scope": "last_step" if a.last_step else "all",
         **s}
    print(json.dumps(s, indent=1))
    for k in s["kernels"]:
        print("%10.1f us %5.1f%% %6d  %s" % (k["us"], 100 * k["share"], k["launches"], k["name"]),
              file=sys.stderr)


if __name__ == "__main__":
    main()
