#!/bin/sh
# Usage: test_comm_fail.sh MPIEXEC PROG BACKEND [die|hang]
# die:  rank 2 of 3 exits in the middle of an alltoallv; mpirun must end the job.
# hang: rank 2 stops taking part (ucx only); the survivors' timeout (5 s) must fire and
#       name rank 2, and their non-zero exit makes mpirun end the job.
# Either way the job must end within 60 s with a non-zero status and a message naming
# rank 2.
mpiexec=$1 prog=$2 backend=$3 mode=${4:-die}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
timeout -k 5 60 "$mpiexec" -np 3 --oversubscribe "$prog" "$backend" "$mode" >"$log" 2>&1
rc=$?
end=$(date +%s)
cat "$log"
echo "--- backend $backend, mode $mode: exit $rc after $((end - start)) s"
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
