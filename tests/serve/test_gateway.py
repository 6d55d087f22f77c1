#!/usr/bin/env python3
"""`epic gateway` in front of two `epic serve` upstreams: forwarding (streams
equal a direct call), least-loaded routing (concurrent streams reach both),
an upstream killed mid-stream (its streams end UNAVAILABLE, nothing hangs,
later requests all succeed on the survivor), Health following the upstreams,
an upstream coming back, and a clean SIGTERM exit.

Usage: test_gateway.py EPIC MODEL_DIR    (EPIC_PB_DIR: generated *_pb2.py files)
"""
import signal
import sys
import threading
import time

import grpc

import epic_client as ec

EPIC, MODEL = sys.argv[1], sys.argv[2]
T = ec.Checks()
SERVE = [EPIC, "serve", "--model", MODEL, "--threads", "1", "--kv-cache", "32MiB"]
H = ec.health_pb.HealthCheckResponse


def wait_until(pred, timeout=60.0):
    # Generous: returns as soon as pred holds (sanitizer builds, loaded machines).
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    return False


def restart(argv, tries=20):
    """Starts a server on the address a killed one had. Meanwhile another test's
    outgoing connection may have drawn that port as its ephemeral port (tests
    run in parallel): such a connection is short, so retry for a while."""
    for i in range(tries):
        try:
            return ec.Proc(argv)
        except RuntimeError as e:
            if i == tries - 1:
                raise
            print("# restart on the same address failed, retrying: %s" % e, flush=True)
            time.sleep(1)


def run_stream(c, rq, out, key):
    ids, code = [], None
    try:
        for r in c.generate_rpc(rq, timeout=300):
            ids.extend(r.token_ids)
    except grpc.RpcError as e:
        code = e.code()
    out[key] = (ids, code)


def main():
    ups = [ec.Proc(SERVE + ["--listen", "127.0.0.1:0"]) for _ in range(2)]
    direct = [ec.Client(u.addr) for u in ups]
    for d in direct:
        d.wait_ready()
    gw = ec.Proc([EPIC, "gateway", "--listen", "127.0.0.1:0", "--upstream", "%s,%s" % (ups[0].addr, ups[1].addr),
                  "--health-interval", "0.2", "--health-timeout", "1"])
    c = ec.Client(gw.addr)
    try:
        c.wait_ready()
        T.check("gateway health SERVING", c.health() == H.SERVING)
        forwarding(c, direct)
        routing_and_failover(c, ups, direct)
    finally:
        c.close()
        for u in ups:
            u.kill()
        gw.signal(signal.SIGTERM)
        T.check("gateway exits 0 after SIGTERM", gw.wait(30) == 0)


def forwarding(c, direct):
    want, want_text, _ = direct[0].generate(ids=[0, 10, 20], max_tokens=12)
    ids, text, resps = c.generate(ids=[0, 10, 20], max_tokens=12)
    T.check("stream through the gateway equals a direct one", ids == want and text == want_text
            and resps[-1].usage.completion_tokens == len(want), (ids, want))
    r = c.tokenize_rpc(ec.pb.TokenizeRequest(prompt=ec.pb.Prompt(text="Hello world")), timeout=10)
    T.check("tokenize through the gateway", len(r.ids) > 1 and r.ids[0] == 0, r)
    info = c.info()
    T.check("model info through the gateway names the upstream", info.served_by in (direct[0].addr, direct[1].addr)
            and info.config.vocab_size == 1280, info.served_by)
    code = None
    try:
        list(c.generate_rpc(ec.request(ids=[0], max_tokens=0), timeout=10))
    except grpc.RpcError as e:
        code, det = e.code(), e.details()
    T.check("upstream errors pass through unchanged", code == grpc.StatusCode.INVALID_ARGUMENT
            and "sampling.max_tokens" in det, code)
    code = None
    try:
        list(c.generate_rpc(ec.request(ids=[0, 10, 20], max_tokens=3000, ignore_eos=True), timeout=0.3))
    except grpc.RpcError as e:
        code = e.code()
    T.check("deadline propagates through the gateway", code == grpc.StatusCode.DEADLINE_EXCEEDED, code)
    T.check("the upstream freed the deadlined sequence", wait_until(
        lambda: all(d.info().stats.running == 0 and d.info().stats.kv_pages_used == 0 for d in direct)))


def routing_and_failover(c, ups, direct):
    before = [d.info().stats.finished for d in direct]
    prompts = [[0, 10 + i, 20] for i in range(8)]
    want = {i: direct[1].generate(ids=p, max_tokens=8)[0] for i, p in enumerate(prompts)}
    # Endless streams (cancelled below): least-loaded routing must spread them
    # over both upstreams; then the first upstream dies under them.
    progress = {}
    calls = [c.generate_rpc(ec.request(ids=p, max_tokens=4000, ignore_eos=True), timeout=300) for p in prompts]
    out = {}

    def read(i):
        progress[i] = 0
        try:
            for r in calls[i]:
                progress[i] += len(r.token_ids)
            out[i] = None
        except grpc.RpcError as e:
            out[i] = e.code()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    spread = wait_until(lambda: all(d.info().stats.active_streams >= 3 for d in direct)
                        and all(progress.get(i, 0) > 0 for i in range(len(prompts))), 60)
    on_a = direct[0].info().stats.active_streams
    T.check("least-loaded routing: concurrent streams on both upstreams", spread and on_a + direct[1].info().stats
            .active_streams == len(prompts), [d.info().stats.active_streams for d in direct])
    ups[0].p.kill()  # SIGKILL the first upstream mid-stream
    ups[0].p.wait()
    T.check("streams on the killed upstream end UNAVAILABLE",
            wait_until(lambda: sum(1 for v in out.values() if v == grpc.StatusCode.UNAVAILABLE) == on_a, 60),
            out)
    alive = [i for i in range(len(prompts)) if i not in out]
    seen = {i: progress[i] for i in alive}
    T.check("streams on the survivor keep streaming", len(alive) == len(prompts) - on_a and wait_until(
        lambda: all(progress[i] > seen[i] for i in alive), 60), (seen, progress))
    for i in alive:
        calls[i].cancel()
    for t in threads:
        t.join(60)
    T.check("no stream hangs", all(not t.is_alive() for t in threads))
    T.check("the survivor frees the cancelled streams", wait_until(
        lambda: direct[1].info().stats.running == 0 and direct[1].info().stats.kv_pages_used == 0, 30))
    T.check("gateway health SERVING with one upstream", c.health() == H.SERVING)
    # Every new request succeeds on the survivor, also right after the kill
    # (a failure before the first token is retried on the other upstream).
    res = {}
    threads = [threading.Thread(target=run_stream, args=(c, ec.request(ids=p, max_tokens=8), res, i))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    T.check("after the kill every request succeeds, none lost or mixed up",
            all(res.get(i, (None, "hung")) == (want[i], None) for i in range(len(prompts))), res)
    T.check("model info served by the survivor", c.info().served_by == direct[1].addr)
    T.check("both upstreams served requests", direct[1].info().stats.finished > before[1] + len(prompts))

    # Both down: NOT_SERVING and UNAVAILABLE.
    port = ups[1].addr
    ups[1].p.kill()
    ups[1].p.wait()
    T.check("gateway health NOT_SERVING with no upstream", wait_until(lambda: c.health() == H.NOT_SERVING))
    code = None
    try:
        list(c.generate_rpc(ec.request(ids=[0, 1], max_tokens=4), timeout=10))
    except grpc.RpcError as e:
        code = e.code()
    T.check("no healthy upstream: UNAVAILABLE", code == grpc.StatusCode.UNAVAILABLE, code)

    # An upstream that comes back (same address) is used again.
    ups[1] = restart(SERVE + ["--listen", port])
    T.check("a restarted upstream is healthy again", wait_until(lambda: c.health() == H.SERVING))
    ids, _, _ = c.generate(ids=prompts[0], max_tokens=8)
    T.check("requests flow to the restarted upstream", ids == want[0], ids)

    # Retry: with health checks far apart, an upstream that died unnoticed gets
    # calls; each fails before its first token and is retried on the other.
    extra = ec.Proc(SERVE + ["--listen", "127.0.0.1:0"])
    gw2 = ec.Proc([EPIC, "gateway", "--listen", "127.0.0.1:0", "--upstream", "%s,%s" % (extra.addr, ups[1].addr),
                   "--health-interval", "600"])
    c2 = ec.Client(gw2.addr)
    try:
        c2.wait_ready()
        extra.p.kill()
        extra.p.wait()
        res = [c2.generate(ids=p, max_tokens=8)[0] for p in prompts[:4]]
        T.check("calls to an unnoticed dead upstream are retried on the other", res == [want[i] for i in range(4)],
                res)
    finally:
        c2.close()
        extra.kill()
        gw2.signal(signal.SIGTERM)
        T.check("second gateway exits 0", gw2.wait(30) == 0)


if __name__ == "__main__":
    T.run("gateway", main)
    sys.exit(T.finish())
