#!/bin/bash
# Whole-model GPU benchmark (issue #7): EPIC's bench_model --device cuda against the PyTorch +
# transformers DeepseekV3 baseline (bench/bench_torch_ref.py) on the same GPU, same config
# (bench/configs/deepseek-v3-671b cut to LAYERS layers, dummy/random weights), same
# (batch, context) points, one after the other (never both on the GPU at once).
#
# Run on the GPU machine from the repository root, after a CUDA build exists in build-gpu/:
#   [POINTS="1x1024 32x1024 128x1024 32x8192"] [LAYERS=4] [EXPERTS=0] [DECODE_STEPS=8] \
#   [TORCH_SDPA="default efficient"] [TOTAL_SECONDS=530] [EPIC_TIMEOUT=100] [TORCH_RESERVE=240] \
#   [EPIC_BENCH_MODEL=build-gpu/bench/bench_model] [EPIC_ARGS="--prefill-chunk 1024"] bash bench/gpu_model_bench.sh
# POINTS is a list of BATCHxCTX; unset, it is BATCHES x CTXS when either of those is set
# (e.g. BATCHES="1 32 128 512" CTXS="1024 8192", the full grid of the issue), else the default
# above, sized to finish inside one 10-minute device command (TOTAL_SECONDS bounds the whole run:
# each EPIC run gets at most EPIC_TIMEOUT seconds and stops TORCH_RESERVE seconds before the end).
# EXPERTS=0 keeps the config's 256 experts per MoE layer. The baseline runs once per SDPA backend
# in TORCH_SDPA: torch's default (cuDNN on H100/H200, which rebuilds its graph for every new KV
# length, ~12 ms of host time per layer per decode step) and the memory-efficient kernel; each
# ratio is against the faster baseline run at that point.
#
# Output in $OUT (default /tmp/out): epic_B<b>_C<c>.json (one per EPIC run), torch_ref.json and
# torch_ref_<backend>.json (one per baseline run), log.txt (every stderr and the GPU state) and
# summary.json, which embeds all of the above JSON (the device tool brings back at most 8 files:
# the default grid makes exactly 8; with more points only summary.json is sure to hold everything).
# summary.json is also printed last on stdout, after a short table. Ratios are EPIC / baseline:
# prefill tokens/s, and decode tokens/s computed the same way on both sides (batch / p50 step).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
START=$(date +%s)
TOTAL_SECONDS=${TOTAL_SECONDS:-530}
EPIC_TIMEOUT=${EPIC_TIMEOUT:-100}
TORCH_RESERVE=${TORCH_RESERVE:-240}
TORCH_SDPA=${TORCH_SDPA:-default efficient}
LAYERS=${LAYERS:-4}
EXPERTS=${EXPERTS:-0}
DECODE_STEPS=${DECODE_STEPS:-8}
MODEL_DIR=${MODEL_DIR:-bench/configs/deepseek-v3-671b}
BIN=${EPIC_BENCH_MODEL:-build-gpu/bench/bench_model}
PY=${PYTHON:-python3}
if [ -z "${POINTS:-}" ]; then
  if [ -n "${BATCHES:-}${CTXS:-}" ]; then
    POINTS=""
    for c in ${CTXS:-1024}; do for b in ${BATCHES:-1 32 128}; do POINTS="$POINTS ${b}x${c}"; done; done
  else
    POINTS="1x1024 32x1024 128x1024 32x8192"
  fi
fi
LOG=$OUT/log.txt
RCS=$(mktemp)
left() { echo $((TOTAL_SECONDS - ($(date +%s) - START))); }

{
  echo "== gpu_model_bench $(date -u +%FT%TZ) points: $POINTS layers=$LAYERS experts=$EXPERTS"
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,driver_version --format=csv
} >> "$LOG" 2>&1

EXP_ARG=()
[ "$EXPERTS" != 0 ] && EXP_ARG=(--num-experts "$EXPERTS")

for p in $POINTS; do
  B=${p%x*}
  C=${p#*x}
  f=$OUT/epic_B${B}_C${C}.json
  if [ ! -x "$BIN" ]; then
    echo "$B $C missing" >> "$RCS"
    echo "== epic B=$B C=$C: $BIN not found or not executable" >> "$LOG"
    continue
  fi
  t=$(($(left) - TORCH_RESERVE))
  [ "$t" -gt "$EPIC_TIMEOUT" ] && t=$EPIC_TIMEOUT
  if [ "$t" -lt 20 ]; then
    echo "$B $C skipped" >> "$RCS"
    echo "== epic B=$B C=$C: skipped, ${t}s left before the baseline's reserve" >> "$LOG"
    continue
  fi
  echo "== epic B=$B C=$C (timeout ${t}s)" >> "$LOG"
  s0=$(date +%s)
  timeout "$t" "$BIN" --device cuda --model "$MODEL_DIR" --load-format dummy --num-layers "$LAYERS" \
    ${EXP_ARG[@]+"${EXP_ARG[@]}"} --batch "$B" --prompt-len "$C" --decode-steps "$DECODE_STEPS" ${EPIC_ARGS:-} \
    > "$f" 2>> "$LOG"
  rc=$?
  echo "$B $C $rc" >> "$RCS"
  echo "== epic B=$B C=$C rc=$rc in $(($(date +%s) - s0))s" >> "$LOG"
  echo "epic B=$B C=$C rc=$rc" >&2
done

# One baseline run per SDPA backend: torch's default choice (cuDNN on Hopper, which rebuilds its
# graph for every new KV length) and the memory-efficient kernel; ratios use the faster run.
set -- $TORCH_SDPA
TRCS=""
TP=$(echo $POINTS | tr ' ' ',')
for sb in "$@"; do
  n=$#; shift
  tmax=$(( ($(left) - 30) / (n > 0 ? n : 1) ))
  [ "$tmax" -lt 90 ] && tmax=90
  f=$OUT/torch_ref.json
  [ "$sb" != default ] && f=$OUT/torch_ref_$sb.json
  echo "== torch_ref sdpa=$sb (max-seconds $tmax)" >> "$LOG"
  PYTHONUNBUFFERED=1 timeout $((tmax + 60)) "$PY" bench/bench_torch_ref.py --num-layers "$LAYERS" \
    --num-experts "$EXPERTS" --points "$TP" --decode-steps "$DECODE_STEPS" --max-seconds "$tmax" \
    --sdpa-backend "$sb" > "$f" 2>> "$LOG"
  trc=$?
  TRCS="$TRCS $sb=$trc"
  echo "== torch_ref sdpa=$sb rc=$trc, $(($(date +%s) - START))s since start" >> "$LOG"
  echo "torch_ref sdpa=$sb rc=$trc" >&2
done

"$PY" - "$OUT" "$RCS" "$TRCS" "$LAYERS" "$EXPERTS" "$POINTS" <<'EOF'
import json, os, sys

out, rcs_path, trcs, layers, experts, points = sys.argv[1:7]
def last_json(path):
    """The last line of a file that parses as a JSON object, or None."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None

def decode_tps(j):
    """batch / p50 step time, the same definition on both sides; EPIC's own mean-based figure otherwise."""
    if not j:
        return None
    b, p50 = j.get("batch"), (j.get("decode_step_ms") or {}).get("p50")
    if b and p50:
        return b / (p50 / 1e3)
    return j.get("decode_tokens_per_s")

def ratio(a, b):
    return round(a / b, 4) if a and b else None

rcs = {}
for line in open(rcs_path):
    f = line.split()
    rcs[(int(f[0]), int(f[1]))] = int(f[2]) if f[2].lstrip("-").isdigit() else f[2]
torch_rcs = {k: int(v) for k, v in (x.split("=") for x in trcs.split())}
torch_raw = {}
for sb in torch_rcs:
    j = last_json(os.path.join(out, "torch_ref.json" if sb == "default" else f"torch_ref_{sb}.json"))
    if j:
        torch_raw[sb] = j
tpts = {sb: {(p["batch"], p["ctx"]): p for p in j.get("points", [])} for sb, j in torch_raw.items()}

def best(b, c, key):
    """(value, sdpa backend) of the fastest baseline run at this point, or (None, None)."""
    vals = [((tpts[sb].get((b, c)) or {}).get(key), sb) for sb in tpts]
    vals = [v for v in vals if v[0]]
    return max(vals) if vals else (None, None)

rows, epic_raw = [], []
for item in points.split():
    b, c = (int(x) for x in item.lower().split("x"))
    e = last_json(os.path.join(out, f"epic_B{b}_C{c}.json"))
    if e:
        epic_raw.append(e)
    (tp, tp_sb), (td, td_sb) = best(b, c, "prefill_tokens_per_s"), best(b, c, "decode_tokens_per_s")
    ed, ep = decode_tps(e), (e or {}).get("prefill_tokens_per_s")
    by = {}
    for sb in tpts:
        t = tpts[sb].get((b, c))
        by[sb] = None if t is None else {
            "prefill_tokens_per_s": t.get("prefill_tokens_per_s"), "decode_tokens_per_s_p50": t.get("decode_tokens_per_s"),
            "prefill_chunk": t.get("prefill_chunk"), "decode_step_ms_p50": (t.get("decode_step_ms") or {}).get("p50"),
            "oom": t.get("oom"), "oom_phase": t.get("oom_phase"), "skipped": t.get("skipped"), "error": t.get("error")}
    rows.append({
        "batch": b, "ctx": c,
        "epic": {"rc": rcs.get((b, c)), "prefill_tokens_per_s": ep, "decode_tokens_per_s_p50": ed and round(ed, 2),
                 "decode_tokens_per_s_mean": (e or {}).get("decode_tokens_per_s"),
                 "decode_step_ms_p50": ((e or {}).get("decode_step_ms") or {}).get("p50")},
        "torch": {"prefill_tokens_per_s": tp, "prefill_sdpa": tp_sb, "decode_tokens_per_s_p50": td, "decode_sdpa": td_sb},
        "torch_by_sdpa": by,
        "ratio_epic_over_torch": {"prefill": ratio(ep, tp), "decode": ratio(ed, td)},
    })
any_raw = next(iter(torch_raw.values()), {})
summary = {"bench": "gpu_model", "device": any_raw.get("device"), "layers": int(layers),
           "experts": int(experts) or any_raw.get("experts"), "torch_rc": torch_rcs,
           "baseline": None if not any_raw else {k: any_raw.get(k) for k in
                       ("torch", "transformers", "dtype", "attn_implementation", "experts_implementation", "cache")},
           "note": "torch = the faster of the baseline runs (one per SDPA backend) for each point and metric; "
                   "decode tokens/s = batch / p50 step time on both sides",
           "points": rows, "epic_raw": epic_raw, "torch_raw": torch_raw}
fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) and v < 10 else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v))
print(f"{'B':>5} {'ctx':>6} | {'epic pre':>10} {'torch pre':>10} {'ratio':>6} | {'epic dec':>9} {'torch dec':>9} {'ratio':>6} | torch note")
for r in rows:
    t = r["torch"]
    notes = []
    for sb, x in r["torch_by_sdpa"].items():
        x = x or {}
        n = "oom:" + str(x.get("oom_phase")) if x.get("oom") else "skipped" if x.get("skipped") else (x.get("error") or "")[:30]
        if n:
            notes.append(f"{sb}:{n}")
    note = f"pre={t['prefill_sdpa']} dec={t['decode_sdpa']} " + " ".join(notes)
    print(f"{r['batch']:>5} {r['ctx']:>6} | {fmt(r['epic']['prefill_tokens_per_s']):>10} {fmt(t.get('prefill_tokens_per_s')):>10} "
          f"{fmt(r['ratio_epic_over_torch']['prefill']):>6} | {fmt(r['epic']['decode_tokens_per_s_p50']):>9} "
          f"{fmt(t.get('decode_tokens_per_s_p50')):>9} {fmt(r['ratio_epic_over_torch']['decode']):>6} | epic rc={r['epic']['rc']} {note}")
s = json.dumps(summary)
open(os.path.join(out, "summary.json"), "w").write(s + "\n")
print(s)
EOF
rm -f "$RCS"
