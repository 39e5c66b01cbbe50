"""Pack a finished training run as a pretrained model shipped in the package.

    python -m export.pretrained RUN --name NAME --config configs/pretrained/NAME.json [--dest DIR]

writes ``DIR/NAME/`` (default ``kerasnuc/pretrained/NAME/``, loaded by ``kerasnuc.load(NAME)``):

* the slim run folder the engine reads: ``model.keras`` (the run's model re-saved without its
  optimizer state; refused over 8 MB), ``config.json``, ``split.json``, ``thresholds.json``,
  ``metrics.json`` (held-out scores; a classifier's class names) and, for a run that normalised
  stains, ``stain.json`` with the files it names;
* ``model_int8.tflite`` + ``model_int8.json`` (:func:`export.tflite.export_tflite`, int8,
  calibrated on the run's training images, checked against Keras on its test images);
* ``card.json`` and ``MODEL_CARD.md``: model, training data and their licences
  (:mod:`kerasnuc.pretrained.licences`), pixel size, normalisation, the retraining command,
  training time and machine, held-out scores, post-processing and where it was tuned,
  limitations. Every figure is read from the run's files, none is typed in.

``--config`` must be the file the run was trained from (every key it sets must equal the
run's config.json), so the card's ``python -m training.fit --config ...`` retrains the model.
The folder is built in a hidden staging folder beside it and renamed into place when
complete; a failure leaves the previous model (or nothing) there. Errors: one line, exit 1.
"""

import argparse
import csv
import datetime
import json
import os
import shutil
import sys

MAX_KERAS_BYTES = 8 * 10 ** 6
"""A shipped ``model.keras`` is at most 8 MB (the package stays small)."""

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCORES = {
    "segmentation": ("mean", ("aji", "aji_plus", "pq", "dq", "sq", "f1", "precision", "recall", "dice",
                              "dice_pooled", "iou")),
    "instance": ("mean", ("aji", "aji_plus", "pq", "dq", "sq", "f1", "precision", "recall", "dice",
                          "dice_pooled", "iou")),
    "detection": ("pooled", ("precision", "recall", "f1", "mean_distance", "tp", "fp", "fn")),
    "classification": ("pooled", ("accuracy", "macro_f1", "weighted_f1", "macro_roc_auc",
                                  "macro_average_precision", "n")),
}
"""Per task: which block of metrics.json (per-image ``mean`` or ``pooled`` over all images)
the card shows, and its keys in order (those the run recorded)."""

LIMITATIONS = {
    "segmentation": ["Touching nuclei are split by a watershed on the predicted foreground; tightly "
                     "packed or overlapping nuclei may merge or split wrongly.",
                     "Scores are on held-out images of the same datasets; images from other scanners, "
                     "stains or magnifications may score lower: check on a few of yours first."],
    "instance": ["Scores are on held-out images of the same datasets; other scanners, stains or "
                 "magnifications may score lower."],
    "detection": ["Finds nucleus centres (points), not outlines: use predict_points; "
                  "predict_instances and the command line's outlines need a segmentation model.",
                  "Trained on colorectal adenocarcinoma H&E tiles only; other tissues are untested."],
    "classification": ["Classifies patches centred on given nucleus positions (crc-detect's, or a "
                       "segmentation model's via --classifier); it finds no nuclei itself.",
                       "Four classes only (epithelial, inflammatory, fibroblast, others), as annotated "
                       "in colorectal tissue; other cell types are forced into one of them."],
}


class PackError(ValueError):
    """A run that cannot be shipped (the message says why)."""


def pack(run_dir, name, config_path, dest=None, calibration=64, max_images=None, report=True,
         max_bytes=MAX_KERAS_BYTES, log=None):
    """Pack ``run_dir`` as ``dest/name`` (see the module docstring); returns the folder."""
    from kerasnuc import pretrained
    from kerasnuc.atomic import made_folders
    from kerasnuc.pretrained.licences import licences_of
    from kerasnuc.runs import load_model, read_json_object, read_run

    log = log or (lambda message: print(message, flush=True))
    if name not in pretrained.MODELS:
        raise PackError(f"--name {name}: not a shipped model name; known: {', '.join(pretrained.MODELS)}")
    run = read_run(run_dir)
    metrics = read_json_object(os.path.join(run.path, "metrics.json"))
    retrain = retrain_command(config_path, run.config)
    stages = stage_records(config_path, run.config)
    licences = licences_of(run.config)  # unknown data terms stop here, before any work
    dest = os.path.abspath(dest or pretrained.ROOT)
    final = os.path.join(dest, name)
    with made_folders(dest):
        staging = os.path.join(dest, f".incomplete-{name}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            model = slim_model(run, staging, max_bytes)
            copy_run_files(run, staging)
            load_model(staging)  # the slim folder is a run the engine reads, its model fits its config
            from export.tflite import export_tflite

            _, lite_report = export_tflite(run.path, "int8", os.path.join(staging, pretrained.TFLITE),
                                           calibration=calibration, max_images=max_images,
                                           evaluate_model=report, log=log)
            for suffix in (".report.json", ".report.md"):  # its summary goes into the card
                os.remove(os.path.join(staging, "model_int8" + suffix))
            card = card_record(name, run, metrics, model, licences, retrain, lite_report, staging, stages)
            from kerasnuc.runs import write_json_atomic
            from kerasnuc.atomic import write_text_atomic

            write_json_atomic(os.path.join(staging, "card.json"), card)
            write_text_atomic(os.path.join(staging, "MODEL_CARD.md"), card_markdown(card))
            replace_folder(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log(f"packed {run.path} as {final}: " + ", ".join(sorted(os.listdir(final))))
    return final


def slim_model(run, folder, max_bytes=MAX_KERAS_BYTES):
    """The run's model (checked against its config.json) saved into ``folder`` without optimizer
    state; PackError when the file exceeds ``max_bytes``. Returns the model."""
    from kerasnuc.runs import load_model

    model = load_model(run)  # uncompiled: no optimizer slots (Adam's triple the file)
    target = os.path.join(folder, "model.keras")
    model.save(target)
    size = os.path.getsize(target)
    if size > max_bytes:
        raise PackError(f"{run.shown('model.keras')}: {size / 1e6:.1f} MB without optimizer state "
                        f"({model.count_params():,} parameters), over the {max_bytes / 1e6:g} MB a shipped "
                        "model may have; train a smaller model (fewer filters or less depth)")
    return model


def copy_run_files(run, folder):
    """config.json, split.json, thresholds.json, metrics.json and the stain files into ``folder``."""
    from kerasnuc.runs import write_json_atomic

    write_json_atomic(os.path.join(folder, "config.json"), run.config)
    write_json_atomic(os.path.join(folder, "split.json"), run.split)
    write_json_atomic(os.path.join(folder, "thresholds.json"), run.thresholds)
    shutil.copyfile(os.path.join(run.path, "metrics.json"), os.path.join(folder, "metrics.json"))
    if run.stain:  # resolved to absolute paths by read_run; copied in, named relative to the folder
        from kerasnuc.data.stain import store_files

        write_json_atomic(os.path.join(folder, "stain.json"), store_files(run.stain, folder))


def replace_folder(staging, final):
    """Put the complete ``staging`` folder at ``final``; an older ``final`` is moved aside first and
    deleted after, so ``final`` is always either the old model or the new one, never a mix."""
    old = None
    if os.path.exists(final):
        old = f"{os.path.dirname(final)}/.old-{os.path.basename(final)}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(staging, final)
    except BaseException:
        if old:
            os.rename(old, final)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def retrain_command(config_path, run_config):
    """``python -m training.fit --config PATH`` for the config file the run was trained from;
    PackError when the file sets a key to another value than the run used. A run that starts
    from another run's weights (``init_weights``: a run folder) is retrained by the commands of
    every stage, joined by ``&&`` (:func:`training_stages`)."""
    stages = training_stages(config_path, run_config)
    return " && ".join(f"python -m training.fit --config {stage['config']}" for stage in stages)


def training_stages(config_path, run_config):
    """[{config, run}] from the first stage to this run. ``init_weights`` naming a run folder
    must be the ``out`` of a config file beside ``config_path``, and that run must have been
    trained from it (checked the same way, recursively); a pretrained name or .keras file is
    where the first stage starts."""
    from kerasnuc.runs import read_json_object

    if not config_path:
        raise PackError("--config: the config file the run was trained from is required (the card's "
                        "retraining command)")
    data = read_json_object(config_path)
    differ = [f"{key}: {value!r} in the file, {run_config.get(key)!r} in the run"
              for key, value in sorted(data.items())
              if not key.startswith("_") and key != "out" and _normal(value) != _normal(run_config.get(key))]
    if differ:
        raise PackError(f"{config_path}: the run was not trained from this file ({'; '.join(differ)}); "
                        "pack a run trained with python -m training.fit --config "
                        f"{config_path} and no overriding flags")
    shown = os.path.abspath(config_path)
    if shown.startswith(REPOSITORY + os.sep):
        shown = os.path.relpath(shown, REPOSITORY)
    stage = {"config": shown, "run": run_config.get("out") or None}
    source = run_config.get("init_weights") or ""
    if not source or not os.path.isdir(source):
        return [stage]
    folder = os.path.dirname(os.path.abspath(config_path))
    for name in sorted(os.listdir(folder)):
        other = os.path.join(folder, name)
        if name.endswith(".json") and os.path.abspath(other) != os.path.abspath(config_path):
            out = read_json_object(other).get("out")
            if out and os.path.abspath(out) == os.path.abspath(source):
                from kerasnuc.runs import read_run

                return training_stages(other, read_run(source).config) + [stage]
    raise PackError(f"{config_path}: the run starts from the weights of {source}, which no config file in "
                    f"{folder} trains (one whose \"out\" is {source}); the card could not say how to retrain it")


def stage_records(config_path, run_config):
    """Epochs and training seconds of each stage before this run (their metrics.json)."""
    from kerasnuc.runs import read_json

    records = []
    for stage in training_stages(config_path, run_config)[:-1]:
        metrics = read_json(os.path.join(stage["run"], "metrics.json"), default={}) or {}
        records.append({**stage, "epochs_run": metrics.get("epochs"), "seconds": metrics.get("train_seconds")})
    return records


def _normal(value):
    return json.loads(json.dumps(value, sort_keys=True))


def read_history(run_dir):
    """{epochs, best_epoch, best_val_loss} of history.csv (None where absent)."""
    path = os.path.join(run_dir, "history.csv")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    losses = [(float(row["val_loss"]), index + 1) for index, row in enumerate(rows) if row.get("val_loss")]
    best = min(losses) if losses else (None, None)
    return {"epochs": len(rows), "best_epoch": best[1], "best_val_loss": best[0]}


def card_record(name, run, metrics, model, licences, retrain, lite_report, folder, stages=()):
    """card.json: everything the model card says, read from the run (and the packed files)."""
    from kerasnuc import __version__, pretrained
    from kerasnuc.models import is_stochastic
    from kerasnuc.pretrained.licences import data_specs, model_terms
    from kerasnuc.runs import NORMALIZATION, postprocess_of

    config, split, thresholds, task = run.config, run.split, run.thresholds, run.task
    block, keys = SCORES[task]
    recorded = metrics.get(block) or {}
    scores = {key: recorded[key] for key in keys if isinstance(recorded.get(key), (int, float))}
    test_names = list(split.get("test") or [])
    from_test_data = bool(test_names) and all(n.startswith("test:") for n in test_names)
    mpp = float(config.get("mpp") or 0.0) or None
    agreement = (lite_report.get("agreement") or {}).get("summary")
    stain = {k: v for k, v in (run.stain or {}).items() if k in ("method",)} or None
    limitations = list(LIMITATIONS.get(task, []))
    if mpp is not None:
        limitations.append(f"Trained at {mpp:g} µm/px: slides are read at that scale; for plain images at "
                           "another pixel size pass the command line's --image-mpp (or resample them), else "
                           "nuclei appear at the wrong size.")
    if mpp is None:
        limitations.append("Trained at no fixed pixel size (mixed microscopes and magnifications): images "
                           "are used at their own scale; nuclei much larger or smaller than the training "
                           "data's may be missed.")
    limitations.append("The int8 .tflite (used where Keras is not installed) differs slightly from the "
                       "Keras model (its agreement: the int8 section of the card).")
    card = {
        "name": name,
        "description": pretrained.MODELS[name],
        "task": task,
        "model": {"family": config.get("model"), "config": config.get("model_config") or {},
                  "parameters": int(model.count_params()), "channels": int(config.get("channels", 3)),
                  "keras_bytes": os.path.getsize(os.path.join(folder, "model.keras")),
                  "stochastic": bool(is_stochastic(model))},
        "input": {"mpp": mpp, "normalization": NORMALIZATION["formula"], "stain": stain,
                  "tile": config.get("tile"), "patch": config.get("patch") if task == "classification" else None},
        "data": {"train": config.get("data"), "extra_train": data_specs({"extra_train_data":
                                                                        config.get("extra_train_data")}),
                 "test": config.get("test_data") or None, "licences": licences},
        "licence": model_terms(licences),
        "training": {"retrain": retrain, "epochs": config.get("epochs"), "epochs_run": metrics.get("epochs"),
                     "batch_size": config.get("batch_size"), "loss": config.get("loss"),
                     "optimizer": config.get("optimizer"), "learning_rate": config.get("learning_rate"),
                     "seconds": metrics.get("train_seconds"), "backend": config.get("backend"),
                     "precision": config.get("precision_used"), "machine": config.get("machine") or {},
                     "history": read_history(run.path), "earlier_stages": list(stages),
                     "init_weights": config.get("init_weights") or None,
                     "train_images": len(split.get("train") or []), "val_images": len(split.get("val") or [])},
        "held_out": {"split": metrics.get("split", "test"), "images": metrics.get("images", len(test_names)),
                     "source": config.get("test_data") if from_test_data else
                     f"held-out part of {config.get('data')} (split.json, seed {split.get('seed')}, "
                     f"grouped by {split.get('grouped_by', 'image')})",
                     "names": [n[len("test:"):] if n.startswith("test:") else n for n in test_names],
                     "block": block, "scores": scores,
                     "match_radius": metrics.get("match_radius"),
                     "class_names": metrics.get("class_names"),
                     "per_class": [{k: c.get(k) for k in ("name", "precision", "recall", "f1", "support")}
                                   for c in metrics.get("per_class") or []] or None},
        "postprocess": {"params": postprocess_of(thresholds), "tuned_on": thresholds.get("tuned_on"),
                        "validation": thresholds.get("validation"),
                        "val_images": len(split.get("val") or [])},
        "int8": {"file": pretrained.TFLITE, "metadata": "model_int8.json",
                 "bytes": os.path.getsize(os.path.join(folder, pretrained.TFLITE)),
                 "agreement": agreement, "agreement_images": (lite_report.get("agreement") or {}).get("images")},
        "limitations": limitations,
        "packed": {"run": run.path, "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "kerasnuc_version": __version__, "keras_version": config.get("keras_version")},
    }
    return card


def _stage_total(training, seconds):
    earlier = training.get("earlier_stages") or []
    if not earlier or not isinstance(seconds, (int, float)):
        return ""
    total = seconds + sum(stage["seconds"] or 0.0 for stage in earlier)
    epochs = (training["epochs_run"] or 0) + sum(stage["epochs_run"] or 0 for stage in earlier)
    return f" in the last stage; all {len(earlier) + 1} stages: {total:.0f} s ({total / 3600:.2f} h), {epochs} epochs"


def _figure(value):
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def card_markdown(card):
    """MODEL_CARD.md: card.json for people (same figures, nothing added)."""
    model, data, training, held, post = card["model"], card["data"], card["training"], card["held_out"], \
        card["postprocess"]
    machine = training["machine"]
    seconds = training["seconds"]
    lines = [f"# Model card: `{card['name']}`", "", card["description"] + ".", "",
             "```python", "import kerasnuc", f'predictor = kerasnuc.load("{card["name"]}")', "```", "",
             "## Model", "",
             f"- task: {card['task']}; family `{model['family']}`, config `{json.dumps(model['config'])}`",
             f"- {model['parameters']:,} parameters; `model.keras` {model['keras_bytes'] / 1e6:.2f} MB, "
             f"int8 `{card['int8']['file']}` {card['int8']['bytes'] / 1e6:.2f} MB",
             f"- input: {model['channels']} channel(s); pixel size "
             + (f"{card['input']['mpp']:g} µm/px" if card["input"]["mpp"] else
                "not fixed (mixed magnifications: images are used at their own scale)"),
             f"- normalisation: per-image min-max, `{card['input']['normalization']}`"
             + (f"; stain normalisation `{card['input']['stain']['method']}` (stain.json, applied by the engine)"
                if card["input"]["stain"] else ""), "",
             "## Training data and licence", "",
             f"- training data: `{data['train']}`"
             + "".join(f" + `{spec}`" for spec in data["extra_train"])
             + (f"; test data: `{data['test']}`" if data["test"] else ""),
             "", "| dataset | licence | terms | cite |", "|---|---|---|---|"]
    lines += [f"| {item['dataset']} | [{item['licence']}]({item['url']}) | {item['terms']} | {item['cite']} |"
              for item in data["licences"]]
    lines += ["", f"**What this means for the model:** {card['licence']['summary']}", "",
              "## Training", "",
              f"- retrain: `{training['retrain']}`",
              *[f"- stage {number}: `{stage['config']}`, {stage['epochs_run']} epochs, "
                f"{_figure(stage['seconds'])} s; the last stage starts from its weights"
                for number, stage in enumerate(training.get("earlier_stages") or [], 1)],
              f"- {training['train_images']} training and {training['val_images']} validation images; "
              f"{training['epochs_run']} epochs run (of {training['epochs']}), batch {training['batch_size']}, "
              f"loss {training['loss']}, {training['optimizer']} at learning rate {training['learning_rate']}",
              "- time: " + (f"{seconds:.0f} s ({seconds / 3600:.2f} h)" if isinstance(seconds, (int, float))
                            else "not recorded by the run") + _stage_total(training, seconds),
              f"- machine: {machine.get('cpus')} CPU cores, accelerator {machine.get('accelerator') or 'none'}, "
              f"Keras backend {training['backend']}, precision {training['precision']}; {machine.get('platform')}"]
    if training["history"]:
        history = training["history"]
        lines.append(f"- history.csv: {history['epochs']} epochs, best validation loss "
                     f"{_figure(history['best_val_loss'])} at epoch {history['best_epoch']}")
    lines += ["", "## Held-out scores", "",
              f"{held['images']} images of the {held['split']} split, never seen in training or threshold "
              f"tuning: {held['source']}. Scores: "
              + ("mean over images" if held["block"] == "mean" else "pooled over all images")
              + (f", match radius {held['match_radius']:g} px" if held.get("match_radius") else "") + ".", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_figure(value)} |" for key, value in held["scores"].items()]
    if held.get("per_class"):
        lines += ["", "| class | precision | recall | F1 | nuclei |", "|---|---|---|---|---|"]
        lines += [f"| {c['name']} | {_figure(c['precision'])} | {_figure(c['recall'])} | {_figure(c['f1'])} "
                  f"| {c['support']} |" for c in held["per_class"]]
    lines += ["", f"<details><summary>The {len(held['names'])} test images</summary>", "",
              ", ".join(held["names"]), "", "</details>", "", "## Post-processing", ""]
    if card["task"] == "classification":
        lines.append("- none: each nucleus gets the class of highest probability (probabilities in the table)")
    else:
        lines += [f"- parameters `{json.dumps(post['params'], sort_keys=True)}` (thresholds.json)",
                  f"- tuned on: {post['tuned_on'] or 'not tuned (config defaults)'}"
                  + (f" ({post['val_images']} validation images), {post['validation']['metric']} "
                     f"{_figure(post['validation']['value'])}"
                     if post["tuned_on"] and (post.get("validation") or {}).get("value") is not None else "")]
    agreement = card["int8"]["agreement"]
    lines += ["", "## int8 LiteRT model", "",
              f"`{card['int8']['file']}` with `{card['int8']['metadata']}` runs where Keras is not installed "
              "(`pip install ai-edge-litert`); `kerasnuc.load` picks it automatically then."]
    if not agreement:
        lines.append("Agreement with the Keras model: not measured (packed with --no-report).")
    else:
        lines.append(f"Agreement with the Keras model on {card['int8']['agreement_images']} test images: "
                     + ", ".join(f"{k} {_figure(v)}" for k, v in agreement.items()) + ".")
    lines += ["", "## Limitations", ""] + [f"- {item}" for item in card["limitations"]]
    lines += ["", f"Packed from `{card['packed']['run']}` at {card['packed']['at']} "
                  f"(kerasnuc {card['packed']['kerasnuc_version']}).", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m export.pretrained", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN", help="a finished training.fit run folder")
    parser.add_argument("--name", required=True, help="the shipped name: fluo, he, crc-detect or crc-classify")
    parser.add_argument("--config", required=True,
                        help="the config file the run was trained from (the card's retraining command)")
    parser.add_argument("--dest", help="folder holding the packed models (default kerasnuc/pretrained)")
    parser.add_argument("--calibration", type=int, default=64, help="int8: representative crops (default 64)")
    parser.add_argument("--max-images", type=int, dest="max_images",
                        help="int8 agreement check on at most this many test images (default all)")
    parser.add_argument("--no-report", action="store_true", help="skip the int8 agreement check")
    args = parser.parse_args(argv)
    from kerasnuc.runs import RunError

    try:
        pack(args.run_dir, args.name, args.config, args.dest, args.calibration, args.max_images,
             report=not args.no_report)
    except (PackError, RunError, ValueError, OSError) as error:
        sys.exit(f"export.pretrained: {error}")


if __name__ == "__main__":
    main()
