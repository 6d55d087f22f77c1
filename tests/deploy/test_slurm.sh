#!/usr/bin/env bash
# A real Slurm on this machine: munged (or auth/none), slurmctld and slurmd on
# localhost with a generated slurm.conf, started here and stopped on every exit path.
# Through it, a 2-rank `epic generate` on the fixture model must give the single-process
# output: once with `deploy/epic-launch --slurm` (srun --mpi=pmix) and once with
# `sbatch deploy/slurm/epic.sbatch`.
# Usage: test_slurm.sh EPIC FIXTURES_DIR. Exit 77 (skip) only without Slurm or root.
# EPIC_SLURM_TEST_AUTH=munge|none picks the authentication (default: munge when munged exists).
set -u
EPIC="$1"
FX="$2"
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
launch="$root/deploy/epic-launch"
model="$FX/tiny-bf16"

for b in slurmctld slurmd srun sbatch scontrol sinfo squeue scancel python3; do
  command -v "$b" >/dev/null 2>&1 || { echo "SKIP: $b not found (apt-get install slurmctld slurmd slurm-client)"; exit 77; }
done
[ "$(id -u)" = 0 ] || { echo "SKIP: the local Slurm daemons need root"; exit 77; }

# Nothing of an outer Slurm job may leak into this one.
for v in $(compgen -e | grep '^SLURM_'); do unset "$v"; done

tmp=$(mktemp -d /tmp/epic-slurm-XXXXXX)
chmod 755 "$tmp"
pids=()
export SLURM_CONF="$tmp/slurm.conf"
# Each daemon runs in the foreground under `timeout`: stopped by the trap below, and
# gone after $life seconds even if this script is SIGKILLed (a CTest timeout).
life=480

cleanup() {
  local p i
  if [ -f "$SLURM_CONF" ] && [ ${#pids[@]} -gt 0 ]; then
    timeout 5 scancel --quiet --full --user=root >/dev/null 2>&1 || true
    for i in $(seq 50); do
      [ -z "$(timeout 2 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
# Long steps run in the background and are waited for, so that a signal reaches the
# trap at once instead of after the step.
bg() { "$@" & wait $!; }

fail() {
  echo "FAILED - $*"
  local f
  for f in "$tmp"/log/*.log; do
    [ -f "$f" ] || continue
    echo "---- $(basename "$f") (last lines)"
    tail -n 15 "$f"
  done
  exit 1
}

# Two free TCP ports for slurmctld and slurmd (another CI job may run its own Slurm).
read -r port_ctld port_d < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')

auth=${EPIC_SLURM_TEST_AUTH:-}
if [ -z "$auth" ]; then
  if command -v munged >/dev/null 2>&1; then auth=munge; else auth=none; fi
fi
mkdir -p "$tmp/state" "$tmp/spool" "$tmp/log" "$tmp/munge"
case "$auth" in
  munge)
    command -v mungekey >/dev/null 2>&1 || fail "munge authentication needs mungekey"
    chmod 700 "$tmp/munge"
    mungekey --create --keyfile="$tmp/munge/munge.key" || fail "mungekey"
    chmod 600 "$tmp/munge/munge.key"
    # --force: munged as root, in a directory it does not own the usual way.
    timeout "$life" munged --foreground --force --socket="$tmp/munge/munge.sock" --key-file="$tmp/munge/munge.key" \
      --pid-file="$tmp/munge/munged.pid" --log-file="$tmp/log/munged.log" \
      --seed-file="$tmp/munge/munged.seed" 2>>"$tmp/log/munged.log" &
    pids+=($!)
    for i in $(seq 50); do [ -S "$tmp/munge/munge.sock" ] && break; sleep 0.1; done
    [ -S "$tmp/munge/munge.sock" ] || fail "munged did not create its socket"
    auth_conf="AuthType=auth/munge
AuthInfo=socket=$tmp/munge/munge.sock
CredType=cred/munge"
    ;;
  none)
    auth_conf="AuthType=auth/none
CredType=cred/none"
    ;;
  *) fail "EPIC_SLURM_TEST_AUTH must be munge or none, not '$auth'" ;;
esac

host=$(hostname -s)
# The node line must match the hardware exactly or slurmd registers it as invalid;
# `slurmd -C` prints what slurmd itself detects (nproc would follow OMP_NUM_THREADS).
hw=$(slurmd -C 2>/dev/null | head -n1 | tr ' ' '\n' |
     grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
[ -n "$hw" ] || fail "slurmd -C printed no hardware description"
# No cgroups (containers and CI VMs rarely delegate them): pgid process tracking, no task
# plugin, no accounting. cons_tres with CR_Core lets the two ranks share the node.
cat >"$SLURM_CONF" <<EOF
ClusterName=epictest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port_ctld
SlurmdPort=$port_d
SlurmUser=root
SlurmdUser=root
$auth_conf
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MailProg=/bin/true
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=epic0 NodeHostname=$host NodeAddr=127.0.0.1 ${hw}State=UNKNOWN
PartitionName=epic Nodes=epic0 Default=YES MaxTime=INFINITE State=UP
EOF

timeout "$life" slurmctld -D -i -f "$SLURM_CONF" 2>>"$tmp/log/slurmctld.log" &
pids+=($!)
timeout "$life" slurmd -D -f "$SLURM_CONF" -N epic0 2>>"$tmp/log/slurmd.log" &
pids+=($!)
state=""
up_by=$((SECONDS + 90)) # a deadline: slurmd registers within seconds, slower on a loaded machine
while [ "$SECONDS" -lt "$up_by" ]; do
  state=$(timeout 2 sinfo -h -n epic0 -o %t 2>/dev/null)
  [ "$state" = idle ] && break
  sleep 0.2
done
[ "$state" = idle ] || fail "the local Slurm node did not come up (state '${state:-none}')"
echo "ok - local Slurm $(srun --version | awk '{print $2}') up (auth/$auth, ports $port_ctld/$port_d)"

srun --mpi=list >"$tmp/mpilist" 2>&1
grep -qw pmix "$tmp/mpilist" || fail "srun --mpi=list has no pmix: $(tr '\n' ' ' <"$tmp/mpilist")"
echo "ok - srun --mpi=list offers pmix"

gen=(generate --model "$model" --prompt "The capital of France is" --max-new-tokens 6 --ignore-eos --json)
"$EPIC" "${gen[@]}" --dump-logits "$tmp/ref.npy" >"$tmp/ref.json" 2>"$tmp/ref.err" || fail "single-process generate: $(cat "$tmp/ref.err")"

# 1. epic-launch --slurm: srun --mpi=pmix creates the allocation itself.
start=$SECONDS
bg timeout 150 "$launch" --slurm --np 2 --cpu --epic "$EPIC" --launcher-arg --immediate=30 -- "${gen[@]}" --comm mpi -v \
  --dump-logits "$tmp/srun.npy" >"$tmp/srun.json" 2>"$tmp/srun.err" ||
  fail "epic-launch --slurm (exit $?): $(tail -n 5 "$tmp/srun.err")"
# Rank 1's log lines prove one MPI world of two (PMIx singletons would both be rank 0).
grep -q '^epic\[1\]' "$tmp/srun.err" || fail "no rank 1 in the srun job's log: $(head -n 5 "$tmp/srun.err")"
python3 "$here/compare_outputs.py" "$tmp/ref.json" "$tmp/ref.npy" "$tmp/srun.json" "$tmp/srun.npy" ||
  fail "srun --mpi=pmix output differs from the single-process output"
echo "ok - epic-launch --slurm: 2-rank generate through srun --mpi=pmix equals one process ($((SECONDS - start)) s)"

# 2. The shipped sbatch script, its #SBATCH GPU request overridden for this CPU node.
start=$SECONDS
EPIC_HOME="$root" EPIC_LAUNCH_ARGS="--cpu --epic $EPIC" bg timeout 150 sbatch --wait --quiet \
  --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --no-requeue \
  --output="$tmp/sbatch.json" --error="$tmp/sbatch.err" --chdir="$tmp" \
  "$root/deploy/slurm/epic.sbatch" "${gen[@]}" --comm mpi -v --dump-logits "$tmp/sbatch.npy" ||
  fail "sbatch --wait epic.sbatch (exit $?): $(tail -n 5 "$tmp/sbatch.err" 2>/dev/null)"
grep -q '^epic\[1\]' "$tmp/sbatch.err" || fail "no rank 1 in the batch job's log: $(head -n 5 "$tmp/sbatch.err")"
python3 "$here/compare_outputs.py" "$tmp/ref.json" "$tmp/ref.npy" "$tmp/sbatch.json" "$tmp/sbatch.npy" ||
  fail "sbatch epic.sbatch output differs from the single-process output"
echo "ok - sbatch deploy/slurm/epic.sbatch: 2-rank generate equals one process ($((SECONDS - start)) s)"
echo "all passed"
