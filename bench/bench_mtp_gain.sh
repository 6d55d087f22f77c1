#!/usr/bin/env bash
# What MTP drafting gains end to end when drafts are accepted: `epic batch` on dummy
# weights whose MTP layer mostly drafts right (--load-format dummy-mtp) from a config
# (e.g. the real 671B one cut to LAYERS layers), N greedy requests together, three runs
# in one command:
#   plain:     --mtp-draft off                           (a GPU's default: fast)
#   mtp:       --mtp-draft auto                          (a GPU's default: invariant)
#   invariant: --mtp-draft off --precision invariant     (the same numerics, no drafts)
# Prints one JSON object: per run seconds, completion tokens/s, acceptance, tokens per
# verify step, engine steps and where the seconds went (model forwards, the MTP layer's,
# step-graph recording; from --stats-json, model load excluded), the gains mtp / plain
# and mtp / invariant, and whether mtp's records equal invariant's (they must). Gains
# and the extrapolation below count steady_seconds, the seconds without step-graph
# recording (a server records a bucket's graph once and replays it for hours; in short
# GPU runs they can be a large part of the time).
# LAYERS=A,B (A < B, both past the config's first_k_dense_replace) runs both cuts and
# also extrapolates every run's seconds linearly in the layer count to the config's
# num_hidden_layers ("extrapolated"): a cut model overstates the MTP layer's share of a
# step (one MTP layer per B layers instead of per 61), so only that says what the whole
# model gains when it does not fit the GPUs at hand.
#
#   bench/bench_mtp_gain.sh EPIC CONFIG_DIR TOKENIZER_DIR [LAYERS=4] [N=32] [MAX_TOKENS=64]
#                           [PROMPT_LEN=256] [EXTRA epic batch FLAGS...]
# e.g. on a GPU: bench/bench_mtp_gain.sh build/coordinator/epic bench/configs/deepseek-v3-671b
#   ../shared/fixtures/tokenizer 6,10 32 128 64 --device cuda
# (on a CPU: ../shared/fixtures/tiny-fp8 ../shared/fixtures/tiny-tokenizer 3 8 32 16)
set -eu
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
if [ $# -lt 3 ]; then
  sed -n '22,26p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
EPIC="$1" CFG="$2" TOK="$3"
LAYERS="${4:-4}" N="${5:-32}" MAXTOK="${6:-64}" PLEN="${7:-256}"
shift $(($# < 7 ? $# : 7))
python3 - "$CFG/config.json" "$LAYERS" <<'PY' || exit 2
import json, sys
dense = json.load(open(sys.argv[1])).get("first_k_dense_replace", 0)
cuts = [int(x) for x in sys.argv[2].split(",") if x.isdigit()]
if len(cuts) != len(sys.argv[2].split(",")) or not 1 <= len(cuts) <= 2 or min(cuts) < 1 or (
        len(cuts) == 2 and not dense < cuts[0] < cuts[1]):
    sys.exit("bench_mtp_gain.sh: LAYERS %r: one count, or A,B with %d (first_k_dense_replace)"
             " < A < B" % (sys.argv[2], dense))
PY
tmp=$(mktemp -d /tmp/epic-bench-mtp-gain-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
SCRIPT=bench_mtp_gain.sh
. "$(dirname "$0")/batch_common.sh"
bench_model "$CFG" "$TOK" || exit 1
bench_requests "$CFG" "$N" "$MAXTOK" "$PLEN" >"$tmp/in.jsonl" || exit 1
run() { # LAYERS NAME FLAGS...
  local layers="$1" name="$1/$2"
  shift 2
  mkdir -p "$tmp/$layers"
  bench_batch "$name" "$tmp/in.jsonl" --load-format dummy-mtp --num-layers "$layers" \
    --max-batch "$N" "$@"
}
for l in ${LAYERS//,/ }; do
  run "$l" plain --mtp-draft off "$@"
  run "$l" mtp --mtp-draft auto "$@"
  run "$l" invariant --mtp-draft off --precision invariant "$@"
done
python3 - "$tmp" "$LAYERS" "$N" "$MAXTOK" "$PLEN" "$CFG/config.json" <<'PY'
import json, os, sys
d = sys.argv[1]
cfg = json.load(open(sys.argv[6]))
cuts = [int(x) for x in sys.argv[2].split(",")]
def stats(name):
    s = json.load(open(os.path.join(d, name + ".json")))
    return {"seconds": s["seconds"], "completion_tokens": s["completion_tokens"],
            "completion_tokens_per_s": round(s["completion_tokens_per_s"], 1),
            "mtp_acceptance_rate": s["mtp_acceptance_rate"] if s["mtp_drafted"] else None,
            "mtp_tokens_per_verify_step": s["mtp_mean_accepted"] if s["mtp_drafted"] else None,
            "mtp_stopped": s["mtp_stopped"], "steps": s["steps"],
            "forward_seconds": s["forward_seconds"],
            "mtp_forward_seconds": s["mtp_forward_seconds"],
            "graph_record_seconds": s["graph_record_seconds"],
            "steady_seconds": round(s["seconds"] - s["graph_record_seconds"], 6),
            "steady_completion_tokens_per_s":
                round(s["completion_tokens"] / (s["seconds"] - s["graph_record_seconds"]), 1)}
def records(name):
    out = {}
    for line in open(os.path.join(d, name + ".jsonl")):
        r = json.loads(line)
        out[r["custom_id"]] = r["response"]["body"]["choices"]
    return out
def gains(runs):
    tps = {n: runs[n]["steady_completion_tokens_per_s"] for n in runs}
    return {"gain_mtp_over_plain": round(tps["mtp"] / tps["plain"], 3),
            "gain_mtp_over_invariant": round(tps["mtp"] / tps["invariant"], 3)}
modes = ("plain", "mtp", "invariant")
out = {"bench": "mtp_gain", "requests": int(sys.argv[3]), "max_tokens": int(sys.argv[4]),
       "prompt_len": int(sys.argv[5])}
for l in cuts:
    runs = {n: stats("%d/%s" % (l, n)) for n in modes}
    one = {"layers": l, "runs": runs, **gains(runs),
           "mtp_records_equal_invariant": records("%d/mtp" % l) == records("%d/invariant" % l)}
    if len(cuts) == 1:
        out.update(one)
    else:
        out.setdefault("cuts", []).append(one)
if len(cuts) == 2:  # seconds linear in the layer count past the dense layers
    full = cfg["num_hidden_layers"]
    a, b = out["cuts"]
    runs = {}
    for n in modes:
        sa, sb = a["runs"][n]["steady_seconds"], b["runs"][n]["steady_seconds"]
        sec = sb + (sb - sa) / (cuts[1] - cuts[0]) * (full - cuts[1])
        runs[n] = {"steady_seconds": round(sec, 4),
                   "steady_completion_tokens_per_s":
                       round(b["runs"][n]["completion_tokens"] / sec, 1)}
    out["extrapolated"] = {"layers": full, "runs": runs, **gains(runs)}
    out["mtp_records_equal_invariant"] = all(c["mtp_records_equal_invariant"] for c in out["cuts"])
print(json.dumps(out))
PY
