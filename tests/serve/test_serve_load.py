#!/usr/bin/env python3
"""Load: 72 concurrent Generate streams (different prompts, lengths, greedy and
seeded sampling, some with stop strings) straight to `epic serve`, then the same
through `epic gateway` over two upstreams. Every stream must come back complete
and equal to the same request run alone (continuous batching may not change or
mix up anyone's tokens), and the engines must end idle with no KV pages held.

Usage: test_serve_load.py EPIC MODEL_DIR    (EPIC_PB_DIR: generated *_pb2.py files)
"""
import signal
import sys
import threading
import time

import grpc

import epic_client as ec

EPIC, MODEL = sys.argv[1], sys.argv[2]
T = ec.Checks()
SERVE = [EPIC, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", "--threads", "1", "--kv-cache", "32MiB"]
N = 72
DISTINCT = 24  # each request three times: the references cost a third


def requests():
    out = []
    for j in range(N):
        i = j % DISTINCT
        prompt = [0] + [(7 * i + 13 * k) % 1200 + 2 for k in range(1 + i % 9)]
        kw = dict(ids=prompt, max_tokens=6 + i % 19, request_id="load-%d" % j)
        if i % 2:
            kw.update(temperature=0.7 + 0.01 * (i % 5), top_p=0.95, top_k=40, seed=1000 + i)
        if i % 3 == 0:
            kw.update(ignore_eos=True)
        if i % 5 == 0:
            kw.update(stop=["e", "\n"])
        out.append(kw)
    return out


def run_all(c, reqs):
    """All requests at once, one thread each: {i: (ids, text, finish, usage, error)}."""
    out = {}
    start = threading.Barrier(len(reqs))

    def one(i, kw):
        start.wait()
        try:
            ids, text, resps = c.generate(timeout=300, **kw)
            out[i] = (ids, text, resps[-1].finish_reason, resps[-1].usage.completion_tokens, None)
        except grpc.RpcError as e:
            out[i] = (None, None, None, None, e.code())

    threads = [threading.Thread(target=one, args=(i, kw)) for i, kw in enumerate(reqs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return out


def compare(name, got, want):
    lost = [i for i in range(N) if i not in got or got[i][4] is not None]
    wrong = [i for i in range(N) if i in got and got[i][4] is None and got[i][:3] != want[i][:3]]
    counts = [i for i in range(N) if i in got and got[i][4] is None and got[i][3] != len(got[i][0])]
    T.check("%s: %d concurrent streams, none lost" % (name, N), not lost, [(i, got.get(i)) for i in lost[:5]])
    T.check("%s: every stream equals its request run alone" % name, not wrong,
            [(i, got[i][0], want[i][0]) for i in wrong[:5]])
    T.check("%s: usage counts match the streamed tokens" % name, not counts, counts[:5])


def idle(c):
    s = c.info().stats
    return s.running == 0 and s.queued == 0 and s.kv_pages_used == 0 and s.active_streams == 0


def main():
    reqs = requests()
    ups = [ec.Proc(SERVE) for _ in range(2)]
    direct = [ec.Client(u.addr) for u in ups]
    gw = None
    try:
        for d in direct:
            d.wait_ready()
        want = {}
        for i, kw in enumerate(reqs[:DISTINCT]):
            ids, text, resps = direct[0].generate(**kw)
            want[i] = (ids, text, resps[-1].finish_reason, len(ids), None)
        want = {j: want[j % DISTINCT] for j in range(N)}
        t0 = time.time()
        got = run_all(direct[0], reqs)
        dt = time.time() - t0
        compare("serve", got, want)
        peak = direct[0].info().stats
        T.check("engine idle afterwards, no KV pages held", idle(direct[0]), peak)
        print("# %d streams, %d tokens in %.2fs" % (N, sum(len(w[0]) for w in want.values()), dt), flush=True)

        gw = ec.Proc([EPIC, "gateway", "--listen", "127.0.0.1:0", "--upstream", "%s,%s" % (ups[0].addr, ups[1].addr)])
        g = ec.Client(gw.addr)
        g.wait_ready()
        before = [d.info().stats.finished for d in direct]
        got = run_all(g, reqs)
        compare("gateway", got, want)
        after = [d.info().stats.finished for d in direct]
        T.check("gateway spread the load over both upstreams",
                all(a > b for a, b in zip(after, before)) and sum(after) - sum(before) == N, (before, after))
        T.check("both upstreams idle afterwards", all(idle(d) for d in direct))
        g.close()
    finally:
        for d in direct:
            d.close()
        if gw:
            gw.signal(signal.SIGTERM)
            T.check("gateway exits 0", gw.wait(30) == 0)
        for u in ups:
            u.signal(signal.SIGTERM)
            T.check("server exits 0", u.wait(60) == 0)


if __name__ == "__main__":
    T.run("load", main)
    sys.exit(T.finish())
