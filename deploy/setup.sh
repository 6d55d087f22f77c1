#!/usr/bin/env bash
# Install EPIC's build dependencies (Debian 12 / Ubuntu packages, by name) and
# build it. Usage: ./deploy/setup.sh [--no-deps] [--build-dir DIR] [-- extra cmake args]
# CUDA/NCCL/UCX/gRPC parts are built when their toolchains are present.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=build
install_deps=1
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-deps) install_deps=0 ;;
    --build-dir) build_dir="$2"; shift ;;
    --help|-h)
      sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "setup.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

packages=(build-essential cmake pkg-config python3
  libopenblas-dev libpcre2-dev libcjson-dev libcmocka-dev libmicrohttpd-dev nodejs npm
  libopenmpi-dev openmpi-bin libucx-dev
  libgrpc-dev protobuf-c-compiler libprotobuf-c-dev
  python3-grpcio python3-protobuf protobuf-compiler
  slurmctld slurmd slurm-client munge patchelf numactl
  libssl-dev openssl clang-14 libclang-rt-14-dev bc)

if [ "$install_deps" = 1 ]; then
  missing=()
  for p in "${packages[@]}"; do
    # Node.js often comes from elsewhere (nodesource, nvm), whose packages conflict with
    # Debian's: any working node/npm on PATH will do.
    case $p in nodejs|npm) command -v "${p/nodejs/node}" >/dev/null && continue ;; esac
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

# The HTTP end-to-end test drives the server with the real `openai` npm client
# (pinned major version), kept out of git in tests/http/node_modules-dir.
if [ "$install_deps" = 1 ] && command -v npm >/dev/null &&
   [ ! -f tests/http/node_modules-dir/node_modules/openai/package.json ]; then
  mkdir -p tests/http/node_modules-dir
  npm install --prefix tests/http/node_modules-dir --no-audit --no-fund openai@4
fi

cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "${extra[@]}"
cmake --build "$build_dir" -j"$(nproc)"
echo "setup.sh: built $build_dir/coordinator/epic"
