"""Run the CPU-budget versions of the papers' recipes, then build the reproduction table.

    python3 bench/run_cpu_budget.py                 # all of configs/cpu/, then the table
    python3 bench/run_cpu_budget.py --only dcrn_crchisto udnet_crchisto

Each config in configs/cpu/ is one paper recipe shrunk to a 2-core CPU (its ``_comment``
lists every deviation; ``time_budget`` caps the training minutes of each model or fold).
Each runs as ``python -m training.fit --config configs/cpu/NAME.json --out runs/cpu_budget/NAME``
(log beside it in NAME.log), under the Keras backend given by ``--backend`` (default jax:
on this CPU it trains these models 1.3-1.5x faster than TensorFlow, bench/results/backends.md).
A run that fails is reported and the others still run. The table is written by
bench/reproduce.py to bench/results/reproduce.md from the finished run folders only.
"""

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ORDER = ("unet_dsb2018_5fold", "r2unet_dsb2018_5fold", "udnet_crchisto", "dcrn_crchisto",
         "densenet_crchisto", "unet_monuseg", "segnet_monuseg", "fcn8_monuseg", "fc_densenet_monuseg",
         "pspsegnet_monuseg", "ce2p_monuseg", "bayesnuseg_monuseg")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="config names in configs/cpu/ (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "cpu_budget"))
    parser.add_argument("--backend", default="jax", choices=("jax", "tensorflow"))
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args()
    available = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "configs", "cpu", "*.json")))
    names = args.only or [n for n in ORDER if n in available] + [n for n in available if n not in ORDER]
    unknown = sorted(set(names) - set(available))
    if unknown:
        sys.exit(f"bench/run_cpu_budget.py: no configs/cpu/{unknown[0]}.json; available: {', '.join(available)}")
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for i, name in enumerate(names if not args.table_only else []):
        run_dir, log_path = os.path.join(args.out, name), os.path.join(args.out, name + ".log")
        command = [sys.executable, "-m", "training.fit", "--config", os.path.join("configs", "cpu", name + ".json"),
                   "--out", run_dir, "--overwrite"]
        print(f"[{i + 1}/{len(names)}] {name}: {' '.join(command[1:])} (log {os.path.relpath(log_path, ROOT)})", flush=True)
        started = time.time()
        with open(log_path, "w") as log:
            code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, KERAS_BACKEND=args.backend))
        if code:
            failed.append(name)
        summary = _last_line(log_path, "summary:") if code == 0 else f"FAILED (exit {code}), see {log_path}"
        print(f"    {time.time() - started:.0f}s  {summary}", flush=True)
    finished = [os.path.join(args.out, n) for n in names if os.path.isfile(os.path.join(args.out, n, "metrics.json"))]
    if finished:
        # with --only, the rows of the other recipes' earlier runs stay in the table (reproduce.py --keep)
        keep = ["--keep"] if args.only else []
        subprocess.check_call([sys.executable, os.path.join(HERE, "reproduce.py"), *finished, *keep], cwd=ROOT)
    print(f"done: {len(finished)} finished runs in {os.path.relpath(args.out, ROOT)}; table bench/results/reproduce.md"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


def _last_line(path, prefix):
    lines = [l.strip() for l in open(path, errors="replace") if l.startswith(prefix)]
    return lines[-1] if lines else ""


if __name__ == "__main__":
    main()
