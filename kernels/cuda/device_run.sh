#!/bin/bash
# Build and run the CUDA backend's test and benchmark on a GPU machine that lacks the
# project's other dependencies (MPI, cJSON, PCRE2, cmocka, OpenBLAS): plain nvcc/gcc
# over kernels/ and common/, with OpenBLAS (the CPU reference) and cmocka unpacked from
# Debian .debs in .deps/ (libopenblas0-pthread, libopenblas-pthread-dev, libopenblas-dev,
# libgfortran5, libquadmath0, libcmocka0, libcmocka-dev; `apt-get download` them there).
# The CMake build (-DEPIC_CUDA=ON) is the normal route where those dependencies exist.
# Usage (repo root): [SECTIONS="mla memory matmul"] [SANITIZE=1] [PROFILE="128 8192"]
#   bash kernels/cuda/device_run.sh [all|test|bench]; logs and JSON land in $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
R=$(pwd)
MODE=${1:-all}
{
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,driver_version --format=csv
D=/tmp/deproot; mkdir -p $D
for f in .deps/*.deb; do dpkg -x "$f" $D; done
LIBD=$D/usr/lib/x86_64-linux-gnu
CUDA=${CUDA_HOME:-/usr/local/cuda}
NVCC=$(command -v nvcc || echo $CUDA/bin/nvcc)
$NVCC --version | tail -2
LT=$(ls $CUDA/lib64/libcublasLt.so* $CUDA/targets/x86_64-linux/lib/libcublasLt.so* 2>/dev/null | head -1)
[ -z "$LT" ] && LT=$(find / -name 'libcublasLt.so*' -not -path '/proc/*' 2>/dev/null | head -1)
BLASD=$(dirname "$LT")
echo "cublasLt: $LT"
export LD_LIBRARY_PATH=$LIBD/openblas-pthread:$LIBD:$BLASD:$CUDA/lib64:${LD_LIBRARY_PATH:-}
B=/tmp/b; rm -rf $B; mkdir -p $B/o
echo "export LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > $B/env.sh # for runs of $B's binaries after this script
INC="-I$R -isystem $CUDA/include -isystem $D/usr/include -isystem $D/usr/include/x86_64-linux-gnu/openblas-pthread"
CFLAGS="-O2 -g -std=c11 -Wall -Wextra -Wshadow -Wstrict-prototypes -Wno-unused-parameter -Werror -fopenmp -DEPIC_HAVE_CUDA $INC"
for f in kernels/cuda/*.cu; do
  $NVCC -std=c++17 -O3 $INC -gencode=arch=compute_90a,code=sm_90a -lineinfo -Xptxas -v \
    -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter -c $f -o $B/o/$(basename $f).o > $B/$(basename $f).log 2>&1 &
done
for f in common/*.c kernels/ops.c kernels/cpu/*.c kernels/cuda/*.c; do
  gcc $CFLAGS -c $f -o $B/o/$(echo $f | tr / _).o &
done
wait
cat $B/*.cu.log | grep -E "error|warning|registers|spill|Compiling entry" | grep -v "^$" | head -60
ar rcs $B/libk.a $B/o/*.o
LIBS="-L$LIBD/openblas-pthread -lopenblas -L$BLASD -L$CUDA/lib64 -lcudart -lcublas -lcublasLt -lstdc++ -lgomp -lm -lpthread"
gcc $CFLAGS tests/kernels/test_ops_cuda.c $B/libk.a -L$LIBD -lcmocka $LIBS -o $B/test_ops_cuda || echo BUILD-FAIL test
gcc $CFLAGS tests/kernels/test_ops_batch.c $B/libk.a -L$LIBD -lcmocka $LIBS -o $B/test_ops_batch || echo BUILD-FAIL batch
gcc $CFLAGS bench/bench_kernels_cuda.c $B/libk.a $LIBS -o $B/bench_kernels_cuda || echo BUILD-FAIL bench
} > $OUT/build.log 2>&1
tail -30 $OUT/build.log
export OMP_NUM_THREADS=16
if [ "$MODE" = all ] || [ "$MODE" = test ]; then
  timeout 300 $B/test_ops_batch > $OUT/test.log 2>&1
  timeout 300 $B/test_ops_cuda >> $OUT/test.log 2>&1; echo "test rc=$?" >> $OUT/test.log
  grep -E "rel err|FAILED|PASSED|OK|ERROR|error|device|seed|rc=" $OUT/test.log | tail -80
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  for s in ${SECTIONS:-mla memory matmul}; do
    timeout ${BENCH_TIMEOUT:-200} $B/bench_kernels_cuda --only $s ${BENCH_ARGS:-} > $OUT/bench_$s.json 2> /tmp/bench_$s.txt
    echo "bench $s rc=$?" >> /tmp/bench_$s.txt
    cat /tmp/bench_$s.txt | tee -a $OUT/bench.txt
  done
fi
if [ -n "${SANITIZE:-}" ]; then
  CS=$(command -v compute-sanitizer || echo $CUDA/bin/compute-sanitizer)
  for tool in racecheck memcheck; do
    timeout 150 $CS --tool $tool $B/bench_kernels_cuda --quick --no-peaks --mla 2 300 > /tmp/san_$tool.txt 2>&1
    echo "sanitizer $tool rc=$?" >> /tmp/san_$tool.txt
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|Race|rc=" /tmp/san_$tool.txt | head -20 | tee -a $OUT/bench.txt
  done
fi
if [ -n "${PROFILE:-}" ]; then
  CUOBJ=$(command -v cuobjdump || echo $CUDA/bin/cuobjdump)
  { for f in $B/o/kern_mla.cu.o $B/o/kern_fp8_skinny.cu.o; do
      echo "== $f"; $CUOBJ -sass $f | grep -oE '^\s+/\*[0-9a-f]+\*/\s+[A-Z][A-Z0-9_.]*' | awk '{print $2}' | sort | uniq -c | sort -rn | head -40
    done
    $CUOBJ -sass $B/o/kern_mla.cu.o 2>/dev/null
  } > $OUT/sass.txt 2>&1
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout ${NCU_TIMEOUT:-150} $NCU --kernel-name regex:k_mla_decode --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section LaunchStats --section Occupancy \
    $B/bench_kernels_cuda --mla ${PROFILE} > $OUT/ncu.txt 2>&1
  echo "ncu rc=$?" >> $OUT/ncu.txt
  grep -E "Duration|Throughput|Stall|stall|Warp Cycles|Issued|Bank|Eligible|Registers|Shared Memory" $OUT/ncu.txt | head -60
fi
