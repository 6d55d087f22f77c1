#!/usr/bin/env python3
"""`mpirun -np 2 epic serve`: rank 0 serves, rank 1 holds half of the experts
and follows rank 0's steps. Greedy streams equal the single-process
`epic generate`, concurrent streams and a cancellation work, and SIGTERM to
rank 0 drains, releases rank 1 and ends the job with exit code 0.

With BACKEND ucx the comm timeout is set to 2 s and the cluster is left idle
for longer than that before the first request: rank 0's keep-alives must stop
the followers' timed waits from firing while nothing happens.

Usage: test_serve_mpi.py EPIC MODEL_DIR MPIEXEC [BACKEND]    (EPIC_PB_DIR: generated *_pb2.py files)
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc

import epic_client as ec

EPIC, MODEL, MPIEXEC = sys.argv[1], sys.argv[2], sys.argv[3]
BACKEND = sys.argv[4] if len(sys.argv) > 4 else "mpi"
T = ec.Checks()


def solo_env():
    """The single-process reference needs none of the slow stack unwinding that
    sanitizer runs under mpirun ask for (for MPI's leak suppressions)."""
    env = dict(os.environ)
    if "ASAN_OPTIONS" in env:
        env["ASAN_OPTIONS"] = ":".join(o for o in env["ASAN_OPTIONS"].split(":")
                                       if not o.startswith("fast_unwind_on_malloc"))
    return env


def main():
    env = dict(os.environ)
    if BACKEND == "ucx":
        env["EPIC_COMM_TIMEOUT_MS"] = "2000"
    job = ec.Proc([MPIEXEC, "-np", "2", "--oversubscribe", EPIC, "serve", "--model", MODEL, "--listen",
                   "127.0.0.1:0", "--threads", "1", "--kv-cache", "32MiB", "--comm", BACKEND],
                  env=env, timeout=180)
    c = ec.Client(job.addr)
    try:
        c.wait_ready()
        if BACKEND == "ucx":
            time.sleep(5)  # idle for more than the comm timeout
        info = c.info()
        T.check("model info: 2 ranks over " + BACKEND, info.serving.ranks == 2 and info.serving.comm == BACKEND
                and info.stats.kv_pages_total == 2 * info.serving.kv_pages, info.serving)
        prompts = [[0, 10, 20], [0, 5, 9, 100, 200]]
        for p in prompts:
            ref = json.loads(subprocess.run([EPIC, "generate", "--model", MODEL, "--prompt-ids", ",".join(map(str, p)),
                                             "--max-new-tokens", "10", "--json"], check=True, capture_output=True,
                                            text=True, env=solo_env()).stdout.strip().splitlines()[-1])
            ids, text, _ = c.generate(ids=p, max_tokens=10)
            T.check("2-rank greedy equals single-process epic generate %s" % p,
                    ids == ref["output_ids"] and text == ref["text"], (ids, ref["output_ids"]))
        want = {i: c.generate(ids=[0, 3 + i, 50 + i], max_tokens=8)[0] for i in range(6)}
        got = {}

        def one(i):
            got[i] = c.generate(ids=[0, 3 + i, 50 + i], max_tokens=8)[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        T.check("2-rank concurrent streams equal their solo runs", got == want, (got, want))
        call = c.generate_rpc(ec.request(ids=[0, 10, 20], max_tokens=3000, ignore_eos=True), timeout=120)
        next(call)
        call.cancel()
        deadline = time.time() + 60  # two sanitizer-built ranks on a loaded machine
        while time.time() < deadline and (c.info().stats.kv_pages_used or c.info().stats.running):
            time.sleep(0.05)
        s = c.info().stats
        T.check("2-rank cancellation frees the KV pages", s.kv_pages_used == 0 and s.running == 0, s)
    finally:
        c.close()
        job.signal(signal.SIGTERM)  # rank 0 only: it drains and releases rank 1
        try:
            rc = job.wait(120)
        except subprocess.TimeoutExpired:
            job.kill()
            rc = "timeout"
        T.check("SIGTERM to rank 0 ends the job with exit 0", rc == 0, rc)


if __name__ == "__main__":
    T.run(BACKEND, main)
    sys.exit(T.finish())
