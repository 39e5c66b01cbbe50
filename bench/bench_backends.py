"""Training step time of the same models and data pipelines under TensorFlow and JAX.

    python3 bench/bench_backends.py [--steps 30]

Why: bench/run_cpu_budget.py picks its backend from this (on a CPU, TensorFlow trains
slower than JAX from the same Keras ``PyDataset``). Each backend runs in its own
process (a backend is fixed at import), one after the other, on the same batches:
U-Net (8 filters) on 8 x 128^2 crops of the shipped sample, and DCRN (CPU-budget width) on
32 x 32 CRCHistoPhenotypes patches. Writes bench/results/backends.md and .json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CRC = os.path.join(ROOT, "..", "shared", "data", "crchistophenotypes")


def worker(steps):
    """Runs inside one backend: seconds per step from a PyDataset and from arrays."""
    sys.path.insert(0, ROOT)
    import keras
    import numpy as np

    from kerasnuc import models
    from kerasnuc.data.pipeline import ClassificationDataset, SegmentationDataset
    from kerasnuc.data.spec import load_dataset
    from kerasnuc.losses import get_loss

    cases = {"unet_f8_128px_b8": (lambda: SegmentationDataset(load_dataset("sample"), tile=128, batch_size=8,
                                                              steps=steps, seed=0),
                                  lambda: models.build("unet", filters=8, depth=4), get_loss("bce_dice"))}
    if os.path.isdir(CRC):
        cases["dcrn_cpu_32px_b32"] = (
            lambda: ClassificationDataset(load_dataset("crchisto:" + CRC), batch_size=32, steps=steps, seed=0),
            lambda: models.build("dcrn", input_shape=(32, 32, 3), initial_filters=32, layers_per_block=4),
            "sparse_categorical_crossentropy")
    result = {"backend": keras.backend.backend()}
    for name, (make_data, make_model, loss) in cases.items():
        data = make_data()
        arrays = [data[i] for i in range(steps)]
        x, y = np.concatenate([a for a, _ in arrays]), np.concatenate([b for _, b in arrays])
        timings = {}
        for source in ("arrays", "pydataset"):  # arrays first: a PyDataset fit slows later TF fits in-process
            model = make_model()
            model.compile(keras.optimizers.Adam(1e-3), loss)
            fit = (lambda epochs: model.fit(data, epochs=epochs, verbose=0)) if source == "pydataset" else \
                (lambda epochs: model.fit(x, y, batch_size=len(arrays[0][0]), epochs=epochs, shuffle=False, verbose=0))
            fit(1)  # compile / trace
            started = time.perf_counter()
            fit(1)
            timings[source] = (time.perf_counter() - started) / steps
        result[name] = timings
        print(f"  {result['backend']:10s} {name}: {timings['pydataset']:.3f} s/step from PyDataset, "
              f"{timings['arrays']:.3f} s/step from arrays", file=sys.stderr, flush=True)
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps)
    rows = []
    for backend in ("tensorflow", "jax"):
        print(f"{backend}: {args.steps} timed steps per case", flush=True)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps)],
                             cwd=ROOT, env=dict(os.environ, KERAS_BACKEND=backend), capture_output=True, text=True)
        sys.stderr.write("".join(l + "\n" for l in out.stderr.splitlines() if l.startswith("  ")))
        if out.returncode:
            sys.exit(f"bench_backends: the {backend} worker failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cases = [k for k in rows[0] if k != "backend"]
    lines = ["| case | backend | s/step from PyDataset | s/step from arrays |", "|---|---|---|---|"]
    for case in cases:
        for row in rows:
            lines.append(f"| {case} | {row['backend']} | {row[case]['pydataset']:.3f} | {row[case]['arrays']:.3f} |")
    text = (f"# Training step time by Keras backend\n\n`python3 bench/bench_backends.py --steps {args.steps}` on "
            f"{os.cpu_count()} CPUs ({platform.platform()}), {time.strftime('%Y-%m-%d')}; the two backends ran "
            "one after the other on the same batches.\n\n" + "\n".join(lines) + "\n")
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "backends.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    with open(os.path.join(args.results, "backends.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
