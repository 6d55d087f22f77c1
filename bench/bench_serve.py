#!/usr/bin/python3
"""Serving benchmark: requests/s, tokens/s, TTFT and TPOT (p50/p99) of Generate
streams at several concurrencies, through `epic serve` directly and through
`epic gateway` in front of it, against the in-process engine running the same
workload in the same run (build/bench/bench_serve). Prints one JSON object;
the *_overhead_ratio fields are gRPC tokens/s divided by in-process tokens/s
(1.0 = no overhead).

The client is Python (grpc.aio from Debian's python3-grpcio, messages generated
from proto/ with protoc into a temporary directory), sharing the machine with
the server: on a small machine the ratio is a lower bound of what the server
itself achieves.

usage: bench/bench_serve.py --epic build/coordinator/epic --engine-bench build/bench/bench_serve
                            --model ../shared/fixtures/tiny-bf16 [--concurrency 1,16,64]
                            [--prompt-len 16] [--max-tokens 32] [--threads N] [--rounds 3] [--no-gateway]
"""
import argparse
import asyncio
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATE = "/epic.v1.Inference/Generate"


def gen_messages(tmp):
    proto = os.path.join(HERE, "..", "proto")
    subprocess.run(["protoc", "--python_out=" + tmp, "-I" + proto, os.path.join(proto, "epic/v1/inference.proto")],
                   check=True)
    sys.path.insert(0, tmp)
    return importlib.import_module("epic.v1.inference_pb2")


def prompt(i, length, vocab):
    # The same ids as bench_serve.c's make_prompt.
    return [0] + [(i * 7 + k * 13) % (vocab - 2) + 2 for k in range(1, length)]


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, max(0, int(p * (len(xs) - 1) + 0.5)))]


def start(argv):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("%s did not start" % argv[:2])
        m = re.search(r"listening on \S+:(\d+)", line)
        if m:
            return p, "127.0.0.1:" + m.group(1)


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()


async def drive(pb, addr, conc, n, args, vocab):
    ser = lambda m: m.SerializeToString()
    async with grpc.aio.insecure_channel(addr) as ch:
        rpc = ch.unary_stream(GENERATE, request_serializer=ser, response_deserializer=pb.GenerateResponse.FromString)
        reqs = [pb.GenerateRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prompt(i, args.prompt_len, vocab))),
                                   sampling=pb.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
                for i in range(n)]
        # Warm the connection (and the server's first-request paths) up.
        async for _ in rpc(reqs[0]):
            pass
        ttft, tpot, bad = [], [], 0
        todo = list(range(n))

        async def worker():
            nonlocal bad
            while todo:
                i = todo.pop()
                t0 = time.perf_counter()
                first = last = None
                got = 0
                async for r in rpc(reqs[i], timeout=600):
                    if r.token_ids:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        got += len(r.token_ids)
                if got != args.max_tokens:
                    bad += 1
                    continue
                ttft.append(first - t0)
                tpot.append((last - first) / (got - 1))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        wall = time.perf_counter() - t0
    done = len(ttft)
    return {"concurrency": conc, "completed": done, "failed": bad, "wall_s": round(wall, 4),
            "requests_per_s": round(done / wall, 3), "tokens_per_s": round(done * args.max_tokens / wall, 1),
            "ttft_ms_p50": round(1e3 * pct(ttft, 0.5), 3), "ttft_ms_p99": round(1e3 * pct(ttft, 0.99), 3),
            "tpot_ms_p50": round(1e3 * pct(tpot, 0.5), 3), "tpot_ms_p99": round(1e3 * pct(tpot, 0.99), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epic", required=True)
    ap.add_argument("--engine-bench", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument("--no-gateway", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode; the best counts")
    args = ap.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    tmp = tempfile.mkdtemp(prefix="epic-bench-serve-")
    pb = gen_messages(tmp)
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    serve_argv = [args.epic, "serve", "--model", args.model, "--listen", "127.0.0.1:0", "--kv-cache",
                  "%dMiB" % args.kv_cache_mib, "--max-batch", str(max(concs)), "--max-queue", str(max(concs) + 1)]
    if args.threads:
        serve_argv += ["--threads", str(args.threads)]
    out = {"bench": "serve", "model": args.model, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
           "client": "python grpc.aio %s" % grpc.__version__, "cpus": os.cpu_count(),
           "load_avg_1m": round(os.getloadavg()[0], 2), "rounds": args.rounds, "results": []}
    for conc in concs:
        n = max(16, 4 * conc)
        eng_argv = [args.engine_bench, "--model", args.model, "--concurrency", str(conc), "--requests", str(n),
                    "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
                    "--kv-cache-mib", str(args.kv_cache_mib)]
        if args.threads:
            eng_argv += ["--threads", str(args.threads)]
        srv, addr = start(serve_argv)
        gw, gaddr = (None, None) if args.no_gateway else start(
            [args.epic, "gateway", "--listen", "127.0.0.1:0", "--upstream", addr])
        best = {}
        try:
            # Interleaved rounds, best of each: a shared machine's load drifts
            # over seconds, and every mode gets the same chances.
            for _ in range(args.rounds):
                runs = {"engine": lambda: json.loads(subprocess.run(
                            eng_argv, check=True, capture_output=True, text=True).stdout)["results"][0],
                        "serve": lambda: asyncio.run(drive(pb, addr, conc, n, args, vocab))}
                if gw:
                    runs["gateway"] = lambda: asyncio.run(drive(pb, gaddr, conc, n, args, vocab))
                for mode, fn in runs.items():
                    r = fn()
                    if r["failed"] == 0 and (mode not in best or r["tokens_per_s"] > best[mode]["tokens_per_s"]):
                        best[mode] = r
        finally:
            if gw:
                stop(gw)
            stop(srv)
        row = {"concurrency": conc, "requests": n, **best}
        for mode in ("serve", "gateway"):
            if mode in best and "engine" in best:
                row[mode + "_overhead_ratio"] = round(best[mode]["tokens_per_s"] / best["engine"]["tokens_per_s"], 3)
        out["results"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
