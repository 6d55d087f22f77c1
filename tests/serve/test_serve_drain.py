#!/usr/bin/env python3
"""SIGTERM drain of `epic serve`: admission stops (UNAVAILABLE, Health
NOT_SERVING), running streams finish completely, the process exits 0; with a
short --drain-timeout the streams still running are ended with UNAVAILABLE and
the process still exits 0.

Usage: test_serve_drain.py EPIC MODEL_DIR    (EPIC_PB_DIR: generated *_pb2.py files)
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


def collect(call, out, key):
    """Reads a stream to its end in a thread: out[key] = (ids, responses, error code)."""
    ids, resps, code = [], [], None
    try:
        for r in call:
            ids.extend(r.token_ids)
            resps.append(r)
    except grpc.RpcError as e:
        code = e.code()
    out[key] = (ids, resps, code)


def graceful():
    srv = ec.Proc(SERVE + ["--drain-timeout", "200"])
    c = ec.Client(srv.addr)
    c.wait_ready()
    # Long enough to outlast the checks below (milliseconds) with a wide margin:
    # the rate is measured on a short stream, and a machine loaded during the
    # measurement may be idle (several times faster) during the drain. At most
    # 1000 tokens: the per-token cost grows with the context, and a machine idle
    # during the measurement may be loaded during the drain, which must end
    # within --drain-timeout (a bound only, far above the expected seconds).
    n_tokens = ec.stream_tokens(c, 3.0, hi=1000)
    print("# %d tokens per stream" % n_tokens, flush=True)
    prompts = [[0, 10, 20], [0, 7], [0, 3, 4, 5]]
    calls = [c.generate_rpc(ec.request(ids=p, max_tokens=n_tokens, ignore_eos=True), timeout=300) for p in prompts]
    firsts = [next(call) for call in calls]  # every stream is running
    out = {}
    threads = [threading.Thread(target=collect, args=(call, out, i)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    srv.signal(signal.SIGTERM)
    # The loop notices the signal within 50 ms; Health says when it has.
    deadline, st = time.time() + 10, None
    while time.time() < deadline and st != ec.health_pb.HealthCheckResponse.NOT_SERVING:
        try:
            st = c.health(timeout=5)
        except grpc.RpcError:
            st = None
    T.check("health NOT_SERVING while draining", st == ec.health_pb.HealthCheckResponse.NOT_SERVING, st)
    code = det = None
    try:
        list(c.generate_rpc(ec.request(ids=[0, 1], max_tokens=4), timeout=10))
    except grpc.RpcError as e:
        code, det = e.code(), e.details()
    T.check("new request while draining: UNAVAILABLE", code == grpc.StatusCode.UNAVAILABLE
            and "draining" in (det or ""), (code, det))
    T.check("model info still answers while draining", c.info().draining)
    t_drain = time.time()
    for t in threads:
        t.join(220)
    for i, p in enumerate(prompts):
        ids, resps, err = out.get(i, ([], [], "missing"))
        ids = list(firsts[i].token_ids) + ids
        T.check("running stream %d finishes in full during the drain" % i, err is None and len(ids) == n_tokens
                and resps and resps[-1].finish_reason == ec.pb.FINISH_REASON_LENGTH, (len(ids), err))
    print("# streams drained in %.1f s" % (time.time() - t_drain), flush=True)
    rc = srv.wait(60)
    T.check("exit 0 after the drain", rc == 0, rc)
    c.close()


def timeout():
    srv = ec.Proc(SERVE + ["--drain-timeout", "0.5"])
    c = ec.Client(srv.addr)
    c.wait_ready()
    call = c.generate_rpc(ec.request(ids=[0, 10, 20], max_tokens=5000, ignore_eos=True), timeout=120)
    next(call)
    out = {}
    t = threading.Thread(target=collect, args=(call, out, 0))
    t.start()
    t0 = time.time()
    srv.signal(signal.SIGTERM)
    t.join(60)
    ids, resps, err = out.get(0, ([], [], "missing"))
    T.check("a stream outliving --drain-timeout ends UNAVAILABLE", err == grpc.StatusCode.UNAVAILABLE, err)
    rc = srv.wait(60)
    T.check("exit 0 after the drain timeout", rc == 0 and time.time() - t0 < 30, rc)
    c.close()


def idle_exit():
    srv = ec.Proc(SERVE)
    ec.Client(srv.addr).wait_ready()
    srv.signal(signal.SIGINT)
    T.check("idle server exits 0 on SIGINT", srv.wait(30) == 0)


if __name__ == "__main__":
    T.run("graceful drain", graceful)
    T.run("drain timeout", timeout)
    T.run("idle exit", idle_exit)
    sys.exit(T.finish())
