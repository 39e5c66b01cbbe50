"""Train a model and write a self-describing run directory.

    python -m training.fit                      # quick start: small U-Net on the shipped sample
    python -m training.fit --config configs/r2unet_dsb2018.json --epochs 5

The run folder holds config.json (resolved), split.json, model.keras, history.csv,
curves.png, thresholds.json, metrics.json and overlay.png.
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _workers(text):
    """--workers: a count or 'auto'."""
    return text if text == "auto" else int(text)


def build_parser():
    from training.config import PRECISIONS, TASKS, field_help
    from training.distribute import CHOICES

    docs = field_help()
    parser = argparse.ArgumentParser(
        prog="python -m training.fit", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON config file; flags given here override its values")
    parser.add_argument("--task", choices=TASKS, help=docs["task"])
    parser.add_argument("--model", help=docs["model"])
    parser.add_argument("--model-config", type=json.loads, dest="model_config", metavar="JSON",
                        help=docs["model_config"] + ' Example: \'{"filters": 32, "depth": 3}\'')
    parser.add_argument("--data", help=docs["data"] + " e.g. dsb2018:../shared/data/dsb2018/stage1_train")
    parser.add_argument("--test-data", dest="test_data", help=docs["test_data"])
    parser.add_argument("--channels", type=int, choices=(1, 3), help=docs["channels"])
    parser.add_argument("--mpp", type=float, help=docs["mpp"])
    parser.add_argument("--epochs", type=int, help="Training epochs.")
    parser.add_argument("--batch-size", type=int, dest="batch_size", help="Crops per batch.")
    parser.add_argument("--tile", type=int, help=docs["tile"])
    parser.add_argument("--steps-per-epoch", type=int, dest="steps_per_epoch", help=docs["steps_per_epoch"])
    parser.add_argument("--learning-rate", "--lr", type=float, dest="learning_rate", help="Initial learning rate.")
    parser.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), help=docs["optimizer"])
    parser.add_argument("--momentum", type=float, help=docs["momentum"])
    parser.add_argument("--weight-decay", type=float, dest="weight_decay", help="Weight decay (0: none).")
    parser.add_argument("--loss", help=docs["loss"])
    parser.add_argument("--loss-options", type=json.loads, dest="loss_options", metavar="JSON",
                        help=docs["loss_options"])
    parser.add_argument("--val-fraction", type=float, dest="val_fraction", help="Share of images for validation.")
    parser.add_argument("--test-fraction", type=float, dest="test_fraction", help="Share of images held out for testing.")
    parser.add_argument("--seed", type=int, help="Seed for the split, the crops, augmentation and initialisation.")
    parser.add_argument("--precision", choices=PRECISIONS, help=docs["precision"])
    parser.add_argument("--mc-samples", type=int, dest="mc_samples", help=docs["mc_samples"])
    parser.add_argument("--folds", type=int, help=docs["folds"])
    parser.add_argument("--split", help=docs["split"])
    parser.add_argument("--stain", type=json.loads, metavar="JSON", help=docs["stain"])
    parser.add_argument("--density-sigma", type=float, dest="density_sigma", help=docs["density_sigma"])
    parser.add_argument("--match-radius", type=float, dest="match_radius", help=docs["match_radius"])
    parser.add_argument("--patch", type=int, help=docs["patch"])
    parser.add_argument("--balanced", action="store_true", default=None, help=docs["balanced"])
    parser.add_argument("--time-budget", type=float, dest="time_budget", metavar="MINUTES",
                        help=docs["time_budget"])
    parser.add_argument("--self-correction", type=int, dest="self_correction", metavar="CYCLES",
                        help=docs["self_correction"])
    parser.add_argument("--self-correction-epochs", type=int, dest="self_correction_epochs",
                        help=docs["self_correction_epochs"])
    parser.add_argument("--self-correction-lr-max", type=float, dest="self_correction_lr_max",
                        metavar="FRACTION", help=docs["self_correction_lr_max"])
    parser.add_argument("--self-correction-lr-min", type=float, dest="self_correction_lr_min",
                        metavar="FRACTION", help=docs["self_correction_lr_min"])
    parser.add_argument("--self-correction-bn-batches", type=int, dest="self_correction_bn_batches",
                        help=docs["self_correction_bn_batches"])
    parser.add_argument("--init-weights", dest="init_weights", metavar="MODEL", help=docs["init_weights"])
    parser.add_argument("--workers", type=_workers, help=docs["workers"])
    from kerasnuc.data import validation

    validation.add_arguments(parser, labels=True, default_note=", or the config file's")
    parser.add_argument("--distribute", choices=CHOICES, help=docs["distribute"])
    parser.add_argument("--out", help=docs["out"])
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing run directory or partial run (nothing is deleted without it).")
    parser.add_argument("--resume", metavar="RUN",
                        help="Continue the partial run RUN (RUN.incomplete/, left by a crash or kill) from its "
                             "last completed epoch, with its own config.json.")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from training.config import load_config_file, resolve

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "overwrite", "resume")}
    if args.resume:
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given or args.config or args.overwrite:
            flags = ", ".join("--" + k.replace("_", "-") for k in given + (["config"] if args.config else [])
                              + (["overwrite"] if args.overwrite else []))
            sys.exit(f"training.fit: --resume continues a run with its own config.json; drop {flags}")
        try:
            config = resume_config(args.resume)
        except ValueError as error:
            sys.exit(f"training.fit: {error}")
        return run(config, resume=True)
    try:
        config = resolve(load_config_file(args.config) if args.config else None, overrides)
    except (ValueError, TypeError) as error:
        sys.exit(f"training.fit: {error}")
    return run(config, overwrite=args.overwrite)


def resume_config(path):
    """The FitConfig of the partial run ``path`` (``runs/x`` or ``runs/x.incomplete``)."""
    from kerasnuc.runs import RunError, read_json
    from training.config import FitConfig

    final = path[: -len(".incomplete")] if path.rstrip("/").endswith(".incomplete") else path
    final = final.rstrip("/")
    try:
        values = read_json(os.path.join(final + ".incomplete", "config.json"))
    except RunError as error:
        if os.path.isdir(final) and not os.path.isdir(final + ".incomplete"):
            raise ValueError(f"{final}: a finished run; nothing to resume") from None
        raise ValueError(f"{error} (no partial run to resume)") from None
    config = FitConfig.from_dict(values).validate()
    if config.self_correction:
        raise ValueError(f"{final}: a --self-correction run cannot be resumed (its averaged weights and refined "
                         "labels are not saved per epoch); start it again with --overwrite")
    config.out = final
    return config


def run(config, overwrite=False, log=None, resume=False):
    """Run one training job from a resolved FitConfig; returns the run directory path.

    The run folder is claimed (locked, checked) before anything is loaded; ``resume``
    continues its partial run (training/resume.py)."""
    log = log or (lambda message: print(message, flush=True))
    from training.config import default_run_dir
    from training.rundir import RunDirectory, RunDirError

    config.out = config.out or default_run_dir(config)
    try:
        run_dir = RunDirectory(config.out, overwrite=overwrite, resume=resume)
    except (RunDirError, OSError) as error:
        sys.exit(f"training.fit: {error}")
    try:
        return _run_in(run_dir, config, log, resume)
    except BaseException as error:
        run_dir.release()
        if not resume and not run_dir.written:
            import shutil

            shutil.rmtree(run_dir.path, ignore_errors=True)  # our own empty folder: nothing was written
        elif config.self_correction and (not isinstance(error, SystemExit) or error.code not in (0, None)):
            log(f"training.fit: run failed; partial run kept in {run_dir.path}; a --self-correction run "
                "cannot be resumed: start it again with --overwrite")
        elif not isinstance(error, SystemExit) or error.code not in (0, None):
            log(f"training.fit: run failed; partial run kept in {run_dir.path}; "
                f"continue it with: python -m training.fit --resume {run_dir.final_path}")
        raise


def _run_in(run_dir, config, log, resume):
    import keras

    from kerasnuc import __version__
    from kerasnuc.data import load_dataset
    from kerasnuc.data.spec import dataset_mpp
    from kerasnuc.data.imageio import DataError
    from kerasnuc.data.splits import kfold_splits, split_from_spec, train_val_test_split
    from training.distribute import distribution_scope
    from training.precision import accelerator_name, apply_precision

    started = time.time()
    try:  # first: multi-worker TensorFlow and multi-host JAX set up their collectives before anything runs
        scope = distribution_scope(config.distribute, config.batch_size, log)
    except ValueError as error:
        sys.exit(f"training.fit: {error}")
    policy = apply_precision(config.precision)
    keras.utils.set_random_seed(config.seed)
    log(f"kerasnuc {__version__}, Keras {keras.__version__} ({keras.backend.backend()}), precision {policy}")
    try:
        from kerasnuc.data.validation import InputPolicy

        input_policy = InputPolicy.from_options(config.max_pixels, config.bit_depth, config.binary_labels)
        records = load_dataset(config.data, policy=input_policy)
        test_records = load_dataset(config.test_data, policy=input_policy) if config.test_data else []
        extra_records = _extra_train_records(config, input_policy, log)
    except DataError as error:
        sys.exit(f"training.fit: {error}")
    if config.stain:
        records, held_and_extra, stain_params = _normalise_stains(config, records, test_records + extra_records, log)
        test_records, extra_records = held_and_extra[:len(test_records)], held_and_extra[len(test_records):]
    names = [r.name for r in records]
    if config.split:
        try:
            splits = [split_from_spec(config.split, names)]
        except ValueError as error:
            sys.exit(f"training.fit: {error}")
    elif config.folds >= 2:
        if test_records:
            sys.exit("training.fit: --folds and --test-data exclude each other (folds test on their own held-out part)")
        splits = kfold_splits(names, config.folds, seed=config.seed, val_fraction=config.val_fraction)
    else:
        splits = [train_val_test_split(names, config.val_fraction,
                                       0.0 if test_records else config.test_fraction, seed=config.seed)]
    if test_records:
        splits[0]["test"] = [f"test:{r.name}" for r in test_records]
        for r in test_records:
            r.name = f"test:{r.name}"
        records = records + test_records
    if extra_records:
        for one in splits:
            one["train"] = one["train"] + [r.name for r in extra_records]
        records = records + extra_records
    split = splits[0]
    log(f"data {config.data}: {len(records)} images -> {len(split['train'])} train, "
        f"{len(split['val'])} val, {len(split['test'])} test")
    resolved = {**config.to_dict(), "mpp": config.mpp or dataset_mpp(config.data) or 0.0,
                "precision_used": policy, "kerasnuc_version": __version__,
                "keras_version": keras.__version__, "backend": keras.backend.backend(),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "accelerator": accelerator_name()}}
    split_record = {"seed": config.seed, "grouped_by": "organ" if config.split == "monuseg_organ" else "image",
                    **({"split": config.split} if config.split else {}),
                    **({"folds": splits} if len(splits) > 1 else split)}
    if resume:
        _check_same_split(run_dir, split_record)
        log(f"resuming {run_dir.path}")
    else:
        run_dir.write_json("config.json", resolved)
        run_dir.write_json("split.json", split_record)
    if config.stain:  # a dcgmm network is copied in (stain_model.keras): the run travels whole
        from kerasnuc.data.stain import store_files

        run_dir.write_json("stain.json", store_files(stain_params, run_dir.path))

    task = _task_module(config.task)
    with scope:  # the model is built, trained and evaluated under the --distribute strategy
        if len(splits) == 1:
            summary = task.run_task(config, run_dir, records, split, log)
        else:
            summary = _cross_validate(task, config, run_dir, records, splits, log)
    path = run_dir.finish()
    log(f"done in {time.time() - started:.0f}s; wrote {path}/: {', '.join(sorted(os.listdir(path)))}")
    log("summary: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary.items())
                                if k in ("dice", "aji", "pq", "f1", "object_f1", "accuracy")))
    return path


def _extra_train_records(config, input_policy, log):
    """The extra_train_data records, named 'extra<i>:<name>' (they join every split's training side)."""
    from kerasnuc.data import load_dataset
    from kerasnuc.data.splits import extra_spec, select_records

    extra = []
    for i, entry in enumerate(config.extra_train_data):
        spec, only = extra_spec(entry)
        chosen = select_records(load_dataset(spec, policy=input_policy), only)
        for r in chosen:
            r.name = f"extra{i}:{r.name}"
        log(f"extra training data {spec}{f' ({only} images)' if only else ''}: {len(chosen)} images")
        extra += chosen
    return extra


def _check_same_split(run_dir, split_record):
    """A resumed run must see the images it was split from; else its epochs mean nothing."""
    from kerasnuc.runs import read_json

    stored = read_json(os.path.join(run_dir.path, "split.json"))
    if json.loads(json.dumps(split_record)) != stored:
        sys.exit(f"training.fit: {run_dir.path}: the data no longer gives the split in split.json "
                 "(images added, removed or renamed); cannot resume")


def _cross_validate(task, config, run_dir, records, splits, log):
    """Run the task once per fold into fold<i>/ and write mean +- std to metrics.json.
    A fold that finished before a crash is not trained again on --resume."""
    import numpy as np

    from kerasnuc.runs import read_json, write_json_atomic
    from training.resume import STATE_DIR

    summaries = []
    for index, split in enumerate(splits, start=1):
        fold = run_dir.subfolder(f"fold{index}")
        done_path = os.path.join(fold.path, STATE_DIR, "fold_summary.json")
        if os.path.exists(done_path):
            summaries.append(read_json(done_path))
            log(f"== fold {index}/{len(splits)}: finished before the restart")
            continue
        log(f"== fold {index}/{len(splits)}: {len(split['train'])} train, {len(split['val'])} val, "
            f"{len(split['test'])} test images")
        fold.write_json("split.json", split)
        summaries.append(task.run_task(config, fold, records, split, log))
        os.makedirs(os.path.dirname(done_path), exist_ok=True)
        write_json_atomic(done_path, summaries[-1])
    keys = [k for k in summaries[0] if all(isinstance(s.get(k), (int, float)) for s in summaries)]
    mean = {k: float(np.mean([s[k] for s in summaries])) for k in keys}
    std = {k: float(np.std([s[k] for s in summaries], ddof=1)) for k in keys}
    run_dir.write_json("metrics.json", {"folds": len(splits), "mean": mean, "std": std,
                                        "per_fold": summaries})
    log("cross-validation: " + ", ".join(f"{k} {mean[k]:.3f} +- {std[k]:.3f}" for k in keys
                                         if k in ("dice", "aji", "pq", "f1", "accuracy", "macro_f1")))
    return mean


def _normalise_stains(config, records, test_records, log):
    """Fit the configured stain normaliser on its template and apply it to every image.

    Training normalises its records itself (once, here) because they feed the input pipeline,
    not the prediction engine; the held-out evaluation after training reuses these records,
    so its engine gets no stain. Everything after training (kerasnuc.load, evaluate, exports)
    reads stain.json and lets the engine apply it."""
    from kerasnuc.data.imageio import read_image
    from kerasnuc.data.stain import make_normalizer, normalize_rgb

    options = dict(config.stain)
    method, template = options.pop("method", "macenko"), options.pop("template", None)
    if not template:
        sys.exit("training.fit: stain normalisation needs a 'template' image path in the stain option")
    normaliser = make_normalizer(method, **options)
    normaliser.fit(read_image(template, channels=3))
    for record in records + test_records:
        record.image = normalize_rgb(normaliser, record.image)
    log(f"stain: {method} normalisation to {template} applied to {len(records) + len(test_records)} images")
    return records, test_records, {"template": template, **normaliser.to_dict()}


def _task_module(task):
    import importlib

    try:
        return importlib.import_module(f"training.{task}")
    except ModuleNotFoundError as error:
        if error.name != f"training.{task}":
            raise
        sys.exit(f"training.fit: task '{task}' is not available in this version")


if __name__ == "__main__":
    main()
