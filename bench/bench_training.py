"""Training throughput per family: the model alone, the input pipeline alone, and the two together.

    python3 bench/bench_training.py                       # U-Net, UD-Net, DCRN; JAX; float32; CPU configs
    python3 bench/bench_training.py --families dcrn --precision float32,mixed_float16 --seconds 10
    python3 bench/bench_training.py --full --data-root device_data --results $OUT   # a GPU box (full widths)

Why: issue 18 wants the input pipeline never to be the bottleneck (together >= 80% of the model
alone). Each family uses its config file's model, batch, tile/patch, augmentation and workers and
the real data (DSB 2018 stage1_train for U-Net, CRCHistoPhenotypes for UD-Net and DCRN), split as
``training.fit`` splits it. Three measurements, interleaved in every repeat (the machine is shared:
read the ratios, the absolutes move with the load), medians over ``--repeats``:

* model alone: steps/s of ``model.fit`` on 8 batches made once by the real pipeline and cached in
  memory (the same compiled train step, after a warm-up that compiles it);
* pipeline alone: batches/s the training ``PyDataset`` delivers through Keras' own loader
  (its enqueuer with the configured ``workers``, augmentation on), with no model;
* together: steps/s of ``training.callbacks.fit_into_run`` (the call ``training.fit`` makes, with
  its callbacks and validation data) on that pipeline, timed by a callback inside it.

The first batches of every measurement are not timed (``--skip``). Writes ``training.json`` and
``training.md`` into ``--results`` (default bench/results); progress goes to stderr.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# family -> (task module, CPU-budget config, full-recipe config)
FAMILIES = {
    "unet": ("segmentation", "configs/unet_dsb2018_cpu.json", "configs/unet_dsb2018.json"),
    "udnet": ("detection", "configs/cpu/udnet_crchisto.json", "configs/udnet_crchisto.json"),
    "dcrn": ("classification", "configs/cpu/dcrn_crchisto.json", "configs/dcrn_crchisto.json"),
}
CACHED_BATCHES = 8
SHARED_DATA = "../shared/data"


def progress(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python3 bench/bench_training.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="unet,udnet,dcrn", help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax",
                        help="Keras backend (set before Keras is imported)")
    parser.add_argument("--precision", default="float32",
                        help="comma-separated dtype policies, measured side by side (float32, mixed_float16, "
                             "mixed_bfloat16); on a CPU mixed precision is only a correctness check")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the three measurements (medians)")
    parser.add_argument("--skip", type=int, default=3, help="untimed batches at the start of each measurement")
    parser.add_argument("--workers", type=lambda v: -1 if v == "auto" else int(v), default=None,
                        help="override the configs' workers: a thread count, or 'auto' (one per core left "
                             "over, kerasnuc.data.pipeline.resolve_workers)")
    parser.add_argument("--full", action="store_true",
                        help="the full recipes (configs/*.json, paper widths) instead of the CPU-budget configs")
    parser.add_argument("--data-root", default=SHARED_DATA,
                        help=f"folder that replaces {SHARED_DATA} in the configs' data specs (a device's device_data)")
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="folder for training.json/.md")
    parser.add_argument("--name", default="training", help="base name of the result files")
    parser.add_argument("--scratch", default=os.path.join(ROOT, "runs", "tmp_bench_training"),
                        help="run folders of the 'together' measurement (deleted afterwards)")
    args = parser.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    args.precision = [p for p in args.precision.split(",") if p]
    return args


def family_config(family, args):
    """The resolved FitConfig of ``family`` (its config file; data under ``--data-root``)."""
    from training.config import load_config_file, resolve

    path = os.path.join(ROOT, FAMILIES[family][2 if args.full else 1])
    values = load_config_file(path)
    fmt, _, location = values["data"].partition(":")
    if location.startswith(SHARED_DATA):
        location = os.path.join(args.data_root, os.path.relpath(location, SHARED_DATA))
    overrides = {"data": f"{fmt}:{location}"}
    if args.workers is not None:
        overrides["workers"] = args.workers
    config = resolve(values, overrides)
    return config, os.path.relpath(path, ROOT)


def split_records(config):
    """(train, val) records, split as training.fit splits them (seed, fractions)."""
    from kerasnuc.data import load_dataset
    from kerasnuc.data.splits import records_of, train_val_test_split

    records = load_dataset(config.data)
    split = train_val_test_split([r.name for r in records], config.val_fraction,
                                 0.0 if config.test_data else config.test_fraction, seed=config.seed)
    train, val, _ = records_of(records, split)
    return train, val


def build(family, config, train_records, val_records):
    """(model, training dataset, validation dataset) as the family's training.<task>.train builds them."""
    import importlib

    task = importlib.import_module(f"training.{FAMILIES[family][0]}")
    quiet = lambda message: None  # noqa: E731
    if family == "unet":
        from kerasnuc.data.augment import Augmenter
        from kerasnuc.data.pipeline import SegmentationDataset

        model = task.build_model(config)
        augmenter = Augmenter(**config.augment) if config.augment else None
        train = SegmentationDataset(train_records, tile=config.tile, batch_size=config.batch_size,
                                    steps=config.steps_per_epoch or None, channels=config.channels,
                                    augmenter=augmenter, seed=config.seed, workers=config.workers)
        val = SegmentationDataset(val_records, tile=config.tile, batch_size=config.batch_size,
                                  channels=config.channels, seed=config.seed + 1)
    elif family == "udnet":
        from kerasnuc.data.augment import Augmenter
        from kerasnuc.data.pipeline import DetectionDataset

        model = task.build_model(config, task.detection_loss(config, quiet))
        augmenter = Augmenter(**config.augment) if config.augment else None
        train = DetectionDataset(train_records, tile=config.tile, batch_size=config.batch_size,
                                 sigma=config.density_sigma, steps=config.steps_per_epoch or None,
                                 channels=config.channels, augmenter=augmenter, seed=config.seed,
                                 workers=config.workers)
        val = task._FixedCrops(val_records, tile=config.tile, batch_size=config.batch_size,
                               sigma=config.density_sigma, channels=config.channels, seed=config.seed + 1)
    else:
        from kerasnuc.data.pipeline import ClassificationDataset

        train_records, val_records = task.with_classes(train_records), task.with_classes(val_records)
        names = task.class_names_of(train_records + val_records)
        model = task.build_model(config, len(names), task.classification_loss(config, quiet))
        train = ClassificationDataset(train_records, patch=config.patch, batch_size=config.batch_size,
                                      steps=config.steps_per_epoch or None, channels=config.channels,
                                      augmenter=task.make_augmenter(config, quiet), seed=config.seed,
                                      balanced=config.balanced, workers=config.workers)
        val = ClassificationDataset(val_records, patch=config.patch, batch_size=config.batch_size,
                                    channels=config.channels, evaluation=True)
    return model, train, val


def _timer_class():
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Counts training batches; after ``skip`` of them times ``seconds``, then stops training.

        A batch hook makes Keras wait for each step's logs (on a GPU: the device) before the
        next step; with ``workers`` >= 2 the loader's threads still build batches meanwhile,
        so the ratio keeps its meaning, and both step rates are slight lower bounds. (Keras'
        ``async_safe`` dispatch avoided the wait but failed under JAX: a donated buffer.)"""

        def __init__(self, seconds, skip):
            super().__init__()
            self.seconds, self.skip, self.count, self.started, self.last = seconds, skip, 0, None, None

        def on_train_batch_end(self, batch, logs=None):
            self.count += 1
            now = time.perf_counter()
            if self.count == self.skip:
                self.started = now
            elif self.count > self.skip:
                self.last = now
                if now - self.started >= self.seconds:
                    self.model.stop_training = True

        @property
        def rate(self):
            if self.last is None:
                return float("nan")
            return (self.count - self.skip) / (self.last - self.started)

    return StepTimer


def _cached_class():
    import keras

    class Cached(keras.utils.PyDataset):
        """Batches made once, repeated: the model's speed without the pipeline's."""

        def __init__(self, batches, steps):
            super().__init__()
            self.batches, self.steps = batches, steps

        def __len__(self):
            return self.steps

        def __getitem__(self, index):
            return self.batches[index % len(self.batches)]

    return Cached


def time_pipeline(dataset, seconds, skip):
    """Batches/s that Keras' loader gets from ``dataset`` (its enqueuer and workers, as in fit)."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(dataset, shuffle=False)
    count, started, last = 0, None, None
    try:
        while True:  # a pass may end before the time does: start another, as the next epoch would
            for _ in adapter.get_numpy_iterator():
                count += 1
                now = time.perf_counter()
                if count == skip:
                    started = now
                elif count > skip:
                    last = now
                    if now - started >= seconds:
                        return (count - skip) / (last - started)
            adapter.on_epoch_end()
    finally:
        if adapter.enqueuer is not None:
            adapter.enqueuer.stop()


def measure(family, config, args, precision, data):
    """One row: medians of the three measurements over ``args.repeats``."""
    import keras
    import numpy as np

    from training.callbacks import fit_into_run
    from training.precision import apply_precision
    from training.rundir import RunDirectory

    policy = apply_precision(precision)
    keras.utils.set_random_seed(config.seed)
    model, train, val = build(family, config, *data)
    batches = [train[i] for i in range(CACHED_BATCHES)]
    timer_class = _timer_class()
    cached = _cached_class()(batches, max(len(train), CACHED_BATCHES))
    started = time.perf_counter()
    model.fit(cached, epochs=1, steps_per_epoch=args.skip + 2, verbose=0, shuffle=False)  # compile
    compile_seconds = time.perf_counter() - started
    progress(f"{family} {policy}: {model.count_params():,} parameters, compiled in {compile_seconds:.1f}s; "
             f"{len(train)} steps/epoch, workers {train.workers}")
    rates = {"model": [], "pipeline": [], "together": []}
    for repeat in range(args.repeats):
        timer = timer_class(args.seconds, args.skip)
        model.fit(cached, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
        rates["model"].append(timer.rate)
        rates["pipeline"].append(time_pipeline(train, args.seconds, args.skip))
        folder = os.path.join(args.scratch, f"{family}_{policy}_{repeat}")
        run = RunDirectory(folder, overwrite=True)
        timer = timer_class(args.seconds, args.skip)
        try:
            fit_into_run(model, run, train, val, config.epochs, log=lambda message: None,
                         extra_callbacks=[timer])
        finally:
            run.release()
            shutil.rmtree(run.path, ignore_errors=True)
        rates["together"].append(timer.rate)
        progress(f"{family} {policy} repeat {repeat + 1}/{args.repeats}: model {rates['model'][-1]:.2f} steps/s, "
                 f"pipeline {rates['pipeline'][-1]:.2f} batches/s, together {rates['together'][-1]:.2f} steps/s")
    median = {k: float(statistics.median(v)) for k, v in rates.items()}
    x = np.asarray(batches[0][0])
    per_step = int(x.shape[0]) * (int(x.shape[1]) * int(x.shape[2]) if family != "dcrn" else 1)
    return {"family": family, "model": config.model, "backend": keras.backend.backend(), "precision": policy,
            "batch": int(config.batch_size), "input": list(x.shape[1:]), "workers": int(train.workers),
            "parameters": int(model.count_params()), "compile_seconds": round(compile_seconds, 1),
            "model_steps_per_s": median["model"], "pipeline_batches_per_s": median["pipeline"],
            "together_steps_per_s": median["together"], "ratio": median["together"] / median["model"],
            "unit": "patches" if family == "dcrn" else "pixels", "per_second": median["together"] * per_step,
            "runs": rates}


def render(rows, command, machine):
    lines = ["| family | backend | precision | batch | workers | model alone steps/s | pipeline batches/s "
             "| together steps/s | together / model | throughput (together) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        amount = (f"{r['per_second']:,.0f} patches/s" if r["unit"] == "patches"
                  else f"{r['per_second'] / 1e6:.2f} Mpx/s")
        lines.append(f"| {r['family']} ({r['model']}) | {r['backend']} | {r['precision']} | {r['batch']} x "
                     f"{'x'.join(str(v) for v in r['input'][:2])} | {r['workers']} | {r['model_steps_per_s']:.2f} | "
                     f"{r['pipeline_batches_per_s']:.2f} | {r['together_steps_per_s']:.2f} | "
                     f"{r['ratio']:.0%} | {amount} |")
    return (f"# Training throughput: model alone, pipeline alone, together\n\n`{command}`\n\n{machine}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Medians of the repeats; the machine is "
            "shared, so compare the ratios rather than the absolutes. Issue 18 wants together / model "
            ">= 80%.\n\n" + "\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.chdir(ROOT)  # the configs' data specs are relative to the checkout
    from kerasnuc.atomic import write_text_atomic
    from training.precision import accelerator_name

    command = "python3 bench/bench_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = (f"{os.cpu_count()} CPUs ({platform.platform()})"
               + (f", accelerator {accelerator_name()}" if accelerator_name() else ""))
    rows = []

    def write():  # after every row: a run cut short (a device's time limit) still leaves its rows
        os.makedirs(args.results, exist_ok=True)
        write_text_atomic(os.path.join(args.results, f"{args.name}.json"),
                          json.dumps({"command": command, "machine": machine, "seconds": args.seconds,
                                      "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
        write_text_atomic(os.path.join(args.results, f"{args.name}.md"), render(rows, command, machine))

    for family in args.families:
        config, path = family_config(family, args)
        progress(f"{family}: {path}, data {config.data}")
        started = time.perf_counter()
        data = split_records(config)
        progress(f"{family}: {len(data[0])} train / {len(data[1])} val images read in "
                 f"{time.perf_counter() - started:.1f}s")
        for precision in args.precision:
            rows.append({**measure(family, config, args, precision, data), "config": path})
            write()
    shutil.rmtree(args.scratch, ignore_errors=True)
    print(render(rows, command, machine))

if __name__ == "__main__":
    main()
