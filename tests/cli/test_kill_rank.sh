#!/usr/bin/env bash
# A rank that dies in the middle of `mpirun -np 3 epic generate --requests ...`
# must end the whole job with a non-zero status and a message naming the rank,
# within a bounded time (no hang).
#   kill: SIGKILL (the launcher sees the death);
#   stop: SIGSTOP, the rank is alive but unreachable (ucx only: the survivors
#         5 s comm timeout must end the job; it names the rank when it fires in
#         an all-to-all, see the pattern below).
# Usage: test_kill_rank.sh EPIC FIXTURES MPIEXEC BACKEND [kill|stop]
set -u
EPIC="$1"
FX="$2"
MPIEXEC="$3"
BACKEND="$4"
MODE="${5:-kill}"
SIGNAL=KILL
if [ "$MODE" = stop ]; then
  SIGNAL=STOP
  export EPIC_COMM_TIMEOUT_MS=5000
fi
VICTIM=1
BOUND=60
# Start-up and loading of 3 ranks: seconds normally, a minute or more for
# sanitizer builds on a loaded 2-core machine (deadline, not a wait).
LOAD_BOUND=150
tmp=$(mktemp -d /tmp/epic-kill-XXXXXX)
job=
victim=
# descendants PID: every process below PID (timeout -> mpirun -> ranks).
descendants() {
  local c
  for c in $(cat "/proc/$1/task/$1/children" 2>/dev/null); do
    echo "$c"
    descendants "$c"
  done
}
# stop_job: TERM to `timeout`, which passes it on to mpirun (which takes its ranks
# down); KILL what is left after 10 s. (A bare KILL of `timeout` would leave mpirun
# and three ranks generating 30000 tokens each on the machine.)
stop_job() {
  local pids
  pids=$(descendants "$job") # before they lose their parent
  kill -TERM "$job" 2>/dev/null
  for _ in $(seq 1 100); do
    kill -0 "$job" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 $pids "$job" 2>/dev/null
  wait "$job" 2>/dev/null
}
cleanup() {
  [ -n "$victim" ] && kill -CONT "$victim" 2>/dev/null
  [ -n "$job" ] && stop_job
  rm -rf "$tmp"
}
trap cleanup EXIT

# Long generations: the job would run for minutes if nobody died.
for i in 1 2 3; do
  printf '{"prompt_ids":[0,%d,%d,%d],"max_new_tokens":30000,"ignore_eos":true}\n' $((i * 7)) $((i * 11)) $((i * 13))
done >"$tmp/req.jsonl"

# Info logging: rank 0 reports the end of loading (see the wait below).
export EPIC_LOG_LEVEL=info
# A tag in the environment tells this job's ranks from any other test's.
export EPIC_KILL_TEST_TAG="$$-$RANDOM"
timeout -k 5 $((LOAD_BOUND + BOUND + 60)) "$MPIEXEC" -np 3 --oversubscribe "$EPIC" generate --model "$FX/tiny-bf16" \
  --requests "$tmp/req.jsonl" --comm "$BACKEND" --kv-pages 480 >"$tmp/log" 2>&1 &
job=$!

# rank_pid R: the pid of this job's rank R (from /proc/PID/environ; the tag
# guards against a process that is not one of our ranks).
rank_pid() {
  local p vars
  for p in $(descendants "$job"); do
    vars=$({ tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null) || continue
    if echo "$vars" | grep -qx "EPIC_KILL_TEST_TAG=$EPIC_KILL_TEST_TAG" &&
       echo "$vars" | grep -qx "OMPI_COMM_WORLD_RANK=$1"; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

victim=
for _ in $(seq 1 300); do
  victim=$(rank_pid "$VICTIM") && [ -n "$(rank_pid 0)" ] && break
  victim=
  kill -0 "$job" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$victim" ]; then
  cat "$tmp/log"
  echo "FAIL: rank $VICTIM of the job never appeared"
  exit 1
fi
# Wait until the job is past MPI_Init and the model is loaded (rank 0's "loaded
# layer" line: loading starts only after every rank created the comm). A rank
# stopped inside MPI_Init hangs the others in Open MPI's start-up exchange, which
# no EPIC timeout can cover; on a loaded machine start-up takes seconds.
deadline=$((SECONDS + LOAD_BOUND))
while ! grep -q "loaded layer" "$tmp/log"; do
  if ! kill -0 "$job" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    cat "$tmp/log"
    echo "FAIL: the job did not finish loading within $LOAD_BOUND s"
    exit 1
  fi
  sleep 0.1
done
# Let generation run for a while.
sleep 2
if ! kill -0 "$job" 2>/dev/null; then
  cat "$tmp/log"
  echo "FAIL: the job ended before the kill (it must still be generating)"
  exit 1
fi
echo "SIG$SIGNAL to rank $VICTIM (pid $victim)"
start=$(date +%s)
kill -s "$SIGNAL" "$victim"
# The job must end within BOUND s: poll, so that a hang fails (and is cleaned up)
# at the bound instead of at the outer timeout.
while kill -0 "$job" 2>/dev/null && [ $(($(date +%s) - start)) -le "$BOUND" ]; do
  sleep 0.2
done
if kill -0 "$job" 2>/dev/null; then
  cat "$tmp/log"
  echo "FAIL: the job did not end within $BOUND s of the signal"
  exit 1
fi
wait "$job"
rc=$?
job=
elapsed=$(($(date +%s) - start))
cat "$tmp/log"
echo "--- backend $BACKEND, $MODE: exit $rc, $elapsed s after the signal"
if [ "$rc" -eq 0 ]; then echo "FAIL: job exited 0 although rank $VICTIM died"; exit 1; fi
# (mpirun itself exits 137 = 128 + SIGKILL when a rank was killed: only the
# time and timeout's own 124 tell a hang.)
if [ "$rc" -eq 124 ] || [ "$elapsed" -gt "$BOUND" ]; then
  echo "FAIL: the job did not end within $BOUND s"
  exit 1
fi
# Open MPI: "process rank 1 with PID ..." / "Process name: [[jobid,1],1]";
# EPIC's ucx backend: "pending with rank(s) 1", "rank 1 is unreachable".
if [ "$MODE" = stop ]; then
  # A silent peer is named when the survivors notice it in a point-to-point
  # exchange (the MoE all-to-alls); when they notice it inside a collective
  # (step plan broadcast, reply gather) only the time-out itself can be said.
  pattern="pending with rank\(s\) $VICTIM\b|rank $VICTIM is unreachable|a peer is stopped or unreachable"
else
  pattern="\[\[[0-9]+,[0-9]+\],$VICTIM\]|process rank $VICTIM |rank $VICTIM[ :]"
fi
if grep -Eq "$pattern" "$tmp/log"; then
  echo "PASS"
  exit 0
fi
echo "FAIL: no message naming rank $VICTIM"
exit 1
