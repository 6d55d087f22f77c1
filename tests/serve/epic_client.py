"""Independent Python client for EPIC's gRPC API (proto/epic/v1/inference.proto).

Uses Debian's python3-grpcio and python3-protobuf; the message classes are
generated from the .proto files by protoc (--python_out) into a directory given
by EPIC_PB_DIR (the build does it, see tests/serve/CMakeLists.txt). No EPIC code
is imported: this is what any client would do.
"""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import grpc

PB_DIR = os.environ.get("EPIC_PB_DIR")
if not PB_DIR or not os.path.isdir(PB_DIR):
    sys.exit("EPIC_PB_DIR must name the directory with the generated *_pb2.py files")
sys.path.insert(0, PB_DIR)
from epic.v1 import inference_pb2 as pb  # noqa: E402


def _load(name, rel):
    # The generated health module lives under grpc/health/v1/, which would
    # collide with the grpc package itself: load it by file path instead.
    spec = importlib.util.spec_from_file_location(name, os.path.join(PB_DIR, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


health_pb = _load("epic_test_health_pb2", "grpc/health/v1/health_pb2.py")

GENERATE = "/epic.v1.Inference/Generate"
TOKENIZE = "/epic.v1.Inference/Tokenize"
MODELINFO = "/epic.v1.Inference/ModelInfo"
HEALTH = "/grpc.health.v1.Health/Check"


class Client:
    def __init__(self, addr, max_msg=64 << 20, creds=None, options=()):
        self.addr = addr
        opts = [("grpc.max_send_message_length", max_msg),
                ("grpc.max_receive_message_length", max_msg)] + list(options)
        # creds: grpc.ssl_channel_credentials(...) for a TLS server.
        self.channel = (grpc.secure_channel(addr, creds, options=opts) if creds
                        else grpc.insecure_channel(addr, options=opts))
        ser = lambda m: m.SerializeToString()
        self.generate_rpc = self.channel.unary_stream(
            GENERATE, request_serializer=ser, response_deserializer=pb.GenerateResponse.FromString)
        self.tokenize_rpc = self.channel.unary_unary(
            TOKENIZE, request_serializer=ser, response_deserializer=pb.TokenizeResponse.FromString)
        self.modelinfo_rpc = self.channel.unary_unary(
            MODELINFO, request_serializer=ser, response_deserializer=pb.ModelInfoResponse.FromString)
        self.health_rpc = self.channel.unary_unary(
            HEALTH, request_serializer=ser, response_deserializer=health_pb.HealthCheckResponse.FromString)
        # Raw bytes in and out, for malformed and oversized requests.
        self.generate_raw = self.channel.unary_stream(
            GENERATE, request_serializer=lambda b: b, response_deserializer=pb.GenerateResponse.FromString)

    def close(self):
        self.channel.close()

    def generate(self, timeout=60, **kw):
        """Runs a Generate to the end: (ids, text, responses)."""
        resps = list(self.generate_rpc(request(**kw), timeout=timeout))
        ids = [i for r in resps for i in r.token_ids]
        text = "".join(r.text for r in resps)
        return ids, text, resps

    def info(self, timeout=10):
        return self.modelinfo_rpc(pb.ModelInfoRequest(), timeout=timeout)

    def health(self, service="", timeout=5):
        return self.health_rpc(health_pb.HealthCheckRequest(service=service), timeout=timeout).status

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.health(timeout=1) == health_pb.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server at %s not SERVING after %ss" % (self.addr, timeout))


def stream_tokens(client, seconds, lo=64, hi=20000):
    """How many tokens one stream generates in about `seconds` on this server
    (measured now: sanitizer builds and busy machines are much slower)."""
    n = 32
    client.generate(ids=[0, 1, 2], max_tokens=4)  # warm up first
    t0 = time.time()
    client.generate(ids=[0, 1, 2], max_tokens=n, ignore_eos=True)
    rate = n / max(time.time() - t0, 1e-3)
    return max(lo, min(hi, int(rate * seconds)))


def request(ids=None, text=None, chat=None, no_bos=False, request_id="", **sampling):
    """GenerateRequest from keyword arguments (sampling fields by name)."""
    p = pb.Prompt(no_bos=no_bos)
    if ids is not None:
        p.token_ids.ids.extend(ids)
    elif text is not None:
        p.text = text
    elif chat is not None:
        for role, content in chat:
            p.chat.messages.add(role=role, content=content)
    return pb.GenerateRequest(prompt=p, sampling=pb.SamplingParams(**sampling), request_id=request_id)


LISTEN_RE = re.compile(r"listening on (\S+):(\d+) \(pid (\d+)\)")


class Proc:
    """A started `epic serve` / `epic gateway` (or mpirun of one): waits for the
    listening line and remembers the address and the pid that serves."""

    def __init__(self, argv, env=None, timeout=120, log=None):
        self.argv = argv
        self.log = log or open(os.devnull, "w")
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.lines = []
        deadline = time.time() + timeout
        self.addr = None
        while time.time() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = LISTEN_RE.search(line)
            if m:
                self.addr = "127.0.0.1:%s" % m.group(2)
                self.pid = int(m.group(3))
                break
        if not self.addr:
            self.p.kill()
            raise RuntimeError("%s did not start: %s" % (argv[0], "".join(self.lines)))

    def signal(self, sig=signal.SIGTERM):
        os.kill(self.pid, sig)

    def wait(self, timeout=60):
        rest, _ = self.p.communicate(timeout=timeout)
        self.lines.append(rest)
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Checks:
    """Named checks that all run; prints 'ok - name' / 'FAILED - name' and a
    closing 'N passed, N failed' line."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, cond, detail=""):
        if cond:
            self.passed += 1
            print("ok - %s" % name, flush=True)
        else:
            self.failed += 1
            print("FAILED - %s %s" % (name, detail), flush=True)
        return cond

    def run(self, name, fn):
        """Runs fn(); an exception is a failure of that check."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on
            import traceback
            traceback.print_exc()
            self.check(name, False, "(%s: %s)" % (type(e).__name__, e))

    def finish(self):
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        return 0 if self.failed == 0 and self.passed > 0 else 1
