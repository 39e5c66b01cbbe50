"""Hyperparameter search with Keras Tuner; the best trial becomes a config for ``training.fit``.

    python -m training.tune --config configs/tune_unet_sample.json --tuner random --max-trials 8 \\
        --max-epochs 5 --out runs/tune-unet
    python -m training.fit --config runs/tune-unet/best_config.json     # retrain the best trial

Searched: learning rate (log range), width (filters), depth, dropout (models whose builder
takes it) and, for segmentation, the loss (bce / bce_dice / dice, i.e. Dice weight 0 / 1 /
Dice only) with the Dice weight of bce_dice searched as a number. Trials train on the training images of the same split as training.fit (by image,
seeded) and are scored on its validation images; the test images are never touched.

Objective: val_loss, except when the loss itself is searched: values of different losses
cannot be compared, so the loss-independent val_iou is used then (override with --objective).

The output folder holds best_config.json (a complete FitConfig), trials.json and trials.csv
(every trial with its hyperparameters and score) and summary.txt; Keras Tuner's working
files are in tuner/ (pass --resume to continue a search there).

Distributed search (Keras Tuner's own chief/worker mode, found from the environment): run
the same command on every machine with KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT
(where the chief listens) and KERASTUNER_TUNER_ID: "chief" for the one process that holds
the oracle, trains nothing and writes the results above once every trial is done,
"tuner0", "tuner1", ... for the workers, which each ask the chief for a trial, train
it and report back until max-trials are done (they wait for the chief, so the order of
starting does not matter). Workers write only their trial files in OUT/tuner/ and never the
results; trials.json says which worker ran which trial. The chief waits for its workers: it
returns once max-trials are done.
"""

import csv
import io
import json
import math
import os
import sys
import time

from kerasnuc.atomic import write_text_atomic

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TUNERS = ("random", "bayesian", "hyperband")
# Keys of the model builders that mean width and depth, first match wins.
WIDTH_KEYS = ("filters", "initial_filters")
DEPTH_KEYS = ("depth", "blocks")
SEGMENTATION_LOSSES = ("bce_dice", "bce", "dice")
# Objectives that grow with quality; everything else is minimised.
MAXIMISED = ("iou", "accuracy", "dice", "f1", "auc", "precision", "recall")
PROJECT = "search"
OUTPUTS = ("best_config.json", "trials.json", "trials.csv", "summary.txt")
DISTRIBUTED_VARIABLES = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


class TuneError(RuntimeError):
    """A search that cannot run or produced no usable trial."""


# ----------------------------------------------------------------------------- search space

def _width_depth_keys(defaults):
    width = next((k for k in WIDTH_KEYS if k in defaults), None)
    depth = next((k for k in DEPTH_KEYS if k in defaults), None)
    return width, depth


def search_space(config, filters=None, depth=None, lr_range=None, dropout_range=None, losses=None,
                 dice_weight_range=None):
    """The hyperparameters to search, as a list of dicts (name, kind, values or range, default, target).

    ``target`` says where the value goes in a FitConfig: "learning_rate", "loss",
    "loss_options" or "model_config". ``dice_weight_range`` (LOW, HIGH) searches the Dice
    weight of bce_dice as a number (default 0.25..2 when bce_dice is among the losses). Arguments left None get defaults derived from ``config``; a list with
    one value fixes that hyperparameter; an empty list leaves it out of the search.
    """
    from kerasnuc import models

    defaults = {**models.default_config(config.model), **config.model_config}
    width_key, depth_key = _width_depth_keys(defaults)
    space = []

    low, high = lr_range or (config.learning_rate / 10, config.learning_rate * 10)
    if not 0 < low <= high:
        raise TuneError(f"learning-rate range must be 0 < low <= high, got {low}, {high}")
    space.append({"name": "learning_rate", "kind": "float_log", "range": [float(low), float(high)],
                  "default": float(min(max(config.learning_rate, low), high)), "target": "learning_rate"})

    if width_key:
        base = int(defaults[width_key])
        values = filters if filters is not None else sorted({max(2, base // 2), base, base * 2})
        if values:
            space.append({"name": width_key, "kind": "choice", "values": [int(v) for v in values],
                          "default": base if base in values else int(values[0]), "target": "model_config"})

    if depth_key:
        base = int(defaults[depth_key])
        # One level deeper only for encoder-decoders ("depth"); a classifier's extra block
        # could pool its small patch away.
        around = (base - 1, base, base + 1) if depth_key == "depth" else (base - 1, base)
        values = depth if depth is not None else [d for d in around if d >= 1]
        values = [int(v) for v in values]
        if config.task != "classification" and depth_key == "depth":
            fitting = [d for d in values if config.tile % 2 ** d == 0]
            if not fitting and values:
                raise TuneError(f"no depth in {values} fits tile {config.tile} (tile must be divisible "
                                "by 2**depth)")
            values = fitting
        if values:
            space.append({"name": depth_key, "kind": "choice", "values": values,
                          "default": base if base in values else values[0], "target": "model_config"})

    if "dropout" in defaults:
        low, high = dropout_range if dropout_range is not None else (0.0, 0.5)
        if not 0 <= low <= high < 1:
            raise TuneError(f"dropout range must be 0 <= low <= high < 1, got {low}, {high}")
        base = float(defaults["dropout"])
        space.append({"name": "dropout", "kind": "float", "range": [float(low), float(high)],
                      "default": float(min(max(base, low), high)), "target": "model_config"})
    elif dropout_range:
        raise TuneError(f"model '{config.model}' has no dropout option (its builder takes: "
                        f"{', '.join(sorted(defaults))})")

    # The loss: FitConfig carries only a loss name (no options such as dice_weight), so the
    # Dice weight is searched as a choice of names: bce (0), bce_dice (1), dice (Dice only).
    if losses is None:
        losses = ([config.loss] + [n for n in SEGMENTATION_LOSSES if n != config.loss]
                  if config.task == "segmentation" and config.loss in SEGMENTATION_LOSSES else [])
    if losses:
        from kerasnuc.losses import get_loss

        for name in losses:
            get_loss(name)  # unknown names fail here, not in every trial
        space.append({"name": "loss", "kind": "choice", "values": list(losses),
                      "default": config.loss if config.loss in losses else losses[0], "target": "loss"})

    # The Dice weight of bce_dice, as a number (it only acts when the trial's loss is bce_dice).
    uses_bce_dice = "bce_dice" in (losses or [config.loss])
    if dice_weight_range is None:
        dice_weight_range = (0.25, 2.0) if config.task == "segmentation" and uses_bce_dice else ()
    if dice_weight_range:
        if not uses_bce_dice:
            raise TuneError("a Dice-weight range needs the bce_dice loss (searched or fixed)")
        low, high = dice_weight_range
        if not 0 <= low <= high:
            raise TuneError(f"Dice-weight range must be 0 <= low <= high, got {low}, {high}")
        base = float(config.loss_options.get("dice_weight", 1.0))
        space.append({"name": "dice_weight", "kind": "float", "range": [float(low), float(high)],
                      "default": float(min(max(base, low), high)), "target": "loss_options"})
    return space


def define(hp, spec):
    """Declare one ``search_space`` entry on a keras_tuner HyperParameters; returns its value."""
    name, kind = spec["name"], spec["kind"]
    if kind == "choice":
        values = spec["values"]
        if len(values) == 1:
            return hp.Fixed(name, values[0])
        return hp.Choice(name, values, default=spec["default"])
    low, high = spec["range"]
    if low == high:
        return hp.Fixed(name, low)
    if kind == "float_log":
        return hp.Float(name, low, high, sampling="log", default=spec["default"])
    step = 0.05 if high - low >= 0.1 else None
    return hp.Float(name, low, high, step=step, default=spec["default"])


def apply_values(config, space, values):
    """A new FitConfig: ``config`` with the searched ``values`` put where they belong."""
    from training.config import resolve

    overrides = {"model_config": {}}
    for spec in space:
        if spec["name"] not in values:
            continue
        value = values[spec["name"]]
        if spec["target"] == "model_config":
            overrides["model_config"][spec["name"]] = value
        elif spec["target"] == "loss_options":
            overrides.setdefault("loss_options", dict(config.loss_options))[spec["name"]] = value
        else:
            overrides[spec["target"]] = value
    resolved = resolve(config.to_dict(), overrides)
    if "dice_weight" in resolved.loss_options and resolved.loss != "bce_dice":
        # the trial chose another loss: its options would not apply (and may not be accepted)
        resolved.loss_options = {k: v for k, v in resolved.loss_options.items() if k != "dice_weight"}
    return resolved


def choose_objective(requested, space, config):
    """(name, direction) of the objective; see the module docstring for 'auto'."""
    tunes_loss = any((s["name"] == "loss" and s["kind"] == "choice" and len(s["values"]) > 1)
                     or (s["target"] == "loss_options" and s["range"][0] < s["range"][1]) for s in space)
    if requested in (None, "", "auto"):
        if not tunes_loss:
            name = "val_loss"
        elif config.task == "segmentation":
            name = "val_iou"
        else:
            raise TuneError("the loss is searched, so val_loss values of different trials are not "
                            "comparable; name a loss-independent --objective (e.g. val_accuracy)")
    else:
        name = requested
    bare = name[4:] if name.startswith("val_") else name
    direction = "max" if any(bare.endswith(m) for m in MAXIMISED) else "min"
    return name, direction


# ----------------------------------------------------------------------------- task plumbing

def task_module(task):
    """training.<task>, imported lazily; a clear error if that task is not there yet."""
    import importlib

    try:
        module = importlib.import_module(f"training.{task}")
    except ModuleNotFoundError as error:
        if error.name != f"training.{task}":
            raise
        raise TuneError(f"task '{task}' is not available in this version (no training/{task}.py)") from None
    if not hasattr(module, "build_model"):
        raise TuneError(f"training/{task}.py has no build_model(config); cannot tune it")
    return module


def prepare_records(config, log):
    """Records and the train/val split exactly as training.fit makes them (test images left out)."""
    from kerasnuc.data import load_dataset
    from kerasnuc.data.imageio import DataError
    from kerasnuc.data.splits import train_val_test_split

    try:
        records = load_dataset(config.data)
    except DataError as error:
        raise TuneError(str(error)) from None
    if config.stain:
        from training import fit

        normalise = getattr(fit, "_normalise_stains", None)
        if normalise is None:
            raise TuneError("stain normalisation is configured but training.fit cannot apply it")
        records, _, _ = normalise(config, records, [], log)
    # With --test-data the whole of 'data' is train/val (as in fit); the test set is never read.
    test_fraction = 0.0 if config.test_data else config.test_fraction
    split = train_val_test_split([r.name for r in records], config.val_fraction, test_fraction,
                                 seed=config.seed)
    if not split["val"]:
        raise TuneError("the search needs validation images: val_fraction must be > 0")
    if config.folds >= 2:
        log(f"note: folds={config.folds} is kept in best_config.json, but the search uses one "
            "train/val split")
    log(f"data {config.data}: {len(records)} images -> {len(split['train'])} train, "
        f"{len(split['val'])} val (search), {len(split['test'])} test (not used)")
    from kerasnuc.data.splits import records_of

    return (*records_of(records, split, ("train", "val")), split)


def task_records(task, config, train_records, val_records):
    """(train, val, context) for the task: classification keeps images with classified nuclei
    and learns the class count (as training.classification.run_task does)."""
    context = {}
    if config.task == "classification":
        keep = getattr(task, "with_classes", None)
        if keep is not None:
            train_records, val_records = keep(train_records), keep(val_records)
        if not train_records or not val_records:
            raise TuneError("classification: the train and validation images need classified nuclei")
        names_of = getattr(task, "class_names_of", None)
        try:
            context["num_classes"] = len(names_of(train_records + val_records)) if names_of else None
        except ValueError as error:
            raise TuneError(str(error)) from None
    return train_records, val_records, context


def task_loss(task, config):
    """The loss name the task really trains with (detection turns the default bce_dice into
    mse, classification into categorical): training.<task>.<task>_loss when it exists."""
    mapping = getattr(task, f"{config.task}_loss", None)
    if mapping is None:
        return config.loss
    try:
        return mapping(config, lambda message: None)
    except ValueError as error:
        raise TuneError(str(error)) from None


def build_task_model(task, config, context):
    """``training.<task>.build_model`` with whatever it asks for beyond the config (the loss
    name, the class count): the model, optimizer, loss and metrics of a training.fit run."""
    import inspect

    parameters = list(inspect.signature(task.build_model).parameters.values())[1:]
    kwargs = {}
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name == "loss":
            kwargs["loss"] = task_loss(task, config)
        elif parameter.name in context and context[parameter.name] is not None:
            kwargs[parameter.name] = context[parameter.name]
        elif parameter.default is inspect.Parameter.empty:
            raise TuneError(f"training/{config.task}.py build_model needs '{parameter.name}', "
                            "which training.tune cannot supply")
    return task.build_model(config, **kwargs)


def make_datasets(config, task, train_records, val_records, log=print):
    """Training and validation batches as the task trains on them."""
    factory = getattr(task, "make_datasets", None)
    if factory is not None:
        return factory(config, train_records, val_records)
    from kerasnuc.data.augment import Augmenter
    from kerasnuc.data import pipeline

    augmenter = Augmenter(**config.augment) if config.augment else None
    steps = config.steps_per_epoch or None
    if config.task == "segmentation":
        # Mirrors training.segmentation.train.
        train = pipeline.SegmentationDataset(
            train_records, tile=config.tile, batch_size=config.batch_size, steps=steps,
            channels=config.channels, augmenter=augmenter, seed=config.seed, workers=config.workers)
        val = pipeline.SegmentationDataset(val_records, tile=config.tile, batch_size=config.batch_size,
                                           channels=config.channels, seed=config.seed + 1)
    elif config.task == "detection":
        # Mirrors training.detection.train (fixed validation crops where it has them).
        train = pipeline.DetectionDataset(
            train_records, tile=config.tile, batch_size=config.batch_size, sigma=config.density_sigma,
            steps=steps, channels=config.channels, augmenter=augmenter, seed=config.seed,
            workers=config.workers)
        val_class = getattr(task, "_FixedCrops", pipeline.DetectionDataset)
        val = val_class(val_records, tile=config.tile, batch_size=config.batch_size,
                        sigma=config.density_sigma, channels=config.channels, seed=config.seed + 1)
    elif config.task == "classification":
        # Mirrors training.classification.train (its patch augmentation default included).
        make_augmenter = getattr(task, "make_augmenter", None)
        patch_augmenter = make_augmenter(config, log) if make_augmenter else "default"
        train = pipeline.ClassificationDataset(
            train_records, patch=config.patch, batch_size=config.batch_size, steps=steps,
            channels=config.channels, augmenter=patch_augmenter, seed=config.seed, workers=config.workers)
        val = pipeline.ClassificationDataset(val_records, patch=config.patch, batch_size=config.batch_size,
                                             channels=config.channels, evaluation=True)
    else:
        raise TuneError(f"no datasets for task '{config.task}'")
    return train, val


def make_hypermodel(config, space, task, context=None):
    """A keras_tuner.HyperModel whose ``build(hp)`` makes the model with ``kerasnuc.models.build``
    through ``training.<task>.build_model``, so optimizer, loss and metrics are exactly fit's."""
    import keras
    import keras_tuner

    class NucleusHyperModel(keras_tuner.HyperModel):
        def build(self, hp):
            values = {spec["name"]: define(hp, spec) for spec in space}
            trial_config = apply_values(config, space, values)
            # Every trial starts from the same initialisation as a training.fit run.
            keras.utils.set_random_seed(config.seed)
            return build_task_model(task, trial_config, context or {})

    return NucleusHyperModel(name=f"{config.task}-{config.model}")


def distributed_role():
    """None, or ("chief" | "worker", tuner id) when Keras Tuner's distributed variables are set;
    TuneError (one line) when only some are, or grpcio is missing."""
    given = {name: os.environ.get(name, "") for name in DISTRIBUTED_VARIABLES}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise TuneError(f"distributed search needs {', '.join(DISTRIBUTED_VARIABLES)}; "
                        f"missing {', '.join(missing)}")
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise TuneError("distributed search needs grpcio: pip install grpcio") from None
    tuner_id = given["KERASTUNER_TUNER_ID"]
    # Keras Tuner's own rule (keras_tuner.src.distribute.utils.is_chief_oracle)
    return ("chief" if "chief" in tuner_id else "worker"), tuner_id


def record_owners(oracle, objective, max_trials, log=None):
    """Remember which tuner each trial went to (trial_id -> tuner id); with ``log`` (the
    chief), also say so and log each trial as its worker reports it done."""
    owners, started, create, end = {}, {}, oracle.create_trial, oracle.end_trial

    def create_trial(tuner_id):
        trial = create(tuner_id)
        if _status(trial) == "RUNNING" and trial.trial_id not in owners:
            owners[trial.trial_id], started[trial.trial_id] = tuner_id, time.time()
            if log:
                log(f"trial id {trial.trial_id} -> {tuner_id}")
        return trial

    def end_trial(trial):
        end(trial)
        seconds = time.time() - started.get(trial.trial_id, time.time())
        if log:
                log(f"{owners.get(trial.trial_id, '?')}: " + trial_line(
                oracle.trials[trial.trial_id], len(oracle.end_order), max_trials, seconds, objective[0]))

    oracle.create_trial, oracle.end_trial = create_trial, end_trial
    return owners


def make_tuner(kind, hypermodel, objective, max_trials, max_epochs, directory, seed, overwrite,
               factor=3, log=print):
    """A Keras Tuner of ``kind`` that prints one line per finished trial."""
    import keras_tuner

    classes = {"random": keras_tuner.RandomSearch, "bayesian": keras_tuner.BayesianOptimization,
               "hyperband": keras_tuner.Hyperband}
    if kind not in classes:
        raise TuneError(f"tuner must be one of {', '.join(TUNERS)}, got '{kind}'")
    base = classes[kind]

    class ReportingTuner(base):
        def on_trial_begin(self, trial):
            self._trial_started = time.time()
            super().on_trial_begin(trial)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)  # scores the trial (on the chief, for a worker)
            self.ran = getattr(self, "ran", []) + [trial.trial_id]
            # get_trial: a worker's oracle is a client of the chief's and has no trial list
            trial = self.oracle.get_trial(trial.trial_id) or trial
            number = len(self.oracle.end_order) if hasattr(self.oracle, "end_order") else len(self.ran)
            log(trial_line(trial, number, max_trials,
                           time.time() - getattr(self, "_trial_started", time.time()), objective[0]))

    kwargs = dict(hypermodel=hypermodel, objective=keras_tuner.Objective(*objective), seed=seed,
                  directory=directory, project_name=PROJECT, overwrite=overwrite,
                  max_retries_per_trial=0)
    if kind == "hyperband":
        # Enough Hyperband iterations (each runs >= 1 trial) for max_trials, then capped there:
        # Hyperband itself has no max_trials, but its oracle honours one.
        tuner = ReportingTuner(max_epochs=max_epochs, factor=factor, hyperband_iterations=max_trials,
                               **kwargs)
        tuner.oracle.max_trials = max_trials
    else:
        tuner = ReportingTuner(max_trials=max_trials, **kwargs)
    return tuner


# ----------------------------------------------------------------------------- results

def _visible(values):
    """Hyperparameter values without Hyperband's bookkeeping (its epochs kept)."""
    shown = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    if "tuner/epochs" in values:
        shown["epochs"] = values["tuner/epochs"]
    return shown


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _status(trial):
    return getattr(trial.status, "value", trial.status) if trial.status is not None else "RUNNING"


def _error_line(message):
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


def trial_line(trial, number, total, seconds, objective="score"):
    """'trial 3/8  12.1s  learning_rate 0.0021 filters 8 depth 3 loss bce -> val_loss 0.4123'."""
    values = " ".join(f"{k} {_fmt(v)}" for k, v in _visible(trial.hyperparameters.values).items())
    head = f"trial {number}/{total} (id {trial.trial_id})  {seconds:.1f}s  {values}"
    if _status(trial) == "COMPLETED" and trial.score is not None:
        return f"{head} -> {objective} {trial.score:.4f}"
    return f"{head} -> {_status(trial)}: {_error_line(trial.message)}"


def trial_records(tuner, objective, owners=None):
    """Every trial as a JSON-able dict, in the order they were created; ``owners``
    (trial_id -> tuner id) says who ran it."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        metrics = {}
        for name in sorted(trial.metrics.metrics):
            best = trial.metrics.get_best_value(name)
            if best is not None:
                metrics[name] = float(best)
        rows.append({
            "trial_id": trial_id, "status": _status(trial), "tuner_id": (owners or {}).get(trial_id),
            "score": None if trial.score is None or math.isnan(trial.score) else float(trial.score),
            "objective": objective[0],
            "best_step": trial.best_step,
            "hyperparameters": _visible(trial.hyperparameters.values),
            "metrics": metrics,
            "error": None if _status(trial) == "COMPLETED" else _error_line(trial.message),
            "traceback": None if _status(trial) == "COMPLETED" else trial.message,
        })
    return rows


def _json_text(data):
    import numpy as np

    def default(value):
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"cannot write {type(value).__name__} to JSON")

    return json.dumps(data, indent=2, sort_keys=True, default=default) + "\n"


def _csv_text(rows, space):
    hp_names = list(dict.fromkeys([s["name"] for s in space]
                                  + [k for r in rows for k in r["hyperparameters"]]))
    metric_names = sorted({k for r in rows for k in r["metrics"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    # Metric columns say "best_" (the trial's best epoch), so a metric never shadows a
    # hyperparameter of the same name (the loss).
    writer.writerow(["trial_id", "status", "tuner_id", "score"] + hp_names + [f"best_{m}" for m in metric_names]
                    + ["error"])
    for r in rows:
        writer.writerow([r["trial_id"], r["status"], r.get("tuner_id") or "",
                         "" if r["score"] is None else r["score"]]
                        + [r["hyperparameters"].get(k, "") for k in hp_names]
                        + [r["metrics"].get(k, "") for k in metric_names] + [r["error"] or ""])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the search

def run(config, out, tuner="random", max_trials=10, max_epochs=None, objective="auto", factor=3,
        space=None, overwrite=False, resume=False, log=None):
    """Search hyperparameters for a resolved FitConfig; returns the path of best_config.json
    (None on a distributed-search worker, see the module docstring).

    ``space``: keyword arguments of :func:`search_space` (filters, depth, lr_range,
    dropout_range, losses). Raises TuneError when no trial completed.
    """
    log = log or (lambda message: print(message, flush=True))
    _check_dependencies()
    import keras

    from training.precision import apply_precision

    started = time.time()
    out = os.path.abspath(out)
    tuner_dir = os.path.join(out, "tuner")
    role = distributed_role()
    worker = role is not None and role[0] == "worker"  # trains trials; never checks, clears or writes results
    if not worker and _holds_a_search(out) and not (overwrite or resume):
        raise TuneError(f"{out}: exists; choose another --out, pass --overwrite to start afresh "
                        "or --resume to continue its search")

    task = task_module(config.task)
    from kerasnuc import models

    if models.task_of(config.model) != config.task:
        log(f"note: model '{config.model}' is built for {models.task_of(config.model)}, "
            f"tuned here for {config.task} (training/{config.task}.py decides whether it fits)")
    hp_space = search_space(config, **(space or {}))
    objective = choose_objective(objective, hp_space, config)
    epochs = int(max_epochs or config.epochs)
    if max_trials < 1 or epochs < 1:
        raise TuneError("max-trials and max-epochs must be at least 1")

    if overwrite and not worker:  # only what a search writes; anything else in the folder stays
        import shutil

        shutil.rmtree(tuner_dir, ignore_errors=True)
        for name in OUTPUTS:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)

    policy = apply_precision(config.precision)
    keras.utils.set_random_seed(config.seed)
    log(f"training.tune: {tuner} search, {max_trials} trials, up to {epochs} epochs each, "
        f"objective {objective[0]} ({objective[1]}), precision {policy}")
    log("search space: " + "; ".join(_describe(s) for s in hp_space))
    if role:
        log(f"distributed search: {role[1]} ({role[0]}), oracle at {_oracle_address()}")
    if config.distribute != "none":
        log(f"note: distribute={config.distribute} is kept in best_config.json for training.fit; each trial "
            "trains on one device (for several devices, run one worker per device)")

    train_records, val_records, split = prepare_records(config, log)
    train_records, val_records, context = task_records(task, config, train_records, val_records)
    chief = role is not None and role[0] == "chief"  # serves the oracle, trains nothing
    train_data, val_data = (None, None) if chief else make_datasets(config, task, train_records, val_records, log)
    hypermodel = make_hypermodel(config, hp_space, task, context)
    try:  # Keras Tuner builds one model here to learn the search space
        search = make_tuner(tuner, hypermodel, objective, max_trials, epochs, tuner_dir, config.seed,
                            overwrite=not (resume or worker), factor=factor, log=log)
    except TuneError:
        raise
    except Exception as error:
        raise TuneError(f"cannot build {config.model} for the search: {type(error).__name__}: {error}") from error
    if worker:
        return _run_worker(search, role[1], train_data, val_data, epochs, log)
    owners = record_owners(search.oracle, objective, max_trials, log if chief else None)

    failure = None
    try:
        search.search(train_data, validation_data=val_data, epochs=epochs, verbose=0)
    except RuntimeError as error:  # Keras Tuner stops after 3 consecutive failed trials
        failure = error
    rows = trial_records(search, objective, owners)
    completed = [r for r in rows if r["status"] == "COMPLETED" and r["score"] is not None]
    write_text_atomic(os.path.join(out, "trials.json"), _json_text({
        "tuner": tuner, "objective": {"name": objective[0], "direction": objective[1]},
        "search_space": hp_space, "max_trials": max_trials, "max_epochs": epochs,
        "split": {"seed": config.seed, "train": split["train"], "val": split["val"]},
        "trials": rows}))
    write_text_atomic(os.path.join(out, "trials.csv"), _csv_text(rows, hp_space))

    if not completed:
        stale = os.path.join(out, "best_config.json")
        if os.path.exists(stale):
            os.remove(stale)
        first = next((r for r in rows if r["error"]), None)
        reason = f"first error (trial {first['trial_id']}): {first['error']}" if first else \
            (f"Keras Tuner stopped: {failure}" if failure else "no trial was run")
        hint = ""
        if "tensorboard" in json.dumps(rows).lower():
            hint = (" Keras Tuner imports tensorboard in every trial on the TensorFlow backend: "
                    "pip install 'tensorboard>=2.21,<2.22'.")
        raise TuneError(f"no trial completed ({len(rows)} run, all failed); {reason}. "
                        f"Tracebacks in {os.path.join(out, 'trials.json')}.{hint}")
    if failure is not None:
        log(f"warning: the search stopped early: {failure}")
    failed = len(rows) - len(completed)
    if failed:
        log(f"warning: {failed} of {len(rows)} trials failed; see trials.json")

    reverse = objective[1] == "max"
    best = sorted(completed, key=lambda r: r["score"], reverse=reverse)[0]
    best_trial = search.oracle.trials[best["trial_id"]]
    best_values = {s["name"]: best_trial.hyperparameters.values[s["name"]] for s in hp_space
                   if s["name"] in best_trial.hyperparameters.values}
    best_config = apply_values(config, hp_space, best_values)
    best_config.out = ""
    document = {"_comment": (f"training.tune: best of {len(completed)} completed {tuner} trials, "
                             f"trial {best['trial_id']} with {objective[0]} {best['score']:.4f}; "
                             f"retrain with: python -m training.fit --config {out}/best_config.json"),
                **best_config.to_dict()}
    best_path = os.path.join(out, "best_config.json")
    write_text_atomic(best_path, _json_text(document))

    ranked = sorted(completed, key=lambda r: r["score"], reverse=reverse)
    lines = [f"training.tune {tuner}: {len(rows)} trials ({len(completed)} completed, {failed} failed) "
             f"in {time.time() - started:.0f}s; objective {objective[0]} ({objective[1]})",
             f"best: trial id {best['trial_id']} {objective[0]} {best['score']:.4f}  "
             + " ".join(f"{k} {_fmt(v)}" for k, v in best_values.items()),
             "ranking:"]
    lines += [f"  id {r['trial_id']}  {r['score']:.4f}  "
              + " ".join(f"{k} {_fmt(v)}" for k, v in r["hyperparameters"].items()) for r in ranked]
    lines += [f"wrote {out}/: best_config.json, trials.json, trials.csv, summary.txt (tuner files in tuner/)",
              f"retrain: python -m training.fit --config {best_path}"]
    write_text_atomic(os.path.join(out, "summary.txt"), "\n".join(lines) + "\n")
    for line in lines:
        log(line)
    return best_path


def _holds_a_search(out):
    """True when ``out`` has anything but a worker's trial files (which may come first)."""
    if not os.path.isdir(out):
        return False
    others = [name for name in os.listdir(out) if name != "tuner"]
    return bool(others) or os.path.exists(os.path.join(out, "tuner", PROJECT, "oracle.json"))


def _oracle_address():
    return f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"


def _run_worker(search, tuner_id, train_data, val_data, epochs, log):
    """A worker's part: trials from the chief until it says stop; returns None (the chief
    writes the results)."""
    import grpc

    log(f"{tuner_id}: asking the chief at {_oracle_address()} for trials")
    try:
        search.search(train_data, validation_data=val_data, epochs=epochs, verbose=0)
    except grpc.RpcError as error:
        raise TuneError(f"{tuner_id}: lost the chief oracle at {_oracle_address()}: "
                        f"{error.code().name} {error.details()}") from None
    ran = getattr(search, "ran", [])
    log(f"{tuner_id}: ran {len(ran)} trials ({', '.join(ran) or 'none'}); the chief writes the results")
    return None


def _describe(spec):
    if spec["kind"] == "choice":
        return f"{spec['name']} in {spec['values']}"
    scale = " (log)" if spec["kind"] == "float_log" else ""
    return f"{spec['name']} {_fmt(spec['range'][0])}..{_fmt(spec['range'][1])}{scale}"


def _check_dependencies():
    """Keras Tuner and, on the TensorFlow backend, tensorboard (else every trial fails)."""
    try:
        import keras_tuner  # noqa: F401
    except ImportError:
        raise TuneError("Keras Tuner is not installed: pip install 'keras-tuner>=1.4.8,<1.5'") from None
    import keras

    if keras.backend.backend() == "tensorflow":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise TuneError("tensorboard is not installed; Keras Tuner imports it in every trial on the "
                            "TensorFlow backend, so all trials would fail: "
                            "pip install 'tensorboard>=2.21,<2.22'") from None


# ----------------------------------------------------------------------------- command line

def _floats(text):
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def _pair(text):
    values = _floats(text)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ValueError(f"expected LOW,HIGH, got '{text}'")
    return tuple(values)


def _names(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser():
    """training.fit's flags (the base config) plus the search's own."""
    from training import fit

    parser = fit.build_parser()
    parser.prog = "python -m training.tune"
    parser.description = __doc__
    for action in parser._actions:
        if action.dest == "out":
            action.help = "Output folder of the search (default runs/tune-<model>-<time>)."
        elif action.dest == "overwrite":
            action.help = "Delete an existing output folder and start afresh."
        elif action.dest == "epochs":
            action.help = "Epochs written into best_config.json (and per trial unless --max-epochs)."
    parser.conflict_handler = "resolve"  # the search's own --resume replaces fit's (a partial run)
    group = parser.add_argument_group("search")
    group.add_argument("--tuner", choices=TUNERS, default="random", help="Search algorithm (default random).")
    group.add_argument("--max-trials", type=int, default=10, dest="max_trials",
                       help="Most trials to run (also caps Hyperband).")
    group.add_argument("--max-epochs", type=int, dest="max_epochs",
                       help="Epochs per trial (Hyperband: the most a trial gets); default --epochs.")
    group.add_argument("--factor", type=int, default=3, help="Hyperband reduction factor.")
    group.add_argument("--objective", default="auto",
                       help="Metric to optimise, e.g. val_loss, val_iou; auto: val_loss, or val_iou "
                            "when the loss is searched.")
    group.add_argument("--lr-range", type=_pair, dest="lr_range", metavar="LOW,HIGH",
                       help="Learning-rate range, log-sampled (default lr/10..lr*10).")
    group.add_argument("--filters", type=_ints, metavar="A,B,...",
                       help="Widths to try (default half, equal and double the model's).")
    group.add_argument("--depth", type=_ints, metavar="A,B,...",
                       help="Depths to try (default the model's -1, 0, +1 that fit the tile).")
    group.add_argument("--dropout-range", type=_pair, dest="dropout_range", metavar="LOW,HIGH",
                       help="Dropout range for models that have dropout (default 0..0.5).")
    group.add_argument("--losses", type=_names, metavar="NAME,...",
                       help="Losses to try (segmentation default bce_dice,bce,dice; one name fixes it).")
    group.add_argument("--dice-weight-range", type=_pair, dest="dice_weight_range", metavar="LOW,HIGH",
                       help="Dice weight of bce_dice, searched as a number (default 0.25,2 when bce_dice "
                            "is among the losses; 1,1 fixes it).")
    group.add_argument("--resume", action="store_true", help="Continue the search in OUT/tuner/.")
    return parser


SEARCH_FLAGS = ("tuner", "max_trials", "max_epochs", "factor", "objective", "lr_range", "filters",
                "depth", "dropout_range", "losses", "dice_weight_range", "resume")


def main(argv=None):
    args = build_parser().parse_args(argv)
    from training.config import load_config_file, resolve

    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "overwrite", "out") + SEARCH_FLAGS}
    try:
        config = resolve(load_config_file(args.config) if args.config else None, overrides)
    except (ValueError, TypeError) as error:
        sys.exit(f"training.tune: {error}")
    try:
        out = args.out or os.path.join("runs", f"tune-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        space = {k: getattr(args, k) for k in ("filters", "depth", "lr_range", "dropout_range", "losses",
                                               "dice_weight_range")
                 if getattr(args, k) is not None}
        return run(config, out, tuner=args.tuner, max_trials=args.max_trials, max_epochs=args.max_epochs,
                   objective=args.objective, factor=args.factor, space=space,
                   overwrite=args.overwrite, resume=args.resume)
    except TuneError as error:
        sys.exit(f"training.tune: {error}")


if __name__ == "__main__":
    main()
