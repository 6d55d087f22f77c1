#!/bin/bash
# The full-scale DeepSeek-V3 run (issue #8) on one GPU node: the real 671B configuration
# with random weights (--load-format dummy), experts spread over NP GPUs with NCCL.
#   1. `epic plan` of the full model for NP ranks of MEM bytes (memory per GPU predicted);
#   2. `epic bench` decode/prefill throughput with and without two-micro-batch overlap;
# (`epic serve` under the same mpirun line serves it; a GPU node without gRPC builds
# the engine without the gateway, see deploy/README.md.)
# On fewer or smaller GPUs than 8 x H200 set LAYERS to what fits (the plan step says):
#   NP=2 LAYERS=8 deploy/fullscale.sh      (2 GPUs: 3 dense + 5 MoE layers)
#   NP=8 deploy/fullscale.sh               (8 x H200: all 61 layers + MTP)
# Environment: EPIC (binary, default build-gpu/coordinator/epic), NP (default: all GPUs),
# MEM (per GPU, default 141GB), LAYERS (default: the config's 61), BATCH (cluster-wide
# sequences, default 64 per GPU), PROMPT (default 2048), GEN (default 16), OUT (JSON and
# logs, default /tmp/out).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
EPIC=${EPIC:-build-gpu/coordinator/epic}
MODEL=bench/configs/deepseek-v3-671b
NP=${NP:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MEM=${MEM:-141GB}
BATCH=${BATCH:-$((64 * NP))}
PROMPT=${PROMPT:-2048}
GEN=${GEN:-16}
LAYER_ARGS=()
[ -n "${LAYERS:-}" ] && LAYER_ARGS=(--num-layers "$LAYERS")

# The plan is for the whole model (the prediction to hold the full run against); a run
# with LAYERS set is checked by --mem-per-rank for its own, smaller config.
echo "== plan: $NP ranks x $MEM, all layers"
"$EPIC" plan --model "$MODEL" --ranks "$NP" --gpu-mem "$MEM" > "$OUT/plan.txt" 2>&1
echo "plan rc=$?"; tail -5 "$OUT/plan.txt"

echo "== bench: batch $BATCH, prompt $PROMPT, gen $GEN, micro-batches 1,2"
timeout "${BENCH_TIMEOUT:-500}" mpirun --oversubscribe -np "$NP" "$EPIC" bench --model "$MODEL" \
  --load-format dummy "${LAYER_ARGS[@]}" --device cuda --comm nccl --mem-per-rank "$MEM" \
  --batch "$BATCH" --prompt-len "$PROMPT" --gen "$GEN" --step-tokens "${STEP_TOKENS:-8192}" \
  --micro-batches 1,2 > "$OUT/bench.json" 2> "$OUT/bench.err"
echo "bench rc=$?"; tail -c 3000 "$OUT/bench.json"; grep -iE "error|fail" "$OUT/bench.err" | head -5
