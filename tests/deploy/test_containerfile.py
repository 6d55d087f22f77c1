#!/usr/bin/env python3
"""deploy/Containerfile builds EPIC the way the project does. No container engine runs
in CI, so the file is read and checked against the repository:
  - two stages, a CUDA *devel* image named `build` and a CUDA *runtime* image, on the
    same CUDA_VERSION/UBUNTU arguments;
  - the build stage copies CMakeLists.txt and every top-level directory the CMake files
    name (add_subdirectory, ${CMAKE_SOURCE_DIR}/X), and only paths that exist;
  - it builds only through deploy/setup.sh (the script .ci/run uses), with options that
    setup.sh accepts and -D variables that CMakeLists.txt defines; no apt-get or cmake
    of its own; then packs with deploy/bundle.sh (options it accepts, same build dir);
  - the runtime stage takes the unpacked bundle from the build stage, puts its bin/ on
    PATH, installs Open MPI (the bundle expects MPI from the node) and keeps
    NCCL_NVLS_ENABLE=0.
Usage: test_containerfile.py REPO_ROOT"""
import os
import re
import shlex
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..")
root = os.path.abspath(root)
problems, checks = [], []


def check(cond, what):
    (checks if cond else problems).append(what)


def read(rel):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return f.read()


def instructions(text):
    """[(KEYWORD, argument string)] with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        kw, _, arg = cur.partition(" ")
        out.append((kw.upper(), arg.strip()))
        cur = ""
    return out


def script_options(rel):
    """Long options a script's `case "$1" in` parser accepts."""
    opts = set()
    for m in re.finditer(r"^\s*([-\w|]+)\)", read(rel), re.M):
        for alt in m.group(1).split("|"):
            if alt.startswith("--"):
                opts.add(alt)
    return opts


def cmake_files():
    for d, subdirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        subdirs[:] = [s for s in subdirs if not s.startswith((".", "build"))]
        for f in files:
            if f == "CMakeLists.txt" or f.endswith(".cmake"):
                yield os.path.join(rel, f)


ins = instructions(read("deploy/Containerfile"))
stages = []  # [(image, name, [(kw, arg)])]
for kw, arg in ins:
    if kw == "FROM":
        parts = arg.split()
        name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
        stages.append((parts[0], name, []))
    elif stages:
        stages[-1][2].append((kw, arg))
args_before = {a.split("=")[0] for kw, a in ins[: next(i for i, x in enumerate(ins) if x[0] == "FROM")] if kw == "ARG"}

check(len(stages) == 2, f"two stages (found {len(stages)})")
build_img, build_name, build = stages[0]
run_img, _, run = stages[-1]
check("-devel-" in build_img and build_name == "build", f"first stage is a CUDA devel image named build ({build_img} AS {build_name})")
check("-runtime-" in run_img, f"last stage is a CUDA runtime image ({run_img})")
for img in (build_img, run_img):
    check("${CUDA_VERSION}" in img and "${UBUNTU}" in img, f"{img} uses the CUDA_VERSION and UBUNTU arguments")
check({"CUDA_VERSION", "UBUNTU"} <= args_before, "CUDA_VERSION and UBUNTU are declared before the first FROM")

# Sources: everything the CMake files name at the top level.
top = read("CMakeLists.txt")
needed = {"CMakeLists.txt"} | set(re.findall(r"add_subdirectory\(\s*([\w.-]+)", top))
for f in cmake_files():
    for m in re.finditer(r"\$\{(?:CMAKE_SOURCE_DIR|PROJECT_SOURCE_DIR)\}/([\w.-]+)", read(f)):
        if m.group(1) != "..":
            needed.add(m.group(1))
copied = set()
for kw, arg in build:
    if kw == "COPY" and not arg.startswith("--from"):
        srcs = shlex.split(arg)[:-1]
        for s in srcs:
            copied.add(s.rstrip("/"))
            check(os.path.exists(os.path.join(root, s)), f"COPY source {s} exists")
missing = sorted(n for n in needed if n not in copied and os.path.exists(os.path.join(root, n)))
check(not missing, f"the build stage copies what CMake reads (missing: {missing or 'none'})")
check("deploy" in copied, "the build stage copies deploy/")

# The build itself: deploy/setup.sh only, then deploy/bundle.sh.
runs = " && ".join(a for k, a in build if k == "RUN")
cmds = [shlex.split(c) for c in re.split(r"\s*(?:&&|;)\s*", runs) if c.strip()]
setup = [c for c in cmds if c and c[0].endswith("deploy/setup.sh")]
bundle = [c for c in cmds if c and c[0].endswith("deploy/bundle.sh")]
check(len(setup) == 1, "the build stage runs deploy/setup.sh once")
check(len(bundle) == 1, "the build stage runs deploy/bundle.sh once")
check(not any(c and c[0] in ("apt-get", "apt", "cmake", "make", "ninja") for c in cmds),
      "no apt-get/cmake/make of its own in the build stage: the build is setup.sh's")
ci = read(".ci/run") if os.path.exists(os.path.join(root, ".ci/run")) else ""
check("deploy/setup.sh" in ci, "CI (.ci/run) builds with the same deploy/setup.sh")

cache_vars = set(re.findall(r"option\(\s*(\w+)", top)) | set(re.findall(r"set\(\s*(\w+)[^)]*\bCACHE\b", top))
build_dir = "build"
if setup:
    c = setup[0][1:]
    own, cm = (c[: c.index("--")], c[c.index("--") + 1:]) if "--" in c else (c, [])
    ok_opts = script_options("deploy/setup.sh")
    for o in own:
        if o.startswith("--"):
            check(o in ok_opts, f"setup.sh accepts {o}")
    if "--build-dir" in own:
        build_dir = own[own.index("--build-dir") + 1]
    for o in cm:
        m = re.match(r"-D(\w+)(?::\w+)?=", o)
        check(bool(m) and m.group(1) in cache_vars, f"{o} names a cache variable of CMakeLists.txt")
bundle_name = bundle_dir = None
if bundle:
    c = bundle[0][1:]
    ok_opts = script_options("deploy/bundle.sh")
    for o in c:
        if o.startswith("--"):
            check(o in ok_opts, f"bundle.sh accepts {o}")
    check("--build-dir" in c and c[c.index("--build-dir") + 1] == build_dir,
          f"bundle.sh packs setup.sh's build directory ({build_dir})")
    if "--name" in c:
        bundle_name = c[c.index("--name") + 1]
for c in cmds:
    if c and c[0] == "tar" and "-C" in c:
        bundle_dir = c[c.index("-C") + 1]
check(bundle_name and bundle_dir, "the bundle is unpacked in the build stage (--name and tar -C)")

# The runtime stage.
if bundle_name and bundle_dir:
    path = os.path.join(bundle_dir, bundle_name)
    froms = [shlex.split(a) for k, a in run if k == "COPY" and a.startswith("--from=build")]
    check(any(f[1] == path for f in froms), f"the runtime stage copies {path} from the build stage")
    env = " ".join(a for k, a in run if k == "ENV")
    check(re.search(r"PATH=" + re.escape(path) + r"/bin(:|\s|$)", env) is not None, f"{path}/bin is on PATH")
    check("NCCL_NVLS_ENABLE=0" in env, "NCCL_NVLS_ENABLE=0 in the runtime environment")
run_cmds = " ".join(a for k, a in run if k == "RUN")
expects_mpi = "'libmpi*'" in read("deploy/bundle.sh")
check(not expects_mpi or "openmpi-bin" in run_cmds, "the runtime stage installs Open MPI, which the bundle expects")

for p in problems:
    print(f"FAILED - {p}")
print(f"{len(checks)} checks passed, {len(problems)} failed")
sys.exit(1 if problems else 0)
