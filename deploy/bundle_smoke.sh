#!/usr/bin/env bash
# Proof of an offline bundle (deploy/bundle.sh) on the node it is meant for: a GPU node
# with the CUDA driver, MPI and NCCL but no gRPC. Unpacks the tarball, checks that
# every library resolves (from the bundle, or from the node where the bundle expects
# it), then with LD_LIBRARY_PATH emptied: `epic generate`, `epic serve` started by
# bin/epic-launch and asked over gRPC by the bundled bin/epic-grpc-probe (health and a
# greedy Generate equal to generate's ids), SIGTERM drain, and the same under mpirun
# with 2 ranks (and 2 GPUs when the node has them).
#
# usage: deploy/bundle_smoke.sh BUNDLE.tar.gz MODEL_DIR [--out DIR] [--prompt-ids IDS]
#   MODEL_DIR   a checkpoint directory, e.g. the fixtures' tiny-bf16
#   --out DIR   keep the logs there (default: a temporary directory, removed)
# Prints one line per check and "bundle_smoke: N passed, M failed"; exit 0 when all pass.
set -u
[ $# -ge 2 ] || { sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
tarball=$(readlink -f "$1")
model=$(readlink -f "$2")
shift 2
out="" ids=0,10,20,30
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift ;;
    --prompt-ids) ids="$2"; shift ;;
    *) echo "bundle_smoke.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
work=$(mktemp -d /tmp/epic-smoke-XXXXXX)
[ -n "$out" ] || out="$work/logs"
mkdir -p "$out"
bg=""
cleanup() {
  if [ -n "$bg" ]; then kill -TERM "$bg" 2>/dev/null; wait "$bg" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT
pass=0 fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; [ -n "${2:-}" ] && [ -s "$2" ] && tail -n 12 "$2" | sed 's/^/    /'; return 0; }
ids_of() { sed -n 's/.*"output_ids":\[\([0-9,]*\)\].*/\1/p' "$1" | head -n1; }

# The node, for the record.
{
  echo "os: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"); $(ldd --version | head -n1)"
  echo "gpus: $(nvidia-smi -L 2>/dev/null | tr '\n' ';' || echo none)"
  echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
  echo "mpirun: $(mpirun --version 2>/dev/null | head -n1 || echo none)"
  echo "nccl: $(ldconfig -p | grep -m1 'libnccl.so.2 ' | sed 's/.*=> //')"
  echo "grpc on the node: $(ldconfig -p | grep -E 'libgrpc\.so|libprotobuf-c\.so' | sed 's/.*=> //' | tr '\n' ' ')"
} | tee "$out/node.txt" | sed 's/^/# /'

tar -C "$work" -xzf "$tarball" || { bad "unpack $tarball"; exit 1; }
top=$(find "$work" -mindepth 1 -maxdepth 1 -type d ! -name logs | head -n1)
B="$top/bin"
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
unset LD_LIBRARY_PATH
[ "$(id -u)" != 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# Every library found, and each one the bundle carries taken from the bundle (the rest
# are the node's: what the MANIFEST expects and what those need in turn).
for b in "$B/epic" "$B/epic-grpc-probe"; do
  [ -x "$b" ] || continue
  ldd "$b" >"$out/ldd-$(basename "$b").txt" 2>&1
  stray=""
  while read -r so arrow path _; do
    [ "$arrow" = "=>" ] || continue
    case "$path" in
      not) stray="$stray $so(missing)" ;;
      "$top"/*) ;;
      *) [ ! -e "$top/lib/$so" ] || stray="$stray $so($path)" ;;
    esac
  done <"$out/ldd-$(basename "$b").txt"
  [ -z "$stray" ] && ok "$(basename "$b"): every library found, the bundled ones in the bundle" ||
    bad "$(basename "$b"): libraries missing or taken from outside the bundle:$stray"
done
grep -q "libgrpc.so.*=> $top/" "$out/ldd-epic.txt" && ok "libgrpc comes from the bundle" ||
  bad "libgrpc does not come from the bundle" "$out/ldd-epic.txt"

"$B/epic" --version >"$out/version.txt" 2>&1 && ok "$(cat "$out/version.txt")" || bad "epic --version" "$out/version.txt"

n=$(awk -F, '{print NF}' <<<"$ids")
gen=(generate --model "$model" --prompt-ids "$ids" --max-new-tokens 8 --ignore-eos --json)
if "$B/epic" "${gen[@]}" >"$out/generate.json" 2>"$out/generate.err" && [ -n "$(ids_of "$out/generate.json")" ]; then
  ref=$(ids_of "$out/generate.json")
  ok "generate ($n prompt ids): [$ref]"
else
  ref=""
  bad "generate" "$out/generate.err"
fi

# serve_check NAME LAUNCH-OPTIONS...: epic-launch ... serve, the probe, SIGTERM.
serve_check() {
  local name="$1" addr="" rc
  shift
  "$B/epic-launch" "$@" --health-timeout 600 serve --model "$model" --listen 127.0.0.1:0 --kv-pages 256 \
    >"$out/serve-$name.out" 2>"$out/serve-$name.err" &
  bg=$!
  for _ in $(seq 600); do
    addr=$(sed -n 's/^EPIC gateway listening on //p' "$out/serve-$name.out")
    [ -n "$addr" ] && break
    kill -0 "$bg" 2>/dev/null || break
    sleep 1
  done
  if [ -z "$addr" ]; then
    bad "serve ($name): no gateway reported" "$out/serve-$name.err"
  elif "$B/epic-grpc-probe" "$addr" --prompt-ids "$ids" --max-tokens 8 >"$out/probe-$name.json" 2>"$out/probe-$name.err" &&
       [ -n "$ref" ] && [ "$(ids_of "$out/probe-$name.json")" = "$ref" ]; then
    ok "serve ($name) at $addr: gRPC health SERVING, Generate = generate"
  else
    bad "serve ($name): probe at $addr gave '$(cat "$out/probe-$name.json" 2>/dev/null)'" "$out/probe-$name.err"
  fi
  kill -TERM "$bg" 2>/dev/null
  wait "$bg"
  rc=$?
  bg=""
  grep -q '^epic serve: drained, exiting' "$out/serve-$name.out" && [ $rc -eq 0 ] &&
    ok "serve ($name): SIGTERM drained, exit 0" || bad "serve ($name): SIGTERM (exit $rc)" "$out/serve-$name.err"
}
if [ -x "$B/epic-grpc-probe" ]; then
  serve_check one-process --np 1
else
  bad "no bin/epic-grpc-probe in the bundle (build with gRPC and the tests, then bundle)"
fi

if command -v mpirun >/dev/null 2>&1 && [ -n "$ref" ]; then
  "$B/epic-launch" --cpu --np 2 --preflight --launcher-arg --oversubscribe -- "${gen[@]}" --comm mpi \
    >"$out/mpi2.json" 2>"$out/mpi2.err"
  [ "$(ids_of "$out/mpi2.json")" = "$ref" ] && ok "mpirun 2 ranks (--comm mpi) through epic-launch: same ids" ||
    bad "mpirun 2 ranks (--comm mpi)" "$out/mpi2.err"
  [ ! -x "$B/epic-grpc-probe" ] || serve_check mpi2 --cpu --np 2 --launcher-arg --oversubscribe
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  if [ "${ngpu:-0}" -ge 2 ]; then
    "$B/epic-launch" --gpus-per-node 2 --preflight -v -- "${gen[@]}" >"$out/gpu2.json" 2>"$out/gpu2.err"
    [ "$(ids_of "$out/gpu2.json")" = "$ref" ] && ok "2 GPUs, one rank each (default comm): same ids" ||
      bad "2 GPUs, one rank each" "$out/gpu2.err"
  else
    echo "# one GPU: the 2-GPU launch is not checked"
  fi
fi

echo "bundle_smoke: $pass passed, $fail failed (logs: $out)"
[ "$fail" -eq 0 ]
