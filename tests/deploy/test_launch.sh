#!/usr/bin/env bash
# deploy/epic-launch: the exact mpirun/srun lines of --dry-run (hostfile, Slurm
# allocation, environment, quoting), the errors a bad layout gets, the rank side's GPU
# binding, and real launches on this machine: a 2-rank `epic generate` through mpirun
# with a localhost hostfile (with its preflight) equal to the single-process output,
# a failing preflight that starts nothing, and, where `epic serve` exists, a 2-rank
# serve reported ready (gRPC health) and drained by SIGTERM.
# Usage: test_launch.sh EPIC FIXTURES_DIR
set -u
EPIC=$(readlink -f "$1")
FX="$2"
here=$(cd "$(dirname "$0")" && pwd)
L=$(readlink -f "$here/../../deploy/epic-launch")
tmp=$(mktemp -d /tmp/epic-launch-XXXXXX)
bgpid=""
cleanup() {
  [ -z "$bgpid" ] || kill -TERM "$bgpid" 2>/dev/null
  [ -z "$bgpid" ] || wait "$bgpid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() {
  fail=$((fail + 1)); echo "FAILED - $1"
  [ -s "$tmp/err" ] && sed 's/^/    /' "$tmp/err" | tail -n 20
  return 0
}
# The environment of the launcher decides what it forwards: start from a known one.
for v in $(compgen -e | grep -E '^(SLURM|NCCL|UCX|EPIC|OPENBLAS)_'); do unset "$v"; done
export OMP_NUM_THREADS=1

# job_line ARGS...: the "# job" command line of a dry run.
job_line() { "$L" --dry-run "$@" 2>"$tmp/err" | sed -n '/^# job$/{n;p}'; }

# ---- dry runs ----
printf 'node1 slots=8\nnode2 slots=8  # second node\n\n' >"$tmp/hosts"
got=$(job_line --epic "$EPIC" --hostfile "$tmp/hosts" --gpus-per-node 8 serve --model /models/R1 --listen 0.0.0.0:50051)
want="mpirun --hostfile $tmp/hosts -np 16 --map-by ppr:8:node --bind-to none $L --rank-exec --mode gpu --numa auto --ranks-per-node 8 --gpus 0,1,2,3,4,5,6,7 --env NCCL_NVLS_ENABLE=0 --env OMP_NUM_THREADS=1 -- $EPIC serve --model /models/R1 --listen 0.0.0.0:50051"
[ "$got" = "$want" ] && ok "dry run: 2 nodes x 8 GPUs from a hostfile" || bad "dry run: 2 nodes x 8 GPUs from a hostfile
    got:  $got
    want: $want"
"$L" --dry-run --epic "$EPIC" --hostfile "$tmp/hosts" --gpus-per-node 8 serve --model /m >"$tmp/out" 2>"$tmp/err"
grep -q -- '--preflight -- ' "$tmp/out" && ok "serve gets a preflight by default" || bad "serve gets a preflight by default"
"$L" --dry-run --epic "$EPIC" --hostfile "$tmp/hosts" --gpus-per-node 8 generate --model /m >"$tmp/out" 2>"$tmp/err"
! grep -q -- '--preflight' "$tmp/out" && ok "generate runs without a preflight" || bad "generate runs without a preflight"

got=$(job_line --epic "$EPIC" --hostfile "$tmp/hosts" --gpus 0,1,2,3 --np 6 --net-if ib0 --ib-hca mlx5_0:1,mlx5_1:1 generate --model /m)
want="mpirun --hostfile $tmp/hosts -np 6 --map-by ppr:4:node --bind-to none --mca btl_tcp_if_include ib0 --mca oob_tcp_if_include ib0 $L --rank-exec --mode gpu --numa auto --ranks-per-node 4 --gpus 0,1,2,3 --env NCCL_NVLS_ENABLE=0 --env NCCL_SOCKET_IFNAME=ib0 --env NCCL_IB_HCA=mlx5_0:1,mlx5_1:1 --env UCX_NET_DEVICES=mlx5_0:1,mlx5_1:1 --env OMP_NUM_THREADS=1 -- $EPIC generate --model /m"
[ "$got" = "$want" ] && ok "dry run: --np, --gpus, NIC and HCA selection" || bad "dry run: --np, --gpus, NIC and HCA selection
    got:  $got
    want: $want"

got=$(NCCL_NVLS_ENABLE=1 NCCL_DEBUG=WARN job_line --epic "$EPIC" --hostfile "$tmp/hosts" --gpus-per-node 8 --env FOO=1 --env FOO=2 batch --model /m)
case "$got" in
  *"--env NCCL_DEBUG=WARN --env NCCL_NVLS_ENABLE=1 --env OMP_NUM_THREADS=1 --env FOO=2 -- $EPIC batch --model /m") ok "the shell's NCCL settings and --env win over defaults" ;;
  *) bad "the shell's NCCL settings and --env win over defaults: $got" ;;
esac

got=$(SLURM_JOB_ID=42 SLURM_JOB_NUM_NODES=2 SLURM_GPUS_ON_NODE=8 job_line --epic "$EPIC" serve --model /m)
want="srun --mpi=pmix --nodes=2 --ntasks=16 --ntasks-per-node=8 --kill-on-bad-exit=1 --cpu-bind=none $L --rank-exec --mode gpu --numa auto --ranks-per-node 8 --env NCCL_NVLS_ENABLE=0 --env OMP_NUM_THREADS=1 -- $EPIC serve --model /m"
[ "$got" = "$want" ] && ok "dry run: inside a Slurm allocation of 2 nodes x 8 GPUs" || bad "dry run: inside a Slurm allocation
    got:  $got
    want: $want"
got=$(job_line --epic "$EPIC" --slurm --np 4 --cpu --numa none --srun-mpi pmix_v4 --launcher-arg --partition=gpu generate --model /m)
want="srun --mpi=pmix_v4 --ntasks=4 --kill-on-bad-exit=1 --partition=gpu $L --rank-exec --mode cpu --numa none --ranks-per-node 0 --env NCCL_NVLS_ENABLE=0 --env OMP_NUM_THREADS=1 -- $EPIC generate --model /m"
[ "$got" = "$want" ] && ok "dry run: srun outside an allocation, CPU workers placed by Slurm" || bad "dry run: srun, CPU workers
    got:  $got
    want: $want"

# Quoting: the printed line, read back by the shell, gives the same arguments.
line=$(job_line --epic "$EPIC" --np 2 --cpu --env "MSG=a b" generate --model "/m x" --prompt "it's \$HOME \"q\"")
eval "args=($line)"
n=${#args[@]}
if [ "${args[0]}" = mpirun ] && [ "${args[$((n - 3))]}" = "/m x" ] && [ "${args[$((n - 1))]}" = "it's \$HOME \"q\"" ] &&
   printf '%s\n' "${args[@]}" | grep -qx "MSG=a b"; then
  ok "dry-run lines are shell-quoted exactly"
else
  bad "dry-run lines are shell-quoted exactly: $line"
fi

# expect_fail NAME PATTERN ARGS...: exit 2, one message matching PATTERN.
expect_fail() {
  local name="$1" pat="$2"; shift 2
  "$L" --dry-run "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ $rc -eq 2 ] && grep -qE -- "$pat" "$tmp/err"; then ok "$name"; else bad "$name (exit $rc, want /$pat/)"; fi
}
expect_fail "too many ranks for the hostfile" "--np 24 at 8 per node needs 3 nodes; .*hosts lists 2" \
  --epic "$EPIC" --hostfile "$tmp/hosts" --gpus-per-node 8 --np 24 serve --model /m
printf 'a slots=8\nb slots=4\n' >"$tmp/hosts2"
expect_fail "a host with fewer slots than GPUs" "host b has slots=4, fewer than 8" \
  --epic "$EPIC" --hostfile "$tmp/hosts2" --gpus-per-node 8 serve --model /m
expect_fail "more ranks per node than GPUs" "--ranks-per-node 4: only 2 GPU" \
  --epic "$EPIC" --gpus 0,1 --ranks-per-node 4 serve --model /m
expect_fail "bad --gpus" "--gpus: expected a list" --epic "$EPIC" --gpus 0,x serve --model /m
expect_fail "unknown option" "unknown option '--frob'" --epic "$EPIC" --frob serve
expect_fail "no command" "no epic command given" --epic "$EPIC"
expect_fail "missing binary" "--epic: '/nonexistent' is not an executable" --epic /nonexistent serve
"$L" --help >"$tmp/out" 2>&1 && grep -q -- "--dry-run" "$tmp/out" && ok "--help" || bad "--help"

# ---- rank side ----
env_of() { env -u CUDA_VISIBLE_DEVICES -u OMP_NUM_THREADS "$@" 2>"$tmp/err"; }
out=$(env_of OMPI_COMM_WORLD_RANK=5 OMPI_COMM_WORLD_LOCAL_RANK=1 "$L" --rank-exec --mode gpu --gpus 3,6 --numa none \
      --ranks-per-node 2 --env FOO=bar -- env)
echo "$out" | grep -qx CUDA_VISIBLE_DEVICES=6 && echo "$out" | grep -qx FOO=bar &&
  ok "rank side: local rank 1 gets the second GPU of --gpus and the --env" || bad "rank side: GPU of local rank 1"
out=$(env_of SLURM_PROCID=3 SLURM_LOCALID=3 CUDA_VISIBLE_DEVICES=7 "$L" --rank-exec --mode gpu --numa none -- env)
echo "$out" | grep -qx CUDA_VISIBLE_DEVICES=7 && ok "rank side: a GPU bound by Slurm (--gpus-per-task) is kept" ||
  bad "rank side: a GPU bound by Slurm is kept"
out=$(env_of SLURM_PROCID=2 SLURM_LOCALID=2 CUDA_VISIBLE_DEVICES=4,5,6,7 "$L" --rank-exec --mode gpu --numa none -- env)
echo "$out" | grep -qx CUDA_VISIBLE_DEVICES=6 && ok "rank side: Slurm's GPU list is indexed by local rank" ||
  bad "rank side: Slurm's GPU list is indexed by local rank"
env_of OMPI_COMM_WORLD_RANK=2 OMPI_COMM_WORLD_LOCAL_RANK=2 "$L" --rank-exec --mode gpu --gpus 0,1 --numa none -- env >/dev/null
rc=$?
[ $rc -eq 1 ] && grep -q "rank 2 (local rank 2) on .*: no GPU for local rank 2" "$tmp/err" &&
  ok "rank side: a rank without a GPU fails naming it" || bad "rank side: a rank without a GPU (exit $rc)"
out=$(env_of CUDA_VISIBLE_DEVICES=0,1 OMPI_COMM_WORLD_LOCAL_RANK=0 "$L" --rank-exec --mode cpu --numa none -- env)
echo "$out" | grep -qx "CUDA_VISIBLE_DEVICES=" && ok "rank side: CPU workers see no GPU" || bad "rank side: CPU workers see no GPU"
ncpu=$(env -u OMP_NUM_THREADS nproc)
want=$((ncpu / 2 > 0 ? ncpu / 2 : 1))
out=$(env_of OMPI_COMM_WORLD_LOCAL_RANK=0 "$L" --rank-exec --mode cpu --numa none --ranks-per-node 2 -- env)
echo "$out" | grep -qx "OMP_NUM_THREADS=$want" && ok "rank side: CPU workers share the cores (OMP_NUM_THREADS=$want)" ||
  bad "rank side: CPU workers share the cores"
out=$(env_of OMPI_COMM_WORLD_LOCAL_RANK=0 "$L" --rank-exec --mode cpu --numa auto --ranks-per-node 1 --verbose -- true)
grep -q "rank 0 (local rank 0) on .*gpu=none numa=" "$tmp/err" && ok "rank side: --verbose reports the binding" ||
  bad "rank side: --verbose reports the binding"

# ---- real launches on this machine ----
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "localhost slots=2" >"$tmp/local"
gen=(generate --model "$FX/tiny-bf16" --prompt "Hello, world" --max-new-tokens 6 --ignore-eos --json)
if "$EPIC" "${gen[@]}" --dump-logits "$tmp/ref.npy" >"$tmp/ref.json" 2>"$tmp/err"; then
  start=$SECONDS
  timeout 120 "$L" --hostfile "$tmp/local" --cpu --preflight --epic "$EPIC" -- "${gen[@]}" --comm mpi -v \
    --dump-logits "$tmp/mpi.npy" >"$tmp/mpi.json" 2>"$tmp/err"
  rc=$?
  if [ $rc -eq 0 ] && grep -q "preflight passed: 2 rank(s) ready" "$tmp/err" && grep -q '^epic\[1\]' "$tmp/err" &&
     python3 "$here/compare_outputs.py" "$tmp/ref.json" "$tmp/ref.npy" "$tmp/mpi.json" "$tmp/mpi.npy"; then
    ok "mpirun -np 2 through epic-launch (hostfile, preflight) equals one process ($((SECONDS - start)) s)"
  else
    bad "mpirun -np 2 through epic-launch (exit $rc)"
  fi
else
  bad "single-process reference generate"
fi

timeout 60 "$L" --hostfile "$tmp/local" --cpu --preflight --epic "$EPIC" -- generate --model "$tmp/nomodel" \
  --prompt-ids 1 >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ] && grep -q "preflight FAILED rank 0 .*$tmp/nomodel/config.json is not readable" "$tmp/err" &&
   grep -q "preflight failed: 0 of 2 rank(s) ready" "$tmp/err" && [ ! -s "$tmp/out" ]; then
  ok "a failing preflight names the rank and the model and starts nothing"
else
  bad "a failing preflight (exit $rc)"
fi

if "$EPIC" serve --help >/dev/null 2>&1; then
  start=$SECONDS
  "$L" --hostfile "$tmp/local" --cpu --epic "$EPIC" --health-timeout 90 serve --model "$FX/tiny-bf16" \
    --listen 127.0.0.1:0 --kv-pages 64 --comm mpi >"$tmp/serve.out" 2>"$tmp/err" &
  bgpid=$!
  for _ in $(seq 100); do
    grep -q '^EPIC gateway listening on ' "$tmp/serve.out" && break
    kill -0 "$bgpid" 2>/dev/null || break
    sleep 1
  done
  addr=$(sed -n 's/^EPIC gateway listening on //p' "$tmp/serve.out")
  if [[ "$addr" =~ ^127\.0\.0\.1:[1-9][0-9]*$ ]] && grep -q "preflight passed: 2 rank(s) ready" "$tmp/err" &&
     grep -q "gateway ready (" "$tmp/err" && timeout 3 bash -c 'exec 3<>"/dev/tcp/${1%:*}/${1##*:}"' _ "$addr"; then
    ok "serve: 2 ranks, preflight, gateway reported at $addr ($(grep -o 'gRPC health[^;]*' "$tmp/err"); $((SECONDS - start)) s)"
  else
    bad "serve: gateway reported (got '$addr')"
  fi
  kill -TERM "$bgpid"
  wait "$bgpid"
  rc=$?
  bgpid=""
  [ $rc -eq 0 ] && grep -q '^epic serve: drained, exiting' "$tmp/serve.out" && ok "serve: SIGTERM drains, exit 0" ||
    bad "serve: SIGTERM drains (exit $rc)"
else
  echo "# epic serve not built (no gRPC): serve launch not checked"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
