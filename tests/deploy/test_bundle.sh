#!/usr/bin/env bash
# deploy/bundle.sh: the tarball of a build runs where only the C runtime, MPI and NCCL
# exist. Checked in a chroot that holds exactly those (the libraries the bundle expects
# from the node, with their own dependencies) and none of the bundled ones, with an
# empty environment (no LD_LIBRARY_PATH): `epic --version` and a generate on the fixture
# model must give this build's output. The bundle is also run by the host's mpirun
# with 2 ranks. Usage: test_bundle.sh EPIC FIXTURES_DIR (EPIC inside a build directory).
# Exit 77 (skip) when neither root (chroot) nor an unprivileged user namespace is available.
set -u
EPIC=$(readlink -f "$1")
FX="$2"
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=$(dirname "$(dirname "$EPIC")")
tmp=$(mktemp -d /tmp/epic-bundle-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
bad() { fail=$((fail + 1)); echo "FAILED - $1"; [ -s "$tmp/err" ] && sed 's/^/    /' "$tmp/err" | tail -n 15; return 0; }

# The loader resolves $ORIGIN through /proc/self/exe, so the chroot gets its own /proc,
# mounted in a private mount namespace (gone with the process, nothing to unmount).
chroot_bin=$(command -v chroot || echo /usr/sbin/chroot)
unshare_bin=$(command -v unshare || echo /usr/bin/unshare)
R="$tmp/root"
if [ "$(id -u)" = 0 ] && [ -x "$chroot_bin" ] && "$unshare_bin" --mount --pid --fork --mount-proc true 2>/dev/null; then
  jail=("$unshare_bin" --mount --pid --fork --mount-proc="$R/proc" "$chroot_bin")
elif [ -x "$chroot_bin" ] && "$unshare_bin" -r --mount --pid --fork --mount-proc true 2>/dev/null; then
  jail=("$unshare_bin" -r --mount --pid --fork --mount-proc="$R/proc" "$chroot_bin")
else
  echo "SKIP: the chroot needs root (or user namespaces) and unshare --mount-proc"
  exit 77
fi
# A jailed process dies with its unshare (which does not pass signals on): killing the
# jailed server below must not leave it running.
if "$unshare_bin" --kill-child true 2>/dev/null; then
  jail=("${jail[0]}" --kill-child "${jail[@]:1}")
fi

# cuBLAS/cuBLASLt (~600 MB, in a CUDA build) are taken as the node's here to keep the
# test fast; they are bundled like any other library by default.
if ! "$repo/deploy/bundle.sh" --build-dir "$build" --name epic-test --output "$tmp/epic-test.tar.gz" \
     --system 'libcublas*' --level 1 >"$tmp/out" 2>"$tmp/err"; then
  bad "bundle.sh"
  echo "$pass passed, $fail failed"
  exit 1
fi
ok "bundle.sh: $(sed 's/^bundle.sh: //' "$tmp/out")"

# The node: / with the loader, the libraries the bundle expects (MANIFEST) and their
# closure, at the paths this machine has them, plus the model. Nothing else.
mkdir -p "$R/opt" "$R/etc" "$R/model" "$R/tmp" "$R/proc"
tar -C "$R/opt" -xzf "$tmp/epic-test.tar.gz"
B="$R/opt/epic-test"
place() { # copy (hard link when possible) a file to the same path under $R
  local src dst
  src=$(readlink -f "$1")
  for dst in "$1" "$src"; do
    [ -e "$R$dst" ] && continue
    mkdir -p "$(dirname "$R$dst")"
    cp -l "$src" "$R$dst" 2>/dev/null || cp "$src" "$R$dst"
  done
}
expected=$(sed -n '/^expected on the node/,$p' "$B/MANIFEST.txt" | sed -n 's/^  \([^ ]*\)$/\1/p')
declare -A host=()
for b in "$EPIC" "$build"/bench/bench_* "$build"/tests/deploy/epic-grpc-probe; do
  [ -x "$b" ] || continue
  while read -r so arrow path _; do
    if [ "$arrow" = "=>" ]; then host[$so]=$path; fi
  done < <(ldd "$b")
done
dirs=()
for so in $expected; do
  case "$so" in ld-linux*) continue ;; esac
  path=${host[$so]:-}
  [ -n "$path" ] || { bad "expected library $so not found on this machine"; continue; }
  place "$path"
  dirs+=("$(dirname "$path")")
  while read -r _dep arrow dpath _; do
    if [ "$arrow" = "=>" ] && [ -f "$dpath" ]; then place "$dpath"; dirs+=("$(dirname "$dpath")"); fi
  done < <(ldd "$path")
done
place /lib64/ld-linux-x86-64.so.2
printf '%s\n' "${dirs[@]}" | sort -u >"$R/etc/ld.so.conf"
ldconfig -r "$R" 2>/dev/null || ldconfig -r "$R" -f /etc/ld.so.conf
cp "$FX/tiny-bf16"/*.json "$FX/tiny-bf16"/*.safetensors "$R/model/"

# The libraries the bundle is for must really be missing from the node.
missing_ok=1
node_libs=$(find "$R" -path "$B" -prune -o \( -type f -o -type l \) -name 'lib*.so*' -print | sed 's|.*/||' | sort -u)
on_node() { grep -qxF "$1" <<<"$node_libs"; }
for f in "$B"/lib/*; do
  so=${f##*/}
  # Allowed only where the node's own MPI/NCCL stack needs the same library (libz, say).
  if on_node "$so"; then echo "# $so is both bundled and needed by the node's MPI/NCCL libraries"; fi
done
want=(libopenblas.so.0 libcjson.so.1 libpcre2-8.so.0 libgfortran.so.5)
for so in libgrpc.so.29 libgpr.so.29 libprotobuf-c.so.1; do
  if readelf -d "$EPIC" | grep -q "\[$so\]"; then want+=("$so"); fi
done
for so in "${want[@]}"; do
  [ -f "$B/lib/$so" ] || { missing_ok=0; echo "# $so not bundled"; }
  if on_node "$so"; then missing_ok=0; echo "# $so on the node"; fi
done
[ "$missing_ok" = 1 ] && ok "OpenBLAS, cJSON, PCRE2, gfortran (and gRPC, protobuf-c when linked) are in the bundle, not on the node" ||
  bad "bundled libraries vs the node"

rp=$(readelf -d "$B/bin/epic" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
[ "$rp" = '$ORIGIN/../lib' ] && ok "bin/epic RUNPATH is \$ORIGIN/../lib" || bad "bin/epic RUNPATH is '$rp'"
bad_lib=""
for f in "$B"/lib/*; do
  [ "$(readelf -d "$f" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')" = '$ORIGIN' ] || bad_lib="$bad_lib $(basename "$f")"
done
[ -z "$bad_lib" ] && ok "every bundled library's RUNPATH is \$ORIGIN" || bad "RUNPATH not \$ORIGIN:$bad_lib"

in_jail() { env -i PATH=/opt/epic-test/bin LD_LIBRARY_PATH= OMP_NUM_THREADS=1 "${jail[@]}" "$R" "$@"; }
if in_jail /opt/epic-test/bin/epic --version >"$tmp/out" 2>"$tmp/err" && [ "$(cat "$tmp/out")" = "$("$EPIC" --version)" ]; then
  ok "chroot: epic --version ($(cat "$tmp/out"))"
else
  bad "chroot: epic --version"
fi
gen=(generate --prompt "Hello, world" --max-new-tokens 6 --ignore-eos --json)
OMP_NUM_THREADS=1 "$EPIC" "${gen[@]}" --model "$FX/tiny-bf16" --dump-logits "$tmp/ref.npy" >"$tmp/ref.json" 2>"$tmp/err" || bad "reference generate"
if in_jail /opt/epic-test/bin/epic "${gen[@]}" --model /model --dump-logits /tmp/got.npy >"$tmp/got.json" 2>"$tmp/err" &&
   python3 "$here/compare_outputs.py" "$tmp/ref.json" "$tmp/ref.npy" "$tmp/got.json" "$R/tmp/got.npy"; then
  ok "chroot without the bundled libraries: generate equals the build's output"
else
  bad "chroot: generate"
fi
# The bundled server answers the bundled gRPC client, both in the chroot (no gRPC there).
if [ -x "$B/bin/epic-grpc-probe" ] && "$EPIC" serve --help >/dev/null 2>&1; then
  OMP_NUM_THREADS=1 "$EPIC" generate --model "$FX/tiny-bf16" --prompt-ids 0,10,20 --max-new-tokens 5 --ignore-eos \
    --json >"$tmp/ref5.json" 2>"$tmp/err"
  # Not through in_jail: $! must be unshare itself (env execs it), not a subshell.
  env -i PATH=/opt/epic-test/bin LD_LIBRARY_PATH= OMP_NUM_THREADS=1 "${jail[@]}" "$R" \
    /opt/epic-test/bin/epic serve --model /model --listen 127.0.0.1:0 --kv-pages 64 \
    >"$R/tmp/serve.out" 2>"$tmp/serve.err" &
  spid=$!
  addr=""
  for _ in $(seq 300); do
    addr=$(sed -n 's/^epic serve: listening on \([^ ]*\).*/\1/p' "$R/tmp/serve.out")
    [ -n "$addr" ] && break
    kill -0 "$spid" 2>/dev/null || break
    sleep 0.2
  done
  ids() { sed -n 's/.*"output_ids":\[\([0-9,]*\)\].*/\1/p' "$1" | head -n1; }
  if [ -n "$addr" ] && in_jail /opt/epic-test/bin/epic-grpc-probe "$addr" --prompt-ids 0,10,20 --max-tokens 5 \
       >"$tmp/probe.json" 2>"$tmp/err" && [ -n "$(ids "$tmp/probe.json")" ] &&
     [ "$(ids "$tmp/probe.json")" = "$(ids "$tmp/ref5.json")" ]; then
    ok "chroot: bundled epic serve answers the bundled gRPC client (health SERVING, Generate = generate)"
  else
    [ -n "$addr" ] || cp "$tmp/serve.err" "$tmp/err"
    bad "chroot: serve + gRPC probe (address '${addr}')"
  fi
  # unshare does not pass signals on: stop the jailed server (its child), give unshare a
  # few seconds to follow, then kill it (--kill-child takes the server along).
  for c in $(cat /proc/"$spid"/task/"$spid"/children 2>/dev/null); do kill -TERM "$c" 2>/dev/null; done
  for _ in $(seq 50); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$spid" 2>/dev/null
  wait "$spid" 2>/dev/null
fi

# A negative control: the same chroot without the bundle's lib/ must fail to start, or
# the check above proved nothing.
mv "$B/lib" "$B/lib.off"
if in_jail /opt/epic-test/bin/epic --version >/dev/null 2>"$tmp/err" ||
   ! grep -q "error while loading shared libraries" "$tmp/err"; then
  bad "chroot without lib/: epic must fail to load its libraries, or the chroot is not missing anything"
else
  ok "chroot without the bundle's lib/: epic cannot start ($(head -c 80 "$tmp/err"))"
fi
mv "$B/lib.off" "$B/lib"

# The node's mpirun starts the bundled binary (2 ranks, LD_LIBRARY_PATH emptied).
if command -v mpirun >/dev/null 2>&1; then
  if env LD_LIBRARY_PATH= OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
       timeout 120 "$B/bin/epic-launch" --np 2 --cpu --launcher-arg --oversubscribe -- "${gen[@]}" --model "$FX/tiny-bf16" \
       --comm mpi -v --dump-logits "$tmp/mpi.npy" >"$tmp/mpi.json" 2>"$tmp/err" &&
     grep -q '^epic\[1\]' "$tmp/err" &&
     python3 "$here/compare_outputs.py" "$tmp/ref.json" "$tmp/ref.npy" "$tmp/mpi.json" "$tmp/mpi.npy"; then
    ok "bundle's bin/epic-launch: 2 ranks of the bundled epic under mpirun equal one process"
  else
    bad "bundle under mpirun"
  fi
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
