#!/usr/bin/env bash
# Pack a built EPIC into a self-contained tarball for GPU nodes without internet:
# the binaries plus every shared library they need that such a node may lack (gRPC,
# protobuf-c, abseil, OpenSSL, cJSON, PCRE2, OpenBLAS, the GCC Fortran/OpenMP runtimes,
# the CUDA runtime, ...), with a RUNPATH so that no LD_LIBRARY_PATH is needed.
# The node must provide: glibc and libstdc++/libgcc_s, the CUDA driver, NCCL and the MPI
# stack (Open MPI and what it brings: UCX, hwloc, libevent, PMIx).
#
# usage: deploy/bundle.sh [--build-dir DIR] [--output FILE.tar.gz] [--name NAME] [--system GLOB]...
#   --build-dir DIR   a finished build (deploy/setup.sh; default: build)
#   --output FILE     the tarball (default: DIR/NAME.tar.gz)
#   --name NAME       top directory in the tarball (default: epic-VERSION-linux-ARCH)
#   --system GLOB     also expect libraries whose soname matches GLOB on the node, e.g.
#                     'libcublas*' where the CUDA toolkit is installed (repeatable)
#   --level N         gzip level 1 (fast) .. 9 (small), default 6
# Unpacked: NAME/bin/epic, NAME/bin/epic-launch, NAME/bin/bench_*, NAME/bin/epic-grpc-probe
# (when built), NAME/lib/*.so*,
# NAME/share/epic/epic.sbatch, NAME/MANIFEST.txt (bundled and expected libraries).
# Needs patchelf (apt-get install patchelf; deploy/setup.sh installs it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

build_dir=build output="" name="" extra_system=() level=6
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir="$2"; shift ;;
    --output) output="$2"; shift ;;
    --name) name="$2"; shift ;;
    --system) extra_system+=("$2"); shift ;;
    --level) level="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bundle.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "bundle.sh: $*" >&2; exit 1; }
[[ "$level" =~ ^[1-9]$ ]] || die "--level: expected 1..9, got '$level'"
command -v patchelf >/dev/null 2>&1 || die "patchelf not found (apt-get install patchelf)"
command -v readelf >/dev/null 2>&1 || die "readelf not found (apt-get install binutils)"
epic="$build_dir/coordinator/epic"
[ -x "$epic" ] || die "$epic not found: build first (deploy/setup.sh --build-dir $build_dir)"

# Libraries the node provides, by soname. Bundling any of these would put a second
# copy next to the node's own (glibc, the C++ runtime that MPI and NCCL use), or
# mismatch the node's driver, NCCL or MPI installation (UCX loads its transports from
# its own directory, Open MPI its components).
system_globs=(
  'ld-linux*' 'libc.so*' 'libm.so*' 'libmvec.so*' 'libdl.so*' 'libpthread.so*' 'librt.so*' 'libresolv.so*'
  'libutil.so*' 'libanl.so*' 'libgcc_s.so*' 'libstdc++.so*'
  'libcuda.so*' 'libnvidia-*' 'libnvcuvid*'
  'libnccl*'
  'libmpi*' 'libopen-rte*' 'libopen-pal*' 'libpmix*' 'libpmi*' 'libhwloc*' 'libevent*'
  'libucp.so*' 'libuct.so*' 'libucs.so*' 'libucm.so*' 'libfabric*' 'libibverbs*' 'librdmacm*' 'libpsm*'
  "${extra_system[@]}"
)
is_system() {
  local g
  for g in "${system_globs[@]}"; do
    # shellcheck disable=SC2053
    [[ "$1" == $g ]] && return 0
  done
  return 1
}

version=$("$epic" --version | awk '{print $2}')
[ -n "$name" ] || name="epic-$version-linux-$(uname -m)"
[ -n "$output" ] || output="$build_dir/$name.tar.gz"
output=$(readlink -f "$(dirname "$output")")/$(basename "$output")

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
top="$stage/$name"
mkdir -p "$top/bin" "$top/lib" "$top/share/epic"

# epic, the benchmarks, and the gRPC probe client (health + one Generate) that
# deploy/bundle_smoke.sh uses on nodes without any gRPC client.
bins=("$epic")
for b in "$build_dir"/bench/bench_* "$build_dir"/tests/deploy/epic-grpc-probe; do
  if [ -f "$b" ] && [ -x "$b" ]; then bins+=("$b"); fi
done

# Where this machine's loader finds each soname the binaries need (ldd walks the whole
# closure, honouring each object's RUNPATH).
declare -A where=()
for b in "${bins[@]}"; do
  while read -r so arrow path _; do
    [ "$arrow" = "=>" ] || continue
    [ "$path" != "not" ] || die "$b: $so not found on this machine (ldd)"
    where[$so]=$path
  done < <(ldd "$b")
done

# Walk NEEDED from the binaries, one level of the tree per readelf call: a system
# library ends its branch (what only it needs is the node's business), everything else
# is bundled and walked further.
declare -A bundled=() expected=()
frontier=("${bins[@]}")
while [ ${#frontier[@]} -gt 0 ]; do
  next=()
  while read -r obj so; do
    if is_system "$so"; then expected[$so]=1; continue; fi
    [ -z "${bundled[$so]:-}" ] || continue
    path=${where[$so]:-}
    [ -n "$path" ] || die "$so (needed by $(basename "$obj")) was not resolved by ldd"
    bundled[$so]=$path
    next+=("$path")
  done < <(readelf -d "${frontier[@]}" | awk '
    /^File: / { obj = $2 }
    /\(NEEDED\)/ { so = $NF; gsub(/[][]/, "", so); print (obj == "" ? "-" : obj), so }')
  frontier=("${next[@]}")
done

for b in "${bins[@]}"; do
  cp "$b" "$top/bin/"
  patchelf --set-rpath '$ORIGIN/../lib' "$top/bin/$(basename "$b")"
done
for so in "${!bundled[@]}"; do
  cp -L "${bundled[$so]}" "$top/lib/$so"
  patchelf --set-rpath '$ORIGIN' "$top/lib/$so"
done
cp "$root/deploy/epic-launch" "$top/bin/"
cp "$root/deploy/slurm/epic.sbatch" "$top/share/epic/"
[ ! -f "$root/deploy/README.md" ] || cp "$root/deploy/README.md" "$top/share/epic/README.md"

# Debian package of each bundled file, from dpkg's file lists in one pass (dpkg -S is slow).
declare -A pkg=()
if [ -d /var/lib/dpkg/info ] && [ ${#bundled[@]} -gt 0 ]; then
  while IFS= read -r line; do
    f=${line#*.list:}
    p=${line%%.list:*}
    p=${p##*/}
    pkg[$f]=${p%%:*}
  done < <(for so in "${!bundled[@]}"; do readlink -f "${bundled[$so]}"; done |
           sed 's|^/lib/|/usr/lib/|' | sort -u | grep -xF -f - /var/lib/dpkg/info/*.list 2>/dev/null || true)
fi
pkg_of() { local f; f=$(readlink -f "$1"); f=${f/#\/lib\//\/usr\/lib\/}; printf '%s' "${pkg[$f]:-unknown}"; }
{
  echo "$name: $("$epic" --version)"
  echo "built on $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), $(ldd --version | head -n1)"
  echo
  echo "bundled in lib/ (soname <- source, Debian package):"
  for so in $(printf '%s\n' "${!bundled[@]}" | sort); do
    echo "  $so <- ${bundled[$so]} ($(pkg_of "${bundled[$so]}"))"
  done
  echo
  echo "expected on the node (driver, NCCL, MPI stack, C/C++ runtime):"
  for so in $(printf '%s\n' "${!expected[@]}" | sort); do echo "  $so"; done
} >"$top/MANIFEST.txt"

mkdir -p "$(dirname "$output")"
tar -C "$stage" -I "gzip -$level" -cf "$output" "$name"
echo "bundle.sh: $output ($(du -h "$output" | cut -f1); ${#bundled[@]} libraries bundled, ${#expected[@]} expected on the node)"
