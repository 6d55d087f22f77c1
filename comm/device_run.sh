#!/bin/bash
# Build and run the comm layer's tests and the all-to-all benchmark on a GPU machine
# (NCCL backend included) that lacks the project's other dependencies: mpicc over
# common/ and comm/, cmocka unpacked from the Debian .debs in .deps/ (libcmocka0,
# libcmocka-dev; `apt-get download` them there). The CMake build is the normal
# route where every dependency exists.
# Usage (repo root, on the GPU machine): bash comm/device_run.sh [NP]; logs and JSON in $OUT.
set -u
OUT=${OUT:-/tmp/out}
NP=${1:-2}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
D=/tmp/deproot; mkdir -p $D
for f in .deps/libcmocka*.deb; do dpkg -x "$f" $D; done
CUDA=${CUDA_HOME:-/usr/local/cuda}
NCCL_INC=$(dirname "$(find / -name nccl.h -not -path '/proc/*' -not -path '*/.debug/*' 2>/dev/null | head -1)")
NCCL_LIB=$(dirname "$(find / -name 'libnccl.so*' -not -path '/proc/*' -not -path '*/.debug/*' 2>/dev/null | head -1)")
UCX_FLAGS=""; UCX_SRC=""
if pkg-config --exists ucx 2>/dev/null; then
  UCX_FLAGS="-DEPIC_HAVE_UCX $(pkg-config --cflags --libs ucx)"; UCX_SRC=comm/comm_ucx.c
fi
export LD_LIBRARY_PATH=$D/usr/lib/x86_64-linux-gnu:$NCCL_LIB:$CUDA/lib64:${LD_LIBRARY_PATH:-}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "nccl: $NCCL_INC $NCCL_LIB; ucx: ${UCX_SRC:-none}"
  CF="-O2 -g -std=c11 -Wall -Wextra -Wno-unused-parameter -Werror -I. -isystem $CUDA/include -isystem $NCCL_INC -isystem $D/usr/include -DEPIC_HAVE_NCCL"
  SRC="common/status.c common/log.c common/clock.c comm/comm.c comm/comm_mpi.c comm/comm_nccl.c $UCX_SRC"
  LIBS="-L$NCCL_LIB -lnccl -L$CUDA/lib64 -lcudart -lm"
  mpicc $CF $SRC tests/comm/test_comm.c -L$D/usr/lib/x86_64-linux-gnu -lcmocka $LIBS $UCX_FLAGS -o /tmp/test_comm || echo BUILD-FAIL test_comm
  mpicc $CF $SRC bench/bench_a2a.c $LIBS $UCX_FLAGS -o /tmp/bench_a2a || echo BUILD-FAIL bench_a2a
} > $OUT/comm_build.log 2>&1
tail -5 $OUT/comm_build.log
for np in 1 $NP; do
  for b in nccl mpi; do
    timeout 120 mpirun --oversubscribe -np $np /tmp/test_comm $b > $OUT/test_comm_${b}_np$np.log 2>&1
    echo "test_comm $b np$np rc=$?"; grep -E "PASSED|FAILED|SKIPPED" $OUT/test_comm_${b}_np$np.log | tail -3
  done
done
for b in nccl mpi ${UCX_SRC:+ucx}; do
  timeout 200 mpirun --oversubscribe -np $NP /tmp/bench_a2a --backend $b > $OUT/a2a_${b}_np$NP.json 2> $OUT/a2a_${b}_np$NP.err
  echo "bench_a2a $b np$NP rc=$?"; tail -c 600 $OUT/a2a_${b}_np$NP.json; echo
done
