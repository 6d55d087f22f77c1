#!/usr/bin/env python3
"""End-to-end tests of `epic serve` through an independent gRPC client.

Usage: test_serve.py EPIC MODEL_DIR    (EPIC_PB_DIR: generated *_pb2.py files)

One server answers: health, model info, streaming greedy generation equal to
`epic generate --json` (token ids, text prompts, chat messages), tokenize,
logprobs, stop strings and stop ids, seeded sampling, client cancellation and
deadlines freeing the KV cache (observed through ModelInfo), every
INVALID_ARGUMENT case naming its field, unknown methods. A second server with
--max-batch 1 --max-queue 1 answers RESOURCE_EXHAUSTED when its queue is full.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import grpc

import epic_client as ec

EPIC, MODEL = sys.argv[1], sys.argv[2]
T = ec.Checks()
SERVE = [EPIC, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", "--threads", "1", "--kv-cache", "32MiB"]


def epic_json(*args):
    out = subprocess.run([EPIC, *args, "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def wait_until(pred, timeout=60.0):
    # Generous: returns as soon as pred holds; sanitizer builds on a loaded
    # machine take a while to wind a cancelled sequence down.
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def rpc_error(fn):
    """Runs fn(); returns (code, details) of the RpcError it raises, or (None, None)."""
    try:
        r = fn()
        if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)):
            list(r)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return None, None


def idle(c):
    s = c.info().stats
    return s.running == 0 and s.queued == 0 and s.kv_pages_used == 0 and s.active_streams == 0


def main():
    srv = ec.Proc(SERVE + ["--kv-cache", "64MiB", "--max-request-bytes", "65536"])
    c = ec.Client(srv.addr)
    try:
        c.wait_ready()
        basics(c)
        generation(c)
        streams_and_freeing(c)
        invalid(c)
    finally:
        c.close()
        srv.signal()
        T.check("server exits 0 after SIGTERM", srv.wait() == 0)
    T.run("queue full", queue_full)
    T.run("padded vocabulary", padded_vocabulary)


def basics(c):
    H = ec.health_pb.HealthCheckResponse
    T.check("health SERVING", c.health() == H.SERVING)
    T.check("health of epic.v1.Inference SERVING", c.health("epic.v1.Inference") == H.SERVING)
    code, det = rpc_error(lambda: c.health("no.such.Service"))
    T.check("health of an unknown service: NOT_FOUND", code == grpc.StatusCode.NOT_FOUND, (code, det))
    info = c.info()
    T.check("model info: name and config", info.model == MODEL.rstrip("/").split("/")[-1]
            and info.config.vocab_size == 1280 and info.config.num_hidden_layers == 3, info)
    T.check("model info: settings", info.serving.max_request_bytes == 65536 and info.serving.kv_pages > 0
            and info.serving.max_batch == 256 and info.serving.ranks == 1, info.serving)
    T.check("model info: idle engine", idle(c) and info.stats.kv_pages_total > 0, info.stats)
    nope = c.channel.unary_unary("/epic.v1.Inference/Nope")
    code, det = rpc_error(lambda: nope(b"", timeout=5))
    T.check("unknown method: UNIMPLEMENTED", code == grpc.StatusCode.UNIMPLEMENTED, (code, det))


def generation(c):
    # Greedy streams equal the single-process reference, token for token.
    for prompt, n in (([0, 10, 20], 12), ([0, 5, 9, 100, 200, 300, 17], 20), ([7], 6)):
        ref = epic_json("generate", "--model", MODEL, "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", str(n))
        ids, text, resps = c.generate(ids=prompt, max_tokens=n)
        last = resps[-1]
        T.check("greedy ids equal epic generate %s" % prompt, ids == ref["output_ids"], (ids, ref["output_ids"]))
        T.check("streamed text equals epic generate %s" % prompt, text == ref["text"], (text, ref["text"]))
        want_reason = ec.pb.FINISH_REASON_STOP if ref["finish_reason"] == "stop" else ec.pb.FINISH_REASON_LENGTH
        T.check("finish reason and usage %s" % prompt, last.finish_reason == want_reason
                and last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == len(ids)
                and last.usage.ttft_seconds > 0 and last.usage.total_seconds >= last.usage.ttft_seconds, last)
        # The server coalesces tokens that arrive while a send is in flight, so
        # a short generation on a loaded machine may come as a single message:
        # check the framing, not the message count.
        T.check("streamed: only the last message finishes %s" % prompt, all(
            r.finish_reason == ec.pb.FINISH_REASON_UNSPECIFIED and not r.HasField("usage")
            for r in resps[:-1]), len(resps))

    ref = epic_json("generate", "--model", MODEL, "--prompt", "Hello, world!", "--max-new-tokens", "10")
    ids, text, resps = c.generate(text="Hello, world!", max_tokens=10)
    T.check("text prompt equals epic generate --prompt", ids == ref["output_ids"] and text == ref["text"]
            and resps[-1].usage.prompt_tokens == len(ref["prompt_ids"]), (ids, ref))
    ref = epic_json("generate", "--model", MODEL, "--prompt", "Hi", "--chat", "--system", "Be brief",
                    "--max-new-tokens", "10")
    ids, text, resps = c.generate(chat=[("system", "Be brief"), ("user", "Hi")], max_tokens=10)
    T.check("chat messages equal epic generate --chat", ids == ref["output_ids"] and text == ref["text"]
            and resps[-1].usage.prompt_tokens == len(ref["prompt_ids"]), (ids, ref))

    # Tokenize against the tokenize subcommand.
    want = json.loads(subprocess.run([EPIC, "tokenize", "--model", MODEL, "--text", "Hello world, 12345!",
                                      "--add-bos", "--json"], check=True, capture_output=True, text=True).stdout)
    r = c.tokenize_rpc(ec.pb.TokenizeRequest(prompt=ec.pb.Prompt(text="Hello world, 12345!")), timeout=10)
    T.check("tokenize text equals epic tokenize", list(r.ids) == want and len(r.tokens) == len(want), (r, want))
    r = c.tokenize_rpc(ec.pb.TokenizeRequest(prompt=ec.pb.Prompt(text="Hello world, 12345!", no_bos=True)),
                       timeout=10)
    T.check("tokenize no_bos", list(r.ids) == want[1:], (r, want))
    want = json.loads(subprocess.run([EPIC, "tokenize", "--model", MODEL, "--text", "Hi", "--chat", "--system",
                                      "Be brief", "--json"], check=True, capture_output=True, text=True).stdout)
    rq = ec.pb.TokenizeRequest(prompt=ec.request(chat=[("system", "Be brief"), ("user", "Hi")]).prompt)
    r = c.tokenize_rpc(rq, timeout=10)
    T.check("tokenize chat equals epic tokenize --chat", list(r.ids) == want and "Hi" in r.text, (r, want))
    r = c.tokenize_rpc(ec.pb.TokenizeRequest(prompt=ec.request(ids=list(want)).prompt), timeout=10)
    T.check("token ids decode to the rendered chat", "Be brief" in r.text and "Hi" in r.text, r.text)

    # Logprobs only when asked, one per token.
    ids, _, resps = c.generate(ids=[0, 10, 20], max_tokens=6, logprobs=True)
    lps = [x for r in resps for x in r.logprobs]
    T.check("logprobs: one per token, <= 0", len(lps) == len(ids) and all(x <= 0 for x in lps), lps)
    _, _, resps = c.generate(ids=[0, 10, 20], max_tokens=6)
    T.check("no logprobs unless asked", all(len(r.logprobs) == 0 for r in resps))

    # Stop strings: the text ends right before the first occurrence.
    full_ids, full, _ = c.generate(ids=[0, 5, 9, 100], max_tokens=24, ignore_eos=True)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full.index(stop)
    ids, text, resps = c.generate(ids=[0, 5, 9, 100], max_tokens=24, ignore_eos=True, stop=["\x01never", stop])
    T.check("stop string cuts the text", text == full[:cut] and resps[-1].stop == stop
            and resps[-1].finish_reason == ec.pb.FINISH_REASON_STOP and ids == full_ids[:len(ids)]
            and len(ids) < len(full_ids), (stop, text, full))
    ids, _, resps = c.generate(ids=[0, 5, 9, 100], max_tokens=24, ignore_eos=True, stop_token_ids=[full_ids[3]])
    k = full_ids.index(full_ids[3])
    T.check("stop token id ends the stream", ids == full_ids[:k + 1]
            and resps[-1].finish_reason == ec.pb.FINISH_REASON_STOP, ids)

    # Seeded sampling is reproducible and equals the single-process sampler.
    kw = dict(ids=[0, 10, 20], max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    a, _, _ = c.generate(**kw)
    b, _, _ = c.generate(**kw)
    ref = epic_json("generate", "--model", MODEL, "--prompt-ids", "0,10,20", "--max-new-tokens", "10",
                    "--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "7")
    T.check("seeded sampling reproducible", a == b and a == ref["output_ids"], (a, b, ref["output_ids"]))


def streams_and_freeing(c):
    before = c.info().stats
    call = c.generate_rpc(ec.request(ids=[0, 10, 20], max_tokens=3000, ignore_eos=True), timeout=120)
    got = [next(call) for _ in range(3)]
    s = c.info().stats
    T.check("a running stream holds KV pages", s.running == 1 and s.kv_pages_used > 0 and s.active_streams == 1, s)
    call.cancel()
    T.check("client cancel frees the sequence's KV pages and slot", wait_until(lambda: idle(c)), c.info().stats)
    T.check("cancellation counted", c.info().stats.cancelled == before.cancelled + 1 and len(got) == 3)

    code, det = rpc_error(lambda: c.generate_rpc(ec.request(ids=[0, 10], max_tokens=3000, ignore_eos=True),
                                                 timeout=0.5))
    T.check("deadline: DEADLINE_EXCEEDED", code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, det))
    T.check("deadline frees the KV pages", wait_until(lambda: idle(c)), c.info().stats)
    T.check("deadline counted as cancelled", c.info().stats.cancelled == before.cancelled + 2)


def invalid(c):
    before = c.info().stats
    ctx = c.info().serving.max_context
    kv_tokens = c.info().serving.kv_pages * c.info().serving.page_size
    no_prompt = ec.pb.GenerateRequest(sampling=ec.pb.SamplingParams(max_tokens=4))
    empty_ids = ec.pb.GenerateRequest()
    empty_ids.prompt.token_ids.SetInParent()
    empty_chat = ec.pb.GenerateRequest()
    empty_chat.prompt.chat.SetInParent()
    cases = [
        ("missing prompt", no_prompt, "prompt: missing"),
        ("empty text prompt", ec.request(text=""), "prompt.text: empty"),
        ("empty token ids", empty_ids, "prompt.token_ids.ids: empty"),
        ("empty chat", empty_chat, "prompt.chat.messages: empty"),
        ("unknown chat role", ec.request(chat=[("wizard", "hi")]), "prompt.chat.messages[0].role"),
        ("unknown chat template", ec.pb.GenerateRequest(prompt=ec.pb.Prompt(chat=ec.pb.Chat(
            messages=[ec.pb.ChatMessage(role="user", content="hi")], template_name="v9"))),
         "prompt.chat.template_name"),
        ("unknown token id", ec.request(ids=[0, 99999]), "prompt.token_ids.ids[1]"),
        ("negative token id", ec.request(ids=[-1]), "prompt.token_ids.ids[0]"),
        ("max_tokens 0", ec.request(ids=[0], max_tokens=0), "sampling.max_tokens"),
        ("max_tokens negative", ec.request(ids=[0], max_tokens=-3), "sampling.max_tokens"),
        ("max_tokens beyond the context", ec.request(ids=[0, 1, 2], max_tokens=ctx), "sampling.max_tokens"),
        ("max_tokens beyond the KV cache", ec.request(ids=[0], max_tokens=kv_tokens + 1), "sampling.max_tokens"),
        ("temperature < 0", ec.request(ids=[0], temperature=-0.5), "sampling.temperature"),
        ("temperature NaN", ec.request(ids=[0], temperature=float("nan")), "sampling.temperature"),
        ("top_p 0", ec.request(ids=[0], top_p=0.0), "sampling.top_p"),
        ("top_p > 1", ec.request(ids=[0], top_p=1.5), "sampling.top_p"),
        ("top_k < 0", ec.request(ids=[0], top_k=-1), "sampling.top_k"),
        ("empty stop string", ec.request(ids=[0], stop=[""]), "sampling.stop[0]"),
        ("too many stop strings", ec.request(ids=[0], stop=["s%d" % i for i in range(17)]), "sampling.stop"),
        ("unknown stop token id", ec.request(ids=[0], stop_token_ids=[5000]), "sampling.stop_token_ids[0]"),
        ("malformed protobuf", b"\x0a\xff\xff\xff\xff\x0f", "request: malformed GenerateRequest"),
        ("oversized message", ec.request(text="x" * 100000), "exceeds the server's limit of 65536 bytes"),
    ]
    for name, rq, field in cases:
        rpc = c.generate_raw if isinstance(rq, bytes) else c.generate_rpc
        code, det = rpc_error(lambda: rpc(rq, timeout=10))
        T.check("INVALID_ARGUMENT: %s" % name, code == grpc.StatusCode.INVALID_ARGUMENT and det is not None
                and field in det, (code, det))
    code, det = rpc_error(lambda: c.tokenize_rpc(ec.pb.TokenizeRequest(), timeout=10))
    T.check("INVALID_ARGUMENT: tokenize without prompt", code == grpc.StatusCode.INVALID_ARGUMENT
            and "prompt" in det, (code, det))
    after = c.info().stats
    T.check("rejected requests never reach the engine", idle(c) and after.finished == before.finished, after)


def queue_full():
    srv = ec.Proc(SERVE + ["--max-batch", "1", "--max-queue", "1"])
    c = ec.Client(srv.addr)
    try:
        c.wait_ready()
        long_rq = ec.request(ids=[0, 10, 20], max_tokens=3000, ignore_eos=True)
        a = c.generate_rpc(long_rq, timeout=120)
        next(a)
        b = c.generate_rpc(long_rq, timeout=120)
        T.check("second request waits in the queue",
                wait_until(lambda: c.info().stats.queued == 1), c.info().stats)
        code, det = rpc_error(lambda: c.generate_rpc(long_rq, timeout=10))
        T.check("queue full: RESOURCE_EXHAUSTED", code == grpc.StatusCode.RESOURCE_EXHAUSTED
                and "queue is full" in det, (code, det))
        a.cancel()
        T.check("queued request admitted once the slot frees", next(b).token_ids is not None)
        b.cancel()
        T.check("everything freed", wait_until(lambda: idle(c)), c.info().stats)
    finally:
        c.close()
        srv.signal()
        T.check("queue-full server exits 0", srv.wait() == 0)


def padded_vocabulary():
    # A vocabulary padded past its tokenizer (DeepSeek-V3: 129280 rows, 128815 tokens):
    # streamed padding ids carry no text and do not fail the stream, with or without
    # special tokens' text (random dummy weights pick them most of the time).
    with tempfile.TemporaryDirectory() as d:
        cfg = json.load(open(os.path.join(MODEL, "config.json")))
        cfg["vocab_size"] = 4096
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(MODEL, f), d)
        log = open(os.path.join(d, "serve.log"), "w")
        srv = ec.Proc([EPIC, "serve", "--model", d, "--load-format", "dummy", "--listen",
                       "127.0.0.1:0", "--threads", "1", "--kv-cache", "32MiB"], log=log)
        c = ec.Client(srv.addr)
        try:
            c.wait_ready()
            for special in (False, True):
                ids, text, resps = c.generate(ids=[0, 10, 20], max_tokens=16, ignore_eos=True,
                                              include_special_text=special)
                T.check("padded vocabulary: ids past the tokenizer stream (special text %s)"
                        % special, len(ids) == 16 and max(ids) >= 1280 and isinstance(text, str)
                        and resps[-1].finish_reason == ec.pb.FINISH_REASON_LENGTH, (ids, resps[-1]))
        finally:
            c.close()
            srv.signal()
            T.check("padded-vocabulary server exits 0", srv.wait() == 0)
            log.close()
            errors = [l for l in open(log.name) if "error" in l]
            T.check("padded vocabulary: no decoding errors logged", not errors, errors[:3])


if __name__ == "__main__":
    T.run("serve", main)
    sys.exit(T.finish())
