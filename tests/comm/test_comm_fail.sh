#!/bin/sh
# Usage: test_comm_fail.sh MPIEXEC PROG BACKEND [die|hang]
# die:  rank 2 of 3 exits in the middle of an alltoallv; mpirun must end the job.
# hang: rank 2 stops taking part (ucx only); the survivors' timeout (5 s) must fire and
#       name rank 2, and their non-zero exit makes mpirun end the job.
# Either way the job must end within BOUND s of the failure with a non-zero status and
# a message naming rank 2. The bound counts from rank 2's "simulated crash/hang" line,
# not from the launch: Open MPI start-up of 3 sanitizer-built ranks on a loaded 2-core
# machine alone can take tens of seconds.
mpiexec=$1 prog=$2 backend=$3 mode=${4:-die}
BOUND=60
log=$(mktemp)
job=
# timeout forwards TERM to mpirun, which takes its ranks down with it.
trap '[ -n "$job" ] && kill -TERM "$job" 2>/dev/null; rm -f "$log"' EXIT
start=$(date +%s)
# Safety net only (a hang in start-up, which no EPIC timeout covers).
timeout -k 5 170 "$mpiexec" -np 3 --oversubscribe "$prog" "$backend" "$mode" >"$log" 2>&1 &
job=$!
failed_at=
while kill -0 "$job" 2>/dev/null; do
  if [ -z "$failed_at" ] && grep -Eq "simulated (crash|hang) in round" "$log"; then
    failed_at=$(date +%s)
  fi
  if [ -n "$failed_at" ] && [ $(($(date +%s) - failed_at)) -gt "$BOUND" ]; then
    break
  fi
  sleep 0.1
done
if kill -0 "$job" 2>/dev/null; then
  cat "$log"
  echo "FAIL: job hung: still running $BOUND s after rank 2 failed"
  exit 1
fi
wait "$job"
rc=$?
job=
end=$(date +%s)
# (mpirun may drop the line of a rank that died at once: then from the launch)
[ -n "$failed_at" ] || failed_at=$start
cat "$log"
echo "--- backend $backend, mode $mode: exit $rc, $((end - failed_at)) s after rank 2 failed ($((end - start)) s in all)"
if [ "$rc" -eq 0 ]; then echo "FAIL: job exited 0 although rank 2 died"; exit 1; fi
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "FAIL: job hung (killed by timeout)"; exit 1; fi
# Open MPI names the rank as "Process name: [[jobid,1],2]" or "process rank 2"; the ucx
# timeout says "pending with rank(s) 2".
if [ "$mode" = hang ]; then
  pattern='pending with rank\(s\) 2'
else
  pattern='\[\[[0-9]+,[0-9]+\],2\]|process rank 2|rank 2 '
fi
if grep -Eq "$pattern" "$log"; then
  echo "PASS"
  exit 0
fi
echo "FAIL: no message naming rank 2"
exit 1
