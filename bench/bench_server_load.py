"""Hostile load on serving.server: throughput, latency, refusals and memory, loopback only.

    python3 bench/bench_server_load.py [--requests 1500] [--seconds 150] [--clients 6]
        [--server-args "--onednn"] [--name server_load]

Exports an untrained tiny U-Net (filters 4, depth 3) as version 1, starts
``python -m serving.server`` in a subprocess on a free 127.0.0.1 port and runs ``--clients``
threads that draw request kinds at random until ``--requests`` are sent or ``--seconds``
pass: valid tiles (batch 1-4, fixed and random odd sizes, ``serving_default`` and
``with_range``), large valid images (1536 x 1536, 2.4 Mpix), ``metadata`` calls, malformed requests, a
2560 x 2560 image over the per-request pixel budget, one-value tensors declared as
1 x 4096 x 4096 x 3 (TF would broadcast them), a 70 MB message, requests cancelled after
0-100 ms, requests with a 50 ms deadline, and floods of 12 tiles fired at once (the server
admits 6 with its defaults). Valid requests that get RESOURCE_EXHAUSTED
(server busy) are retried with back-off, as a polite client would; any other outcome on a
valid request is an error. A third of the way in (requests or seconds), version 2 is copied into the base file by
file (``saved_model.pb`` first, ``--copy-delay`` seconds between files, files over 64 kB
in four pieces half that apart), so the server sees incomplete folders and half-written
files. The server's VmRSS is sampled every 0.1 s from /proc.

Writes bench/results/<name>.json and <name>.md (with this command line).
"""

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

WEIGHTS = {"valid": 45, "large": 2, "metadata": 5, "malformed": 12, "oversized": 4, "broadcast": 10,
           "huge_message": 1, "cancelled": 12, "deadline": 8, "flood": 2}
# BUSY: RESOURCE_EXHAUSTED saying "server busy" (queue or in-flight pixels full) or gRPC's "Concurrent RPC
# limit exceeded"; any request may meet it under a flood. RESOURCE_EXHAUSTED alone: message over the limit.
EXPECTED = {"valid": {"OK"}, "large": {"OK"}, "metadata": {"OK"}, "malformed": {"INVALID_ARGUMENT", "BUSY"},
            "oversized": {"INVALID_ARGUMENT", "BUSY"}, "broadcast": {"INVALID_ARGUMENT", "BUSY"},
            "huge_message": {"RESOURCE_EXHAUSTED", "BUSY"}, "cancelled": {"CANCELLED", "OK", "BUSY"},
            "deadline": {"DEADLINE_EXCEEDED", "OK", "BUSY"}, "flood": {"OK", "BUSY"}}
VALID_KINDS = ("valid", "large", "metadata")
TILE_SHAPES = [(1, 256, 256), (2, 256, 256), (4, 256, 256), (1, 192, 192), (4, 128, 128)]
BUSY_RETRIES = 10
FLOOD = 12  # requests one flood fires at once, more than the server admits
LARGE_SHAPE = (1, 1536, 1536)  # 2.36 Mpix: within the default 4 Mpix per request


def export_models(work):
    """Version 1 in the served base, and a second export to copy in during the run."""
    import keras

    from export import saved_model as sm
    from kerasnuc import models
    from kerasnuc.runs import write_run

    keras.utils.set_random_seed(0)
    model = models.build("unet", input_shape=(None, None, 3), filters=4, depth=3)
    run = write_run(os.path.join(work, "run"), model, model_config={"filters": 4, "depth": 3},
                    postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 5})
    base = os.path.join(work, "base")
    sm.export_saved_model(run, base, log=lambda m: None)
    source = sm.export_saved_model(run, os.path.join(work, "source"), log=lambda m: None)
    return base, source


def vm_rss_mb(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """``python -m serving.server`` in a subprocess; its output lines and RSS samples."""

    def __init__(self, base, extra_args, poll):
        command = [sys.executable, "-m", "serving.server", "--base", base, "--port", "0", "--poll", str(poll),
                   *extra_args]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        self.lines, self.port = [], None
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.samples = []  # (seconds since start, VmRSS MB)
        self._sampling = threading.Event()
        self.started = time.perf_counter()

    def _read(self):
        for line in self.process.stdout:
            line = line.rstrip()
            self.lines.append((time.perf_counter(), line))
            found = re.search(r"listening on [^:]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self.listening.set()

    def wait_listening(self, seconds=120):
        if not self.listening.wait(seconds):
            self.stop()
            sys.exit("bench_server_load: the server did not start:\n" + "\n".join(l for _, l in self.lines[-20:]))

    def sample(self, every=0.1):
        def loop():
            while not self._sampling.wait(every):
                try:
                    self.samples.append((time.perf_counter() - self.started, vm_rss_mb(self.process.pid)))
                except (OSError, RuntimeError):
                    return
        threading.Thread(target=loop, daemon=True).start()

    def rss(self):
        return vm_rss_mb(self.process.pid)

    def stop(self):
        self._sampling.set()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        time.sleep(0.2)
        return self.process.returncode


class Requests:
    """Pre-built requests of every kind (building them must not be what the bench measures)."""

    def __init__(self, seed=0):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        self.tf, self.pb2 = tf, predict_pb2
        self.rng = np.random.default_rng(seed)
        self._cache = {}
        self._lock = threading.Lock()

    def predict(self, image, signature="serving_default", value_range=None, name="unet"):
        request = self.pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = signature
        if image is not None:
            request.inputs["image"].CopyFrom(self.tf.make_tensor_proto(image))
        if value_range is not None:
            request.inputs["intensity_range"].CopyFrom(self.tf.make_tensor_proto(value_range))
        return request

    def _image(self, shape, channels=3, dtype=np.uint8):
        return self.rng.integers(0, 255, size=tuple(shape) + (channels,)).astype(dtype)

    def cached(self, key, build):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]

    def tile(self, rng):
        """A valid tile batch: a fixed tile shape (70 %) or a random odd size, either signature."""
        if rng.random() < 0.7:
            shape = TILE_SHAPES[rng.randrange(len(TILE_SHAPES))]
        else:
            shape = (rng.choice([1, 2]), rng.randrange(24, 300), rng.randrange(24, 300))
        with_range = rng.random() < 0.5
        key = ("tile", shape, with_range)

        def build():
            image = self._image(shape)
            if not with_range:
                return self.predict(image)
            ranges = np.repeat(np.array([[0.0, 255.0]], np.float32), shape[0], axis=0)
            return self.predict(image, "with_range", ranges)
        return self.cached(key, build), shape

    def malformed(self, rng):
        builders = [
            lambda: self.predict(self._image((1, 32, 32)).astype(np.float32)),      # wrong dtype
            lambda: self.predict(self._image((32, 32))),                             # wrong rank
            lambda: self.predict(self._image((1, 32, 32), channels=2)),             # 2 channels
            lambda: self.predict(np.zeros((1, 0, 0, 3), np.uint8)),                 # 0 x 0
            lambda: self.predict(np.zeros((0, 32, 32, 3), np.uint8)),               # empty batch
            lambda: self.predict(self._image((1, 32, 32)), signature="nope"),      # unknown signature
            lambda: self._garbage(),                                                # 3 bytes for 3072 values
            lambda: self._renamed(),                                                # unknown input name
        ]
        index = rng.randrange(len(builders))
        return self.cached(("malformed", index), builders[index])

    def _garbage(self):
        request = self.predict(self._image((1, 32, 32)))
        request.inputs["image"].tensor_content = b"\x01\x02\x03"
        return request

    def _renamed(self):
        request = self.pb2.PredictRequest()
        request.model_spec.name = "unet"
        request.inputs["pixels"].CopyFrom(self.tf.make_tensor_proto(self._image((1, 16, 16))))
        return request

    def broadcast(self, rng):
        """A ~100-byte request declaring batch x 4096 x 4096 x 3 with one value."""
        batch = rng.choice([1, 8])

        def build():
            request = self.predict(None)
            proto = request.inputs["image"]
            proto.dtype = self.tf.uint8.as_datatype_enum
            for size in (batch, 4096, 4096, 3):
                proto.tensor_shape.dim.add().size = size
            proto.int_val.append(7)
            return request
        return self.cached(("broadcast", batch), build)


def peak_during(server, call, every=0.02):
    """Peak server VmRSS (MB) while ``call()`` runs, sampled every ``every`` seconds."""
    peak, done = [server.rss()], threading.Event()

    def watch():
        while not done.wait(every):
            peak[0] = max(peak[0], server.rss())
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        call()
    finally:
        done.set()
        watcher.join()
    return peak[0]


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(args, requests, stub_factory, server, source, target_dir):
    """The client threads and the slow copier; returns the raw tallies."""
    import grpc

    from serving.server import BUSY_PREFIX

    codes = defaultdict(Counter)
    latencies = defaultdict(list)
    busy_retries = Counter()
    versions = Counter()
    first_v2 = [None]
    lock = threading.Lock()
    sent = [0]
    deadline = time.perf_counter() + args.seconds
    start = time.perf_counter()
    kinds, weights = zip(*WEIGHTS.items())
    copy_times = {}

    def record(kind, code, seconds=None, response=None):
        with lock:
            codes[kind][code] += 1
            if seconds is not None and code == "OK":
                latencies[kind].append(seconds)
            if response is not None and response.model_spec.version.value:
                version = int(response.model_spec.version.value)
                versions[version] += 1
                if version == 2 and first_v2[0] is None:
                    first_v2[0] = time.perf_counter() - start

    def take():
        with lock:
            if sent[0] >= args.requests or time.perf_counter() > deadline:
                return False
            sent[0] += 1
            return True

    def outcome(error):
        details = error.details() or ""
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (
                details.startswith(BUSY_PREFIX) or "Concurrent RPC limit" in details):
            return "BUSY"
        return error.code().name

    def call(stub, request, timeout):
        """(code name, response or None, busy: a RESOURCE_EXHAUSTED that asks to retry later)."""
        try:
            return "OK", stub.Predict(request, timeout=timeout), False
        except grpc.RpcError as error:
            details = error.details() or ""
            return outcome(error), None, outcome(error) == "BUSY"

    def client(seed):
        rng = random.Random(seed)
        stub = stub_factory()
        while take():
            kind = rng.choices(kinds, weights)[0]
            if kind in VALID_KINDS:
                if kind == "valid":
                    request, _ = requests.tile(rng)
                elif kind == "large":
                    request = requests.cached("large", lambda: requests.predict(requests._image(LARGE_SHAPE)))
                else:
                    request = requests.cached("metadata", lambda: requests.predict(None, "metadata"))
                began = time.perf_counter()
                for attempt in range(BUSY_RETRIES + 1):
                    code, response, busy = call(stub, request, 120)
                    if not busy or attempt == BUSY_RETRIES:
                        break
                    with lock:
                        busy_retries[kind] += 1
                    time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + rng.random()))
                record(kind, code, time.perf_counter() - began, response)
            elif kind == "cancelled":
                request = requests.cached("cancel", lambda: requests.predict(requests._image((1, 512, 512))))
                future = stub.Predict.future(request, timeout=60)
                time.sleep(rng.random() * 0.1)
                future.cancel()
                try:
                    future.result()
                    record(kind, "OK")
                except grpc.FutureCancelledError:
                    record(kind, "CANCELLED")
                except grpc.RpcError as error:
                    record(kind, outcome(error))
            elif kind == "flood":
                request = requests.cached("flood", lambda: requests.predict(requests._image((1, 256, 256))))
                burst = [stub.Predict.future(request, timeout=120) for _ in range(FLOOD)]
                for future in burst:
                    try:
                        future.result()
                        record(kind, "OK")
                    except grpc.RpcError as error:
                        record(kind, outcome(error))
            elif kind == "deadline":
                request = requests.cached("deadline", lambda: requests.predict(requests._image((2, 512, 512))))
                record(kind, call(stub, request, 0.05)[0])
            else:
                if kind == "malformed":
                    request = requests.malformed(rng)
                elif kind == "oversized":
                    request = requests.cached("oversized", lambda: requests.predict(requests._image((1, 2560, 2560))))
                elif kind == "broadcast":
                    request = requests.broadcast(rng)
                else:  # huge_message: 70 MB, over --max-message-mb 64
                    request = requests.cached("huge", lambda: requests.predict(
                        np.zeros((1, 4830, 4830, 3), np.uint8)))
                record(kind, call(stub, request, 60)[0])

    def copier():
        """Copy version 2 in file by file, slowly, saved_model.pb first (not atomic), once
        ``--copy-at`` of the requests were sent or of the seconds passed."""
        while sent[0] < args.copy_at * args.requests and time.perf_counter() - start < args.copy_at * args.seconds:
            time.sleep(0.05)
        files = []
        for root, _, names in os.walk(source):
            files += [os.path.relpath(os.path.join(root, name), source) for name in names]
        files.sort(key=lambda rel: (rel != "saved_model.pb", rel))
        copy_times["started_s"] = time.perf_counter() - start
        for rel in files:
            destination = os.path.join(target_dir, rel)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with open(os.path.join(source, rel), "rb") as handle:
                data = handle.read()
            pieces = 4 if len(data) > 64 * 1024 else 1
            with open(destination, "wb") as handle:
                for index in range(pieces):
                    handle.write(data[index * len(data) // pieces:(index + 1) * len(data) // pieces])
                    handle.flush()
                    if index < pieces - 1:
                        time.sleep(args.copy_delay / 2)
            if rel != files[-1]:
                time.sleep(args.copy_delay)
        copy_times["finished_s"] = time.perf_counter() - start
        copy_times["files"] = len(files)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
    copy_thread = threading.Thread(target=copier, daemon=True)
    copy_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    copy_thread.join(timeout=max(0.0, args.seconds))
    return {"started_at": start, "codes": codes, "latencies": latencies, "busy_retries": busy_retries,
            "versions": versions,
            "first_v2_s": first_v2[0], "elapsed_s": elapsed, "sent": sent[0], "copy": copy_times}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="requests to send at most")
    parser.add_argument("--seconds", type=float, default=150, help="stop sending after this many seconds")
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--server-args", default="", dest="server_args",
                        help="extra serving.server flags, e.g. '--onednn' or '--max-inflight 4'")
    parser.add_argument("--poll", type=float, default=0.5, help="server --poll seconds")
    parser.add_argument("--copy-at", type=float, default=0.33, dest="copy_at",
                        help="start copying version 2 at this fraction of --requests or --seconds, the sooner")
    parser.add_argument("--copy-delay", type=float, default=1.5, dest="copy_delay",
                        help="seconds between the files of the slow copy")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before the final RSS")
    parser.add_argument("--name", default="server_load", help="results file stem")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.requests < 1 or args.seconds <= 0 or args.clients < 1:
        sys.exit("bench_server_load: --requests, --seconds and --clients must be positive")

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    load_before = [round(x, 2) for x in os.getloadavg()]  # the 2 cores are shared: say how busy they were
    work = tempfile.mkdtemp(prefix="bench_server_load_")
    try:
        base, source = export_models(work)
        server = Server(base, shlex.split(args.server_args), args.poll)
        server.wait_listening()
        target = f"127.0.0.1:{server.port}"
        channels = []

        def stub_factory():
            channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 128 * 2 ** 20),
                                                             ("grpc.max_receive_message_length", 256 * 2 ** 20)])
            channels.append(channel)
            return prediction_service_pb2_grpc.PredictionServiceStub(channel)

        requests = Requests()
        warm = stub_factory()
        rss_start = server.rss()
        for shape in TILE_SHAPES:  # every valid kind once (first calls initialise), then settle
            warm.Predict(requests.predict(requests._image(shape)), timeout=120)
            warm.Predict(requests.tile(random.Random(len(shape)))[0], timeout=120)
        warm.Predict(requests.predict(None, "metadata"), timeout=120)
        time.sleep(2)
        large = requests.predict(requests._image(LARGE_SHAPE))
        before, peak_large = server.rss(), peak_during(server, lambda: warm.Predict(large, timeout=120))
        mb_per_mpix = (peak_large - before) / (np.prod(LARGE_SHAPE) / 1e6)
        time.sleep(2)
        baseline = server.rss()
        server.sample()
        tallies = run_load(args, requests, stub_factory, server, source, os.path.join(base, "unet", "2"))
        time.sleep(args.settle)
        final = server.rss()
        for channel in channels:
            channel.close()
        server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    samples = server.samples
    log = [line for _, line in server.lines]
    stats_line = next((line for line in reversed(log) if "Predict outcomes" in line), "")
    valid = tallies["latencies"]["valid"]
    errors_on_valid = {kind: {c: n for c, n in tallies["codes"][kind].items() if c != "OK"} for kind in VALID_KINDS}
    unexpected = {kind: {c: n for c, n in counts.items() if c not in EXPECTED[kind]}
                  for kind, counts in tallies["codes"].items()}
    refusals = Counter()
    for kind, counts in tallies["codes"].items():
        for code, n in counts.items():
            if code != "OK":
                refusals["RESOURCE_EXHAUSTED" if code == "BUSY" else code] += n
    result = {
        "command": " ".join(["python3", "bench/bench_server_load.py",
                             *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))]),
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                     "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "server_args": args.server_args, "clients": args.clients, "weights": WEIGHTS,
        "requests_sent": tallies["sent"], "elapsed_s": round(tallies["elapsed_s"], 2),
        "requests_per_s": round(tallies["sent"] / tallies["elapsed_s"], 2),
        "valid_ok": tallies["codes"]["valid"]["OK"],
        "valid_p50_ms": round(1000 * percentile(valid, 50), 1), "valid_p99_ms": round(1000 * percentile(valid, 99), 1),
        "large_p50_ms": round(1000 * percentile(tallies["latencies"]["large"], 50), 1),
        "errors_on_valid": sum(sum(v.values()) for v in errors_on_valid.values()),
        "errors_on_valid_by_kind": errors_on_valid,
        "busy_retries": dict(tallies["busy_retries"]),
        "codes_by_kind": {kind: dict(counts) for kind, counts in sorted(tallies["codes"].items())},
        "refusals_by_code": dict(refusals), "unexpected_outcomes": {k: v for k, v in unexpected.items() if v},
        "server_predict_outcomes": stats_line.split("Predict outcomes: ", 1)[-1] if stats_line else None,
        "responses_by_version": dict(tallies["versions"]),
        "copy": tallies["copy"], "first_v2_response_s": tallies["first_v2_s"],
        "load_failures_logged": sum("cannot load" in line for line in log),
        "v2_loaded_s": next((round(t - tallies["started_at"], 2) for t, line in server.lines
                             if "serving unet version 2" in line), None),
        "working_mb_per_mpix": round(mb_per_mpix, 1),
        "rss_mb": {"at_start": round(rss_start, 1), "baseline_after_warmup": round(baseline, 1),
                   "peak": round(max(r for _, r in samples), 1) if samples else None,
                   "final_after_settle": round(final, 1), "final_minus_baseline": round(final - baseline, 1)},
        "rss_steady": steady_state(samples, tallies["elapsed_s"]),
        "rss_samples": [(round(t, 1), round(r, 1)) for t, r in samples[::10]],
        "server_log": log[-40:],
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    write_markdown(os.path.join(args.out, f"{args.name}.md"), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_samples", "server_log")}, indent=2))


def steady_state(samples, elapsed):
    """Is memory flat under load? The second half of the sending period (after the version
    switch of the first half), split in two quarters: their median VmRSS, and the least-squares
    slope over the half in MB per minute. A leak shows as a positive slope and a rising median."""
    if len(samples) < 8:
        return None
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples])
    start = t[0]
    third, fourth, end = start + elapsed / 2, start + 3 * elapsed / 4, start + elapsed
    half = (t >= third) & (t <= end)
    early, late = (t >= third) & (t < fourth), (t >= fourth) & (t <= end)
    if half.sum() < 4 or not early.any() or not late.any():
        return None
    slope = np.polyfit(t[half], rss[half], 1)[0] * 60
    return {"window_s": [round(third - start, 1), round(end - start, 1)],
            "median_early_mb": round(float(np.median(rss[early])), 1),
            "median_late_mb": round(float(np.median(rss[late])), 1),
            "slope_mb_per_min": round(float(slope), 1)}


def write_markdown(path, r):
    rss = r["rss_mb"]
    lines = ["# serving.server under hostile load", "",
             f"Command: `{r['command']}`", "",
             f"{r['clients']} client threads on loopback, {r['platform']['cpus']} CPUs shared with the server "
             f"(load average {r['platform']['load_average_before'][0]} before, "
             f"{r['platform']['load_average_after'][0]} after: other jobs ran on the same cores); "
             f"server flags: `{r['server_args'] or '(defaults)'}`; untrained tiny U-Net (filters 4, depth 3).", "",
             "| requests | seconds | requests/s | valid OK | valid p50 ms | valid p99 ms | large (2.4 Mpix) p50 ms | "
             "errors on valid |",
             "|---|---|---|---|---|---|---|---|",
             f"| {r['requests_sent']} | {r['elapsed_s']} | {r['requests_per_s']} | {r['valid_ok']} | {r['valid_p50_ms']} | "
             f"{r['valid_p99_ms']} | {r['large_p50_ms']} | **{r['errors_on_valid']}** |", "",
             "Outcomes per request kind (client side):", "",
             "| kind | outcomes |", "|---|---|"]
    lines += [f"| {kind} | {', '.join(f'{c} {n}' for c, n in sorted(counts.items()))} |"
              for kind, counts in r["codes_by_kind"].items()]
    lines += ["", f"Refusals by code: {', '.join(f'{c} {n}' for c, n in sorted(r['refusals_by_code'].items()))}. "
              f"BUSY is RESOURCE_EXHAUSTED with 'server busy' (queue or in-flight pixels full) or gRPC's "
              f"'Concurrent RPC limit exceeded'; valid requests retried it with back-off {r['busy_retries'] or 0} times. "
              f"Unexpected outcomes: {r['unexpected_outcomes'] or 'none'}.", "",
              f"Server-side Predict outcomes: `{r['server_predict_outcomes']}`.", "",
              f"Version 2 copied file by file ({r['copy'].get('files')} files, saved_model.pb first) from "
              f"{r['copy'].get('started_s', float('nan')):.1f} s to {r['copy'].get('finished_s', float('nan')):.1f} s; "
              f"load failures logged: {r['load_failures_logged']}; version 2 loaded at "
              + (f"{r['v2_loaded_s']:.1f} s" if r["v2_loaded_s"] is not None else "never")
              + "; first response from version 2 at "
              + (f"{r['first_v2_response_s']:.1f} s" if r["first_v2_response_s"] is not None else "never")
              + f"; responses by version: {r['responses_by_version']}.", "",
              "| server VmRSS MB | at start | after warm-up (baseline) | peak | final (after "
              "settling) | final - baseline |", "|---|---|---|---|---|---|",
              f"| | {rss['at_start']} | {rss['baseline_after_warmup']} | {rss['peak']} | {rss['final_after_settle']} | "
              f"{rss['final_minus_baseline']:+} |", "",
              f"Working memory of one request, measured alone during the warm-up (peak VmRSS growth while a "
              f"{LARGE_SHAPE[1]} x {LARGE_SHAPE[2]} image ran): {r['working_mb_per_mpix']} MB per Mpix, so the "
              f"default budgets (4 Mpix per request, 16 Mpix in flight) bound this model's live request memory at "
              f"about {r['working_mb_per_mpix'] * 16 / 1000:.1f} GB.", ""]
    steady = r.get("rss_steady")
    if steady:
        lines += [f"Steady state (second half of the load, {steady['window_s'][0]:.0f}-{steady['window_s'][1]:.0f} s, "
                  f"after the version switch): median VmRSS {steady['median_early_mb']} MB in its first quarter, "
                  f"{steady['median_late_mb']} MB in its last; least-squares slope {steady['slope_mb_per_min']:+} MB "
                  "per minute.", ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
