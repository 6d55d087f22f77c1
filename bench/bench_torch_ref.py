#!/usr/bin/env python3
"""PyTorch + Hugging Face transformers baseline for the whole-model GPU benchmark (issue #7).

Runs the DeepSeek-V3 config from bench/configs/deepseek-v3-671b/config.json, cut to
--num-layers K layers (default 4: 3 dense + 1 MoE layer with all 256 experts), through
transformers' DeepseekV3ForCausalLM in BF16 with random weights on one GPU, the way a user
runs it: model.forward with a KV cache (DynamicCache by default), SDPA attention and
transformers' default experts implementation. No CUDA graphs, no torch.compile.

For every (batch B, context C) point: prefill tokens/s (one forward over B x C tokens; if that
runs out of memory, the prompt is fed in halving chunks through the same cache and the chunk
used is reported; if even the smallest chunk fails, the point reports "oom"), then decode
tokens/s = B / median step time over --decode-steps steps of one token per sequence.

Prints ONE JSON object on stdout; progress goes to stderr. Imports torch only after the
arguments are parsed, so `--help` and `python3 -m py_compile` work without torch.

The transformers API used (checked against transformers 5.x sources):
  DeepseekV3Config.from_dict (legacy `rope_scaling` dict converted to `rope_parameters`),
  DeepseekV3ForCausalLM._from_config(cfg, dtype=, attn_implementation=, experts_implementation=),
  forward(input_ids=, past_key_values=, use_cache=True, logits_to_keep=) -> .logits, .past_key_values,
  StaticCache(config=, max_cache_len=) for --cache static.
"""
import argparse
import contextlib
import gc
import json
import os
import sys
import time

T0 = time.monotonic()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "bench", "configs", "deepseek-v3-671b", "config.json")

NOTES = [
    "dtype bf16 for every weight: transformers' FP8 block-quantized path needs extra kernels, "
    "so quantization_config from the checkpoint config is dropped",
    "weights are random: every matrix normal(0, initializer_range), every norm weight 1; the router "
    "bias (e_score_correction_bias) stays 0, so routing is close to uniform over the experts",
    "prefill_tokens_per_s = batch*ctx / wall time of the prefill forward(s) (cache allocation included, "
    "logits only for the last position of each sequence: logits_to_keep=1, as generate() does), the "
    "fastest of prefill_repeats runs, each into a fresh cache; prefill_first_ms is the first run, which "
    "also pays one-time per-shape costs (cuBLAS heuristics, allocator growth); "
    "prefill_chunk < ctx means one forward over all tokens ran out of memory and the prompt was fed "
    "in chunks of that many tokens per sequence through the same cache",
    "decode_tokens_per_s = batch / p50 of the step times; a step is one model.forward of one token per "
    "sequence with torch.cuda.synchronize() before and after, argmax of the logits outside the timing; "
    "decode_warmup steps before the timed ones are not counted",
    "decode_step_ms_per_layer = decode_step_ms.p50 / layers: it includes the embedding, final norm and "
    "LM head (129280 x 7168) and mixes dense and MoE layers, so it is not the cost of one MoE layer",
    "kv_cache_bytes_est = layers * batch * tokens * heads * (qk_nope+qk_rope + v_head) * 2 bytes: "
    "transformers' DeepseekV3 caches decompressed per-head K and V (naive MLA); a point whose estimate "
    "exceeds the free GPU memory is reported as oom (oom_phase kv_estimate) without running it",
    "DynamicCache grows by torch.cat, so every decode step copies the whole cache of each layer",
    "sdpa_backend default lets torch choose (cuDNN attention on H100/H200), which rebuilds its graph for "
    "every new KV length: about 12 ms of host time per layer per decode step with torch 2.11, which "
    "dominates small-batch decode; efficient is torch's memory-efficient kernel, which has no such cost",
]


def log(msg):
    print(f"[torch_ref {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def int_list(s):
    out = [int(x) for x in s.replace(" ", "").split(",") if x]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"bad list {s!r}: want positive integers separated by commas")
    return out


def point_list(s):
    pts = []
    for item in s.replace(",", " ").split():
        b, sep, c = item.lower().partition("x")
        if not sep or not b.isdigit() or not c.isdigit() or int(b) < 1 or int(c) < 1:
            raise argparse.ArgumentTypeError(f"bad point {item!r}: want BATCHxCTX, e.g. 32x1024")
        pts.append((int(b), int(c)))
    if not pts:
        raise argparse.ArgumentTypeError("empty --points")
    return pts


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="PyTorch + transformers DeepseekV3 baseline: prefill and decode tokens/s on one GPU "
        "(prints one JSON object on stdout)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="DeepSeek-V3 config.json (default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=4,
                   help="decoder layers to keep (default 4: first_k_dense_replace=3 dense + 1 MoE)")
    p.add_argument("--num-experts", type=int, default=0,
                   help="routed experts per MoE layer; 0 keeps the config's 256 (smaller only for a smoke test)")
    p.add_argument("--batch", type=int_list, default=[1, 32, 128, 512], help="batch sizes (default 1,32,128,512)")
    p.add_argument("--ctx", type=int_list, default=[1024, 8192], help="context lengths (default 1024,8192)")
    p.add_argument("--points", type=point_list, default=None,
                   help="explicit BATCHxCTX points, e.g. '1x1024,32x8192'; replaces the --batch x --ctx grid")
    p.add_argument("--decode-steps", type=int, default=8, help="timed decode steps per point (default 8)")
    p.add_argument("--decode-warmup", type=int, default=1, help="untimed decode steps before them (default 1)")
    p.add_argument("--prefill-repeats", type=int, default=2,
                   help="prefills per point, each into a fresh cache; prefill_tokens_per_s is from the fastest, "
                   "prefill_first_ms keeps the first, which pays one-time per-shape costs (default 2)")
    p.add_argument("--profile", action="store_true",
                   help="run the timed decode steps under torch.profiler and print its top ops to stderr "
                   "(timings of such points carry profiled: true)")
    p.add_argument("--min-prefill-chunk", type=int, default=64,
                   help="smallest prefill chunk (tokens per sequence) tried after out-of-memory (default 64)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attn_implementation (default sdpa)")
    p.add_argument("--sdpa-backend", default="default", choices=["default", "efficient", "cudnn", "flash", "math"],
                   help="restrict torch's scaled_dot_product_attention to one backend (default: torch's own "
                   "choice, which on H100/H200 is cuDNN; cuDNN rebuilds its graph for every new KV length, "
                   "about 12 ms of host time per layer per decode step with torch 2.11)")
    p.add_argument("--experts-impl", default=None, choices=["eager", "grouped_mm", "batched_mm"],
                   help="experts_implementation (default: transformers' own choice, reported in the JSON)")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"],
                   help="KV cache class: DynamicCache (generate()'s default) or StaticCache (default dynamic)")
    p.add_argument("--no-kv-estimate", action="store_true",
                   help="run points even when the KV-cache estimate exceeds free GPU memory")
    p.add_argument("--max-seconds", type=float, default=400,
                   help="stop starting new points (and cut decode loops) after this many seconds since "
                   "start; later points report skipped (default 400)")
    p.add_argument("--seed", type=int, default=1, help="seed for weights and prompts (default 1)")
    a = p.parse_args(argv)
    if min(a.num_layers, a.decode_steps, a.prefill_repeats, a.min_prefill_chunk) < 1:
        p.error("--num-layers, --decode-steps, --prefill-repeats and --min-prefill-chunk must be >= 1")
    if min(a.decode_warmup, a.num_experts) < 0:
        p.error("--decode-warmup and --num-experts must be >= 0")
    return a


def load_config_dict(path, layers, experts):
    with open(path) as f:
        d = json.load(f)
    dropped = [k for k in ("quantization_config", "torch_dtype", "transformers_version") if k in d]
    for k in dropped:
        d.pop(k)
    d["num_hidden_layers"] = layers
    if experts:
        d["n_routed_experts"] = experts
    e, g, tg, k = d["n_routed_experts"], d.get("n_group", 1), d.get("topk_group", 1), d["num_experts_per_tok"]
    # The router takes the top-2 scores inside each of n_group groups, then top-k among topk_group groups.
    if e % g or e // g < 2 or tg * (e // g) < k:
        raise SystemExit(f"--num-experts {e}: needs n_routed_experts % n_group ({g}) == 0, at least 2 experts "
                         f"per group and topk_group*experts_per_group >= num_experts_per_tok ({k})")
    return d, dropped


def pct(sorted_vals, p):
    n = len(sorted_vals)
    i = int(p * (n - 1) + 0.5)
    return sorted_vals[min(max(i, 0), n - 1)]


def main(argv):
    args = parse_args(argv)
    cfg_dict, dropped = load_config_dict(args.config, args.num_layers, args.num_experts)

    import torch
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    transformers.utils.logging.set_verbosity_error()
    if not torch.cuda.is_available():
        raise SystemExit("bench_torch_ref: no CUDA device visible to torch")
    dev = torch.device("cuda")
    torch.manual_seed(args.seed)

    cfg = DeepseekV3Config.from_dict(cfg_dict)
    for key in ("num_hidden_layers", "n_routed_experts"):
        if getattr(cfg, key) != cfg_dict[key]:
            raise SystemExit(f"config field {key}: transformers kept {getattr(cfg, key)}, asked {cfg_dict[key]}")
    K, E = cfg.num_hidden_layers, cfg.n_routed_experts
    n_moe = max(0, K - cfg.first_k_dense_replace)
    if n_moe == 0:
        log(f"warning: {K} layers <= first_k_dense_replace={cfg.first_k_dense_replace}: no MoE layer")

    result = {
        "bench": "torch_ref", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
        "transformers": transformers.__version__, "dtype": "bf16", "layers": K, "experts": E,
        "dense_layers": K - n_moe, "moe_layers": n_moe, "config": os.path.relpath(args.config, REPO),
        "config_dropped": dropped, "cache": args.cache, "sdpa_backend": args.sdpa_backend,
        "decode_steps": args.decode_steps, "decode_warmup": args.decode_warmup,
        "gpu_mem_total_bytes": torch.cuda.get_device_properties(dev).total_memory,
        "rope": getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None),
        "notes": NOTES, "points": [],
    }

    # Build straight on the GPU: under torch.device("cuda") every parameter is allocated there,
    # so the ~30 GB of a 4-layer, 256-expert model never passes through host memory.
    kw = {"dtype": torch.bfloat16, "attn_implementation": args.attn}
    if args.experts_impl:
        kw["experts_implementation"] = args.experts_impl
    t = time.monotonic()
    with torch.device(dev):
        try:
            model = DeepseekV3ForCausalLM._from_config(cfg, **kw)
        except TypeError as e:  # transformers 4.x spells dtype torch_dtype and has no experts_implementation
            log(f"_from_config({sorted(kw)}) failed ({e}); retrying with torch_dtype")
            kw["torch_dtype"] = kw.pop("dtype")
            kw.pop("experts_implementation", None)
            model = DeepseekV3ForCausalLM._from_config(cfg, **kw)
    model.eval()
    if next(model.parameters()).device.type != "cuda":
        log("warning: parameters were built on the CPU; moving them to the GPU")
        model.to(dev)
    # Draw the weights here rather than rely on _from_config's initialisation, which differs
    # across transformers versions (some skip it): matrices N(0, initializer_range), norms 1.
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.dim() >= 2:
                if prm.dtype != torch.bfloat16:
                    log(f"warning: weight {name} is {prm.dtype}")
                prm.normal_(0.0, cfg.initializer_range)
            elif name.endswith("bias"):
                prm.zero_()
            else:
                prm.fill_(1.0)
    torch.cuda.synchronize()
    result["model_init_s"] = round(time.monotonic() - t, 2)
    result["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", args.attn)
    result["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    log(f"model: {K} layers ({n_moe} MoE, {E} experts), {result['weight_bytes'] / 2**30:.1f} GiB of weights, "
        f"attn={result['attn_implementation']} experts={result['experts_implementation']}, "
        f"built in {result['model_init_s']} s on {result['device']}")

    V = cfg.vocab_size
    kv_per_token = K * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 2

    def new_cache(batch, max_len):
        if args.cache == "dynamic":
            return None  # the model makes a DynamicCache(config) on the first forward with use_cache=True
        from transformers import StaticCache
        return StaticCache(config=model.config, max_cache_len=max_len)

    def prefill(prompt, chunk, max_len):
        """One forward per chunk of every sequence's prompt; returns last logits, cache, seconds."""
        cache = new_cache(prompt.shape[0], max_len)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = None
        for s in range(0, prompt.shape[1], chunk):
            out = model(input_ids=prompt[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        torch.cuda.synchronize()
        return out.logits[:, -1, :], cache, time.perf_counter() - t0

    def is_oom(e):
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
        msg = str(e)
        return isinstance(e, RuntimeError) and ("out of memory" in msg or "ALLOC_FAILED" in msg)

    def release():
        gc.collect()
        torch.cuda.empty_cache()

    def run_point(B, C, deadline):
        pt = {"batch": B, "ctx": C, "oom": False, "skipped": False}
        max_len = C + args.decode_warmup + args.decode_steps + 1
        pt["kv_cache_bytes_est"] = kv_per_token * B * max_len
        free, _ = torch.cuda.mem_get_info(dev)
        pt["gpu_free_bytes_before"] = free
        if pt["kv_cache_bytes_est"] > free and not args.no_kv_estimate:
            pt.update(oom=True, oom_phase="kv_estimate")
            log(f"B={B} C={C}: KV cache estimate {pt['kv_cache_bytes_est'] / 2**30:.1f} GiB > free "
                f"{free / 2**30:.1f} GiB: oom without running")
            return pt
        torch.cuda.reset_peak_memory_stats(dev)
        prompt = torch.randint(0, V, (B, C), device=dev)
        chunk, res, tries = C, None, []
        while res is None:
            if time.monotonic() > deadline:
                pt.update(skipped=True, skip_reason="max-seconds reached during prefill retries")
                break
            err = None  # a string, never the exception: its traceback would pin the activations
            try:
                res = prefill(prompt, chunk, max_len)
            except Exception as e:  # noqa: BLE001 -- OOM is expected at large points; others are reported
                err = None if is_oom(e) else repr(e)[:500]
                tries.append({"chunk": chunk, "error": err or "oom"})
            if res is None:
                release()  # the exception (and its frames holding activations) is gone here
                if err is not None:
                    pt["error"] = "prefill: " + err
                    log(f"B={B} C={C}: prefill failed: {err}")
                    break
                if chunk <= args.min_prefill_chunk:
                    pt.update(oom=True, oom_phase="prefill")
                    log(f"B={B} C={C}: prefill out of memory down to chunk {chunk}")
                    break
                chunk = max(args.min_prefill_chunk, (chunk + 1) // 2)
                log(f"B={B} C={C}: prefill out of memory, retrying in chunks of {chunk} tokens per sequence")
        if tries:
            pt["prefill_failed_tries"] = tries
        if res is None:
            del prompt
            release()
            return pt
        t_runs, repeat_err = [res[2]], None
        for _ in range(args.prefill_repeats - 1):
            if time.monotonic() > deadline:
                break
            res = None  # free the previous cache before the next prefill allocates its own
            release()
            try:
                res = prefill(prompt, chunk, max_len)
            except Exception as e:  # noqa: BLE001 -- the same chunk fitted a moment ago; rare
                repeat_err = repr(e)[:300]
            if res is None:
                release()
                break
            t_runs.append(res[2])
        t_pre = min(t_runs)
        pt["prefill_first_ms"] = round(1e3 * t_runs[0], 3)
        pt["prefill_runs"] = len(t_runs)
        pt["prefill_chunk"] = chunk
        pt["prefill_ms"] = round(1e3 * t_pre, 3)
        pt["prefill_tokens_per_s"] = round(B * C / t_pre, 2)
        if res is None:
            pt["error"] = "repeated prefill failed, no cache left to decode from: " + repeat_err
            log(f"B={B} C={C}: {pt['error']}")
            del prompt
            release()
            return pt
        logits, cache, _ = res
        del res
        finite = bool(torch.isfinite(logits).all().item())
        log(f"B={B} C={C}: prefill {B * C} tokens in {t_pre * 1e3:.1f} ms (chunk {chunk}, first run "
            f"{t_runs[0] * 1e3:.1f} ms) = {B * C / t_pre:.1f} tok/s, logits finite: {finite}")

        def decode_step(tok, kv):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            o = model(input_ids=tok, past_key_values=kv, use_cache=True)
            torch.cuda.synchronize()
            return o.logits[:, -1, :], o.past_key_values, time.perf_counter() - t0

        steps = []
        try:
            nxt = logits.argmax(dim=-1, keepdim=True)
            for _ in range(args.decode_warmup):
                logits, cache, _ = decode_step(nxt, cache)
                nxt = logits.argmax(dim=-1, keepdim=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile
                pctx = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                pt["profiled"] = True
            else:
                pctx = contextlib.nullcontext()
            with pctx as prof:
                for _ in range(args.decode_steps):
                    if time.monotonic() > deadline:
                        pt["decode_cut_by_max_seconds"] = True
                        break
                    logits, cache, dt = decode_step(nxt, cache)
                    nxt = logits.argmax(dim=-1, keepdim=True)
                    steps.append(dt)
            if args.profile and steps:
                ka = prof.key_averages()
                log(f"B={B} C={C}: profile of {len(steps)} decode steps, by device time:\n"
                    + ka.table(sort_by="self_device_time_total", row_limit=20))
                log(f"B={B} C={C}: profile by host time:\n" + ka.table(sort_by="cpu_time_total", row_limit=25))
            finite = finite and bool(torch.isfinite(logits).all().item())
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                pt.update(oom=True, oom_phase="decode")
                log(f"B={B} C={C}: decode out of memory after {len(steps)} timed steps")
            else:
                pt["error"] = f"decode: {e!r}"[:500]
                log(f"B={B} C={C}: decode failed: {e!r}")
        pt["logits_finite"] = finite
        if not finite:
            log(f"warning: B={B} C={C}: non-finite logits")
        if steps and not pt["oom"]:
            s = sorted(steps)
            p50 = pct(s, 0.5)
            pt["decode_tokens_per_s"] = round(B / p50, 2)
            pt["decode_step_ms"] = {"p50": round(1e3 * p50, 3), "p90": round(1e3 * pct(s, 0.9), 3),
                                    "min": round(1e3 * s[0], 3), "max": round(1e3 * s[-1], 3), "n": len(s)}
            pt["decode_step_ms_per_layer"] = round(1e3 * p50 / K, 3)
            log(f"B={B} C={C}: decode p50 {1e3 * p50:.2f} ms/step = {B / p50:.1f} tok/s")
        pt["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
        cache = logits = nxt = prompt = None  # noqa: F841 -- drop the cache before the next point
        release()
        return pt

    deadline = T0 + args.max_seconds
    sdpa_ctx = contextlib.nullcontext()
    if args.sdpa_backend != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa_ctx = sdpa_kernel([{"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                                 "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[args.sdpa_backend]])
    with torch.inference_mode(), sdpa_ctx:
        # Warm-up: kernels, cuBLAS handles and grouped-GEMM paths are set up outside any timing.
        t = time.monotonic()
        wp = torch.randint(0, V, (2, 32), device=dev)
        o = model(input_ids=wp, use_cache=True, logits_to_keep=1)
        for _ in range(2):
            o = model(input_ids=o.logits[:, -1, :].argmax(-1, keepdim=True), past_key_values=o.past_key_values,
                      use_cache=True)
        result["warmup_logits_finite"] = bool(torch.isfinite(o.logits).all().item())
        del o, wp
        release()
        result["warmup_s"] = round(time.monotonic() - t, 2)
        log(f"warm-up done in {result['warmup_s']} s, logits finite: {result['warmup_logits_finite']}")

        grid = args.points or [(b, c) for c in args.ctx for b in args.batch]
        # Smallest points first, so that --max-seconds drops the largest (most likely to fail) ones.
        for B, C in sorted(grid, key=lambda bc: (bc[0] * bc[1], bc[1])):
            if time.monotonic() > deadline:
                result["points"].append({"batch": B, "ctx": C, "oom": False, "skipped": True,
                                         "skip_reason": "max-seconds reached"})
                log(f"B={B} C={C}: skipped (max-seconds {args.max_seconds})")
                continue
            result["points"].append(run_point(B, C, deadline))
    result["elapsed_s"] = round(time.monotonic() - T0, 2)
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
