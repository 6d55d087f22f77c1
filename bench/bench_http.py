#!/usr/bin/python3
"""HTTP (OpenAI API) versus gRPC serving overhead, measured in the same run.

One `epic serve` is started with both fronts (--listen for gRPC, --http for the
OpenAI-compatible API) on the same engine, and the same workloads are sent to
each front in alternating rounds, so both see the same machine state:

  per request  a request with max_tokens=1 (gRPC Generate, stream collected;
               HTTP POST /v1/completions with a token-id prompt, stream false):
               end-to-end latency p50/p90/p99 and requests/s;
  per token    streaming requests with max_tokens=64 and ignore_eos (gRPC
               Generate; HTTP server-sent events, stream true): inter-token
               interval p50/p90, time per output token (TPOT) p50/p90, TTFT
               p50 and tokens/s;

at 1 and 64 concurrent clients, greedy (temperature 0), the same token-id
prompts on both sides (those of bench_serve.py). overhead = HTTP minus gRPC
(and HTTP / gRPC) for each figure. With the in-process engine benchmark
(build/bench/bench_serve) present, its numbers for the streaming workload are
reported as the no-front reference. Before measuring, one greedy request is
run through both fronts and must give the same tokens (ids on the gRPC side;
token strings, logprobs and text on the HTTP side, which has no id field).

Clients: gRPC is grpc.aio (Debian's python3-grpcio, one channel, as
bench_serve.py); HTTP is a small HTTP/1.1 client on asyncio streams with one
keep-alive connection per concurrent client (what OpenAI SDKs do). Both run in
this Python process on the same cores as the server: on a small machine the
client's own cost is part of every figure, for both fronts alike.

Prints one JSON object on stdout; progress goes to stderr. Exit status 1 when a
request failed or the two fronts disagree on the tokens. client_cpu_ms_* is this
process's CPU time (all its threads) per request / token: the client's share.
"""
import argparse
import asyncio
import bisect
import codecs
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GENERATE = "/epic.v1.Inference/Generate"
DEBIAN_PYTHON = "/usr/bin/python3"

try:
    import grpc
except ImportError:
    # A python3 on PATH other than Debian's (pyenv, venv) lacks python3-grpcio:
    # run again under Debian's interpreter rather than fail.
    if os.path.realpath(sys.executable) != os.path.realpath(DEBIAN_PYTHON) and os.path.exists(DEBIAN_PYTHON):
        os.execv(DEBIAN_PYTHON, [DEBIAN_PYTHON, os.path.abspath(__file__)] + sys.argv[1:])
    sys.exit("bench_http.py: needs grpcio (Debian: apt-get install python3-grpcio python3-protobuf)")


def log(msg):
    print("bench_http: " + msg, file=sys.stderr, flush=True)


def gen_messages(tmp):
    proto = os.path.join(REPO, "proto")
    subprocess.run(["protoc", "--python_out=" + tmp, "-I" + proto, os.path.join(proto, "epic/v1/inference.proto")],
                   check=True)
    sys.path.insert(0, tmp)
    return importlib.import_module("epic.v1.inference_pb2")


def prompt(i, length, vocab):
    # The same ids as bench_serve.py / bench_serve.c.
    return [0] + [(i * 7 + k * 13) % (vocab - 2) + 2 for k in range(1, length)]


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, max(0, int(p * (len(xs) - 1) + 0.5)))]


def ms(x):
    return round(1e3 * x, 3)


# ---- the server ---------------------------------------------------------------------------

GRPC_RE = re.compile(r"listening on \S+:(\d+) \(pid")
HTTP_RE = re.compile(r"HTTP \(OpenAI API\) on \S+:(\d+)")


def start_server(argv, log_path):
    errf = open(log_path, "w")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, text=True)
    grpc_port = http_port = None
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline and not (grpc_port and http_port):
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = GRPC_RE.search(line)
        if m:
            grpc_port = int(m.group(1))
        m = HTTP_RE.search(line)
        if m:
            http_port = int(m.group(1))
    if not (grpc_port and http_port):
        p.kill()
        p.wait()
        raise RuntimeError("epic serve did not report both ports (stderr in %s): %s" % (log_path, "".join(lines)))
    return p, grpc_port, http_port


def stop_server(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# ---- a minimal HTTP/1.1 client -------------------------------------------------------------

class HttpError(Exception):
    pass


class HttpConn:
    """One keep-alive HTTP/1.1 connection (requests in sequence)."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.r = self.w = None
        self.reconnects = 0

    async def open(self):
        self.r, self.w = await asyncio.open_connection(self.host, self.port)
        sock = self.w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self):
        if self.w:
            self.w.close()
            self.w = self.r = None

    async def _head(self):
        line = await self.r.readline()
        if not line:
            raise HttpError("connection closed before the status line")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError("bad status line %r" % line[:80])
        status = int(parts[1])
        headers = {}
        while True:
            h = await self.r.readline()
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                raise HttpError("connection closed inside the headers")
            k, _, v = h.partition(b":")
            headers[k.strip().lower()] = v.strip().lower()
        return status, headers

    async def _pieces(self, headers):
        """The body as it arrives (chunked or Content-Length or until close)."""
        if headers.get(b"transfer-encoding", b"") == b"chunked":
            while True:
                size = int((await self.r.readline()).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await self.r.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                data = await self.r.readexactly(size)
                await self.r.readexactly(2)
                yield data
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            if n:
                yield await self.r.readexactly(n)
        else:
            while True:
                data = await self.r.read(65536)
                if not data:
                    self.close()
                    return
                yield data

    async def post(self, path, body):
        """Sends a POST; returns (status, headers, async iterator of body pieces).
        The caller must drain the iterator before the next request."""
        if self.w is None:
            self.reconnects += 1
            await self.open()
        self.w.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), self.port, len(body)) + body)
        status, headers = await self._head()
        keep = headers.get(b"connection", b"") != b"close"
        return status, headers, self._drain_then(headers, keep)

    async def _drain_then(self, headers, keep):
        async for piece in self._pieces(headers):
            yield piece
        if not keep:
            self.close()

    async def get_json(self, path):
        if self.w is None:
            await self.open()
        self.w.write(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (path.encode(), self.host.encode(), self.port))
        status, headers = await self._head()
        body = b"".join([p async for p in self._drain_then(headers, headers.get(b"connection") != b"close")])
        if status != 200:
            raise HttpError("GET %s: %d %s" % (path, status, body[:200]))
        return json.loads(body)


async def http_complete(conn, body):
    """Non-streaming POST /v1/completions: the parsed JSON answer."""
    status, _, pieces = await conn.post("/v1/completions", body)
    data = b"".join([p async for p in pieces])
    if status != 200:
        raise HttpError("POST /v1/completions: %d %s" % (status, data[:300]))
    return json.loads(data)


async def http_stream(conn, body):
    """Streaming POST /v1/completions: [(arrival time, event JSON)] of the data
    events before [DONE]."""
    status, _, pieces = await conn.post("/v1/completions", body)
    if status != 200:
        data = b"".join([p async for p in pieces])
        raise HttpError("POST /v1/completions (stream): %d %s" % (status, data[:300]))
    events, buf, done = [], b"", False
    async for piece in pieces:
        now = time.perf_counter()
        buf += piece
        while True:
            cut = buf.find(b"\n\n")
            if cut < 0:
                break
            ev, buf = buf[:cut], buf[cut + 2:]
            for line in ev.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                else:
                    events.append((now, json.loads(payload)))
    if not done:
        raise HttpError("event stream ended without [DONE]")
    return events


# ---- the same-tokens check -----------------------------------------------------------------

def byte_decoder():
    # The GPT-2 byte-level alphabet of tokenizer.json: unicode symbol -> byte.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes_table(model_dir):
    """{id: bytes}, and the set of special ids (left out of generated text)."""
    tj = json.load(open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8"))
    dec = byte_decoder()
    table = {}
    for tok, i in tj["model"]["vocab"].items():
        table[i] = bytes(dec[c] for c in tok) if all(c in dec for c in tok) else tok.encode()
    special = set()
    for a in tj.get("added_tokens", []):
        table[a["id"]] = a["content"].encode()
        if a.get("special"):
            special.add(a["id"])
    return table, special


def tokens_per_event(texts, ids, table, special):
    """How many tokens each HTTP text event holds, from the same prompt's gRPC
    ids (greedy: the same tokens). The server's detokenizer holds back a
    trailing incomplete UTF-8 character and writes invalid bytes as U+FFFD, as
    Python's incremental decoder does: an event ends where the decoded text of
    some token prefix ends. None when the texts are not exactly those ids' text
    (then the caller counts one token per event)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ends, pieces, acc = [], [], 0
    for i in ids:
        # JSON strings of the HTTP front drop NUL (see json_text_of).
        piece = "" if i in special else dec.decode(table.get(i, b"")).replace("\0", "")
        pieces.append(piece)
        acc += len(piece)
        ends.append(acc)
    tail = dec.decode(b"", final=True).replace("\0", "")
    ends[-1] += len(tail)
    if "".join(pieces) + tail != "".join(texts):
        return None
    counts, seen, done = [], 0, 0
    for t in texts:
        seen += len(t)
        upto = bisect.bisect_right(ends, seen)
        if upto <= done:
            return None
        counts.append(upto - done)
        done = upto
    counts[-1] += len(ids) - done  # trailing special tokens have no text
    return counts


def json_text_of(b):
    """A token's bytes as the HTTP front writes them into JSON: each byte that
    does not start a valid UTF-8 sequence becomes U+FFFD, NUL is dropped."""
    out, i = [], 0
    while i < len(b):
        lead = b[i]
        n = 1 if lead < 0x80 else 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else \
            4 if 0xF0 <= lead <= 0xF4 else 0
        try:
            if n == 0:
                raise UnicodeDecodeError("utf-8", b, i, i + 1, "lead")
            ch = b[i:i + n].decode("utf-8")
            if len(b) - i < n:
                raise UnicodeDecodeError("utf-8", b, i, i + 1, "short")
            if ch != "\0":
                out.append(ch)
            i += n
        except UnicodeDecodeError:
            out.append("\ufffd")
            i += 1
    return "".join(out)


async def same_tokens_check(pb, grpc_addr, http_port, model_name, ids, n_tokens, table):
    async with grpc.aio.insecure_channel(grpc_addr) as ch:
        rpc = ch.unary_stream(GENERATE, request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=pb.GenerateResponse.FromString)
        req = pb.GenerateRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)),
                                 sampling=pb.SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True,
                                                            logprobs=True))
        g_ids, g_lps, g_text = [], [], ""
        async for r in rpc(req, timeout=120):
            g_ids += list(r.token_ids)
            g_lps += list(r.logprobs)
            g_text += r.text
    conn = HttpConn("127.0.0.1", http_port)
    body = {"model": model_name, "prompt": ids, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    full = await http_complete(conn, json.dumps(body).encode())
    events = await http_stream(conn, json.dumps(dict(body, stream=True, logprobs=None)).encode())
    conn.close()
    c0 = full["choices"][0]
    h_toks, h_lps = c0["logprobs"]["tokens"], c0["logprobs"]["token_logprobs"]
    s_text = "".join(e["choices"][0].get("text") or "" for _, e in events if e.get("choices"))
    want = [json_text_of(table.get(i, b"")) for i in g_ids]
    diffs = [abs(a - b) for a, b in zip(g_lps, h_lps)]
    res = {"prompt_len": len(ids), "tokens": len(g_ids), "grpc_ids_head": g_ids[:8],
           "token_strings_match": want == h_toks, "text_match": g_text == c0["text"] == s_text,
           "usage_completion_tokens": full["usage"]["completion_tokens"],
           "max_abs_logprob_diff": round(max(diffs), 6) if diffs else None}
    bad = []
    if len(g_ids) != n_tokens or full["usage"]["completion_tokens"] != n_tokens or len(h_toks) != n_tokens:
        bad.append("token counts differ: gRPC %d, HTTP usage %d, HTTP logprobs.tokens %d" %
                   (len(g_ids), full["usage"]["completion_tokens"], len(h_toks)))
    if want != h_toks:
        k = next((i for i, (a, b) in enumerate(zip(want, h_toks)) if a != b), min(len(want), len(h_toks)))
        bad.append("token %d differs: gRPC id %s (%r), HTTP %r" % (k, g_ids[k] if k < len(g_ids) else None,
                                                                  want[k] if k < len(want) else None,
                                                                  h_toks[k] if k < len(h_toks) else None))
    if not res["text_match"]:
        bad.append("text differs: gRPC %r, HTTP %r, HTTP stream %r" % (g_text[:80], c0["text"][:80], s_text[:80]))
    # Same ids, same positions, same engine: the logprobs agree to float32 rounding
    # of the JSON number; a large gap means a different token was scored.
    if diffs and max(diffs) > 1e-3:
        bad.append("logprobs differ by up to %g" % max(diffs))
    return res, bad


# ---- the workloads -------------------------------------------------------------------------

async def run_grpc(pb, addr, conc, reqs, stream, ids_out=None):
    """reqs: GenerateRequests, done by `conc` concurrent clients in one channel;
    ids_out: {request index: generated ids}, filled when given."""
    async with grpc.aio.insecure_channel(addr) as ch:
        rpc = ch.unary_stream(GENERATE, request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=pb.GenerateResponse.FromString)
        async for _ in rpc(reqs[0], timeout=120):  # warm the channel up
            pass
        rec = {"lat": [], "ttft": [], "tpot": [], "itl": [], "tokens": 0, "msgs": 0, "failed": 0, "errors": []}
        todo = list(range(len(reqs)))
        want = reqs[0].sampling.max_tokens

        async def client():
            while todo:
                i = todo.pop()
                t0 = time.perf_counter()
                arrivals, got_ids = [], []
                try:
                    async for r in rpc(reqs[i], timeout=600):
                        if r.token_ids:
                            arrivals.append((time.perf_counter(), len(r.token_ids)))
                            got_ids += r.token_ids
                except grpc.RpcError as e:
                    rec["failed"] += 1
                    rec["errors"].append(str(e.code()))
                    continue
                t1 = time.perf_counter()
                got = sum(k for _, k in arrivals)
                if got != want:
                    rec["failed"] += 1
                    rec["errors"].append("got %d tokens" % got)
                    continue
                rec["lat"].append(t1 - t0)
                rec["tokens"] += got
                rec["msgs"] += len(arrivals)
                if ids_out is not None:
                    ids_out[i] = got_ids
                if stream:
                    account_stream(rec, t0, arrivals, got)

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*[client() for _ in range(conc)])
        rec["wall"] = time.perf_counter() - t0
        rec["cpu"] = time.process_time() - c0
    return rec


def account_stream(rec, t0, arrivals, got):
    """arrivals: [(time, tokens in that message/event)] of one stream."""
    rec["ttft"].append(arrivals[0][0] - t0)
    if got > 1:
        rec["tpot"].append((arrivals[-1][0] - arrivals[0][0]) / (got - arrivals[0][1]))
    for (ta, _), (tb, k) in zip(arrivals, arrivals[1:]):
        rec["itl"] += [(tb - ta) / k] * k


async def run_http(port, conc, bodies, stream, ref_ids=None, table=None, special=None):
    conns = [HttpConn("127.0.0.1", port) for _ in range(conc)]
    await asyncio.gather(*[c.open() for c in conns])
    if stream:
        await http_stream(conns[0], bodies[0])  # warm up, as the gRPC side
    else:
        await http_complete(conns[0], bodies[0])
    want = json.loads(bodies[0])["max_tokens"]
    rec = {"lat": [], "ttft": [], "tpot": [], "itl": [], "tokens": 0, "msgs": 0, "failed": 0, "errors": [],
           "unmapped": 0}
    todo = list(range(len(bodies)))

    async def client(conn):
        while todo:
            i = todo.pop()
            t0 = time.perf_counter()
            try:
                if stream:
                    events = await http_stream(conn, bodies[i])
                else:
                    answer = await http_complete(conn, bodies[i])
            except (HttpError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                rec["failed"] += 1
                rec["errors"].append(str(e)[:200])
                conn.close()
                continue
            t1 = time.perf_counter()
            if not stream:
                got = answer.get("usage", {}).get("completion_tokens")
                if got != want:
                    rec["failed"] += 1
                    rec["errors"].append("usage.completion_tokens %s" % got)
                    continue
                rec["lat"].append(t1 - t0)
                rec["tokens"] += got
                rec["msgs"] += 1
                continue
            # Token events carry text; the finish event carries none, the usage
            # event no choices. Without logprobs an event does not say how many
            # tokens it holds (the server sends what accumulated since its last
            # write, and holds back a token that ends inside a UTF-8
            # character): the counts come from the same prompt's gRPC ids.
            usage = next((e["usage"] for _, e in events if e.get("usage")), None)
            texts = [(t, e["choices"][0]["text"]) for t, e in events
                     if e.get("choices") and e["choices"][0].get("text")]
            got = usage["completion_tokens"] if usage else 0
            if got != want or not texts:
                rec["failed"] += 1
                rec["errors"].append("usage %s, %d text events" % (usage, len(texts)))
                continue
            counts = None
            if ref_ids is not None and i in ref_ids and len(ref_ids[i]) == got:
                counts = tokens_per_event([x for _, x in texts], ref_ids[i], table, special)
            if counts is None:
                rec["unmapped"] += 1
                counts = [1] * len(texts)
            rec["lat"].append(t1 - t0)
            rec["tokens"] += got
            rec["msgs"] += len(texts)
            account_stream(rec, t0, [(t, k) for (t, _), k in zip(texts, counts)], got)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*[client(c) for c in conns])
    rec["wall"] = time.perf_counter() - t0
    rec["cpu"] = time.process_time() - c0
    rec["reconnects"] = sum(c.reconnects for c in conns)
    for c in conns:
        c.close()
    return rec


def merge(recs):
    out = {"lat": [], "ttft": [], "tpot": [], "itl": [], "tokens": 0, "msgs": 0, "failed": 0, "errors": [],
           "wall": 0.0, "cpu": 0.0, "reconnects": 0, "unmapped": 0, "round_rates": []}
    for r in recs:
        for k in ("lat", "ttft", "tpot", "itl", "errors"):
            out[k] += r[k]
        for k in ("tokens", "msgs", "failed", "wall", "cpu"):
            out[k] += r[k]
        out["reconnects"] += r.get("reconnects", 0)
        out["unmapped"] += r.get("unmapped", 0)
        out["round_rates"].append((len(r["lat"]), r["tokens"], r["wall"]))
    return out


def summary(m, stream):
    done = len(m["lat"])
    s = {"completed": done, "failed": m["failed"], "wall_s": round(m["wall"], 3)}
    if m["errors"]:
        s["first_errors"] = sorted(set(m["errors"]))[:3]
    if not stream:
        s.update({"requests_per_s": round(done / m["wall"], 2) if m["wall"] else 0,
                  "requests_per_s_rounds": [round(n / w, 2) for n, _, w in m["round_rates"]],
                  "latency_ms_p50": ms(pct(m["lat"], 0.5)), "latency_ms_p90": ms(pct(m["lat"], 0.9)),
                  "latency_ms_p99": ms(pct(m["lat"], 0.99)),
                  "client_cpu_ms_per_request": round(1e3 * m["cpu"] / done, 4) if done else 0})
    else:
        s.update({"tokens_per_s": round(m["tokens"] / m["wall"], 1) if m["wall"] else 0,
                  "tokens_per_s_rounds": [round(t / w, 1) for _, t, w in m["round_rates"]],
                  "itl_ms_p50": ms(pct(m["itl"], 0.5)), "itl_ms_p90": ms(pct(m["itl"], 0.9)),
                  "tpot_ms_p50": ms(pct(m["tpot"], 0.5)), "tpot_ms_p90": ms(pct(m["tpot"], 0.9)),
                  "ttft_ms_p50": ms(pct(m["ttft"], 0.5)), "ttft_ms_p90": ms(pct(m["ttft"], 0.9)),
                  "messages_per_token": round(m["msgs"] / m["tokens"], 3) if m["tokens"] else 0,
                  "client_cpu_ms_per_token": round(1e3 * m["cpu"] / m["tokens"], 4) if m["tokens"] else 0})
    if m["reconnects"]:
        s["reconnects"] = m["reconnects"]
    if m["unmapped"]:
        # Streams whose text did not match the gRPC ids of the same prompt:
        # their events counted as one token each (intervals overstated).
        s["streams_counted_one_token_per_event"] = m["unmapped"]
    return s


def overhead(g, h, keys):
    o = {}
    for k in keys:
        if k in g and k in h:
            o[k + "_diff"] = round(h[k] - g[k], 3)
            o[k + "_ratio"] = round(h[k] / g[k], 3) if g[k] else None
    return o


async def served_model(port):
    conn = HttpConn("127.0.0.1", port)
    try:
        return (await conn.get_json("/v1/models"))["data"][0]["id"]
    finally:
        conn.close()


def run_engine(args, conc, n):
    if not args.engine_bench:
        return None
    argv = [args.engine_bench, "--model", args.model, "--concurrency", str(conc), "--requests", str(n),
            "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.stream_tokens),
            "--kv-cache-mib", str(args.kv_cache_mib), "--threads", str(args.threads)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        log("engine reference failed (%s): %s" % (r.returncode, r.stderr.strip()[-300:]))
        return None
    e = json.loads(r.stdout)["results"][0]
    return {"requests": n, "tokens_per_s": e["tokens_per_s"], "tpot_ms_p50": e["tpot_ms_p50"],
            "tpot_ms_p99": e["tpot_ms_p99"], "ttft_ms_p50": e["ttft_ms_p50"], "ttft_ms_p99": e["ttft_ms_p99"],
            "note": "in-process engine, streaming workload; its TTFT is the engine part of a max_tokens=1 request"}


def main():
    ap = argparse.ArgumentParser(description="HTTP (OpenAI API) vs gRPC overhead per request and per streamed "
                                 "token, one `epic serve` with both fronts, one JSON object on stdout.",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epic", default=os.path.join(REPO, "build", "coordinator", "epic"),
                    help="the epic binary (default: build/coordinator/epic of this repository)")
    ap.add_argument("--engine-bench", default=None,
                    help="bench_serve for the in-process reference (default: bench/bench_serve next to "
                         "--epic's build; skipped when absent; 'none' to skip)")
    ap.add_argument("--fixtures", default=os.path.join(REPO, "..", "shared", "fixtures"),
                    help="fixtures directory (default: ../shared/fixtures)")
    ap.add_argument("--model", default=None, help="model directory (default: FIXTURES/tiny-fp8)")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=64, help="max_tokens of the streaming workload")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="alternating gRPC/HTTP rounds per workload")
    ap.add_argument("--quick", action="store_true", help="one short round per workload (a smoke run)")
    args = ap.parse_args()
    args.model = args.model or os.path.join(args.fixtures, "tiny-fp8")
    if args.engine_bench is None:
        cand = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.epic))), "bench", "bench_serve")
        args.engine_bench = cand if os.access(cand, os.X_OK) else None
    elif args.engine_bench == "none":
        args.engine_bench = None
    if args.quick:
        args.rounds = 1
    if not os.access(args.epic, os.X_OK):
        sys.exit("bench_http.py: %s is not an executable epic (--epic)" % args.epic)
    concs = [int(c) for c in args.concurrency.split(",")]
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    table, special = token_bytes_table(args.model)
    tmp = tempfile.mkdtemp(prefix="epic-bench-http-")
    pb = gen_messages(tmp)

    argv = [args.epic, "serve", "--model", args.model, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
            "--kv-cache", "%dMiB" % args.kv_cache_mib, "--max-batch", str(max(concs)),
            "--max-queue", str(max(concs) + 1), "--threads", str(args.threads)]
    out = {"bench": "http_vs_grpc", "model": args.model, "prompt_len": args.prompt_len,
           "per_request_max_tokens": 1, "stream_max_tokens": args.stream_tokens, "threads": args.threads,
           "rounds": args.rounds, "quick": args.quick, "cpus": os.cpu_count(),
           "load_avg_1m_start": round(os.getloadavg()[0], 2),
           "clients": {"grpc": "python grpc.aio %s, one channel" % grpc.__version__,
                       "http": "python asyncio HTTP/1.1, one keep-alive connection per client"},
           "results": []}
    failed = False
    log_path = os.path.join(tmp, "serve.stderr")
    srv, gport, hport = start_server(argv, log_path)
    log("epic serve: gRPC on %d, HTTP on %d (stderr in %s)" % (gport, hport, log_path))
    try:
        model_name = asyncio.run(served_model(hport))
        res, bad = asyncio.run(same_tokens_check(pb, "127.0.0.1:%d" % gport, hport, model_name,
                                                 prompt(0, args.prompt_len, vocab), args.stream_tokens, table))
        ref_ids = {}
        out["same_tokens_check"] = res
        if bad:
            out["same_tokens_check"]["errors"] = bad
            for b in bad:
                log("SAME-TOKENS CHECK FAILED: " + b)
            print(json.dumps(out))
            return 1
        log("same tokens through both fronts (%d tokens)" % res["tokens"])

        for conc in concs:
            row = {"concurrency": conc}
            for stream in (False, True):
                mt = args.stream_tokens if stream else 1
                if stream:
                    n = (4 if args.quick else 16) if conc == 1 else (conc if args.quick else 2 * conc)
                else:
                    n = (40 if args.quick else 200) if conc == 1 else (2 * conc if args.quick else 8 * conc)
                ids = [prompt(i, args.prompt_len, vocab) for i in range(n)]
                greqs = [pb.GenerateRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=p)),
                                            sampling=pb.SamplingParams(max_tokens=mt, temperature=0, ignore_eos=True))
                         for p in ids]
                hbodies = [json.dumps({"model": model_name, "prompt": p, "max_tokens": mt, "temperature": 0,
                                       "ignore_eos": True, "stream": stream,
                                       **({"stream_options": {"include_usage": True}} if stream else {})}).encode()
                           for p in ids]
                recs = {"grpc": [], "http": []}
                for r in range(args.rounds):
                    # Alternate which front goes first, so a drift in load hits both.
                    order = ("grpc", "http") if r % 2 == 0 else ("http", "grpc")
                    for front in order:
                        if front == "grpc":
                            rec = asyncio.run(run_grpc(pb, "127.0.0.1:%d" % gport, conc, greqs, stream,
                                                       ref_ids.setdefault((conc, stream), {})))
                        else:
                            rec = asyncio.run(run_http(hport, conc, hbodies, stream,
                                                       ref_ids.get((conc, stream)), table, special))
                        recs[front].append(rec)
                        log("c=%d %s round %d %s: %d ok, %d failed, %.2f s" %
                            (conc, "stream" if stream else "request", r + 1, front, len(rec["lat"]),
                             rec["failed"], rec["wall"]))
                g = summary(merge(recs["grpc"]), stream)
                h = summary(merge(recs["http"]), stream)
                failed = failed or g["failed"] > 0 or h["failed"] > 0
                if stream:
                    keys = ("itl_ms_p50", "itl_ms_p90", "tpot_ms_p50", "tpot_ms_p90", "ttft_ms_p50", "tokens_per_s",
                            "client_cpu_ms_per_token")
                    ov = overhead(g, h, keys)
                    if g["tokens_per_s"] and h["tokens_per_s"]:
                        # Throughput-side cost of one streamed token (all clients together).
                        ov["ms_per_token_at_throughput_diff"] = round(1e3 / h["tokens_per_s"] - 1e3 / g["tokens_per_s"], 4)
                    row["per_token"] = {"requests": n, "grpc": g, "http": h, "overhead_http_minus_grpc": ov}
                else:
                    ov = overhead(g, h, ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "requests_per_s",
                                         "client_cpu_ms_per_request"))
                    if g["requests_per_s"] and h["requests_per_s"]:
                        ov["ms_per_request_at_throughput_diff"] = round(
                            1e3 / h["requests_per_s"] - 1e3 / g["requests_per_s"], 4)
                    row["per_request"] = {"requests": n, "grpc": g, "http": h, "overhead_http_minus_grpc": ov}
            eng = run_engine(args, conc, (4 if args.quick else 16) if conc == 1 else (conc if args.quick else 2 * conc))
            if eng:
                row["engine_reference"] = eng
            out["results"].append(row)
    finally:
        stop_server(srv)
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))
    if failed:
        log("some requests failed (see first_errors in the JSON)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
