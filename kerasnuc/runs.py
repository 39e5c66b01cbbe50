"""The run folder's one owner: reading a training run back, and what every export and the
prediction engine carry about it (one place for SavedModel, TFLite, serving, ``kerasnuc.predict``).

A run directory (``python -m training.fit``) holds ``config.json``, ``model.keras``,
``thresholds.json``, ``split.json`` and, with stain normalisation, ``stain.json``.
:func:`run_metadata` turns them into one JSON-able dict, written as
``assets.extra/kerasnuc.json`` inside a SavedModel, returned by its ``metadata`` signature,
and written as ``<file>.json`` beside a ``.tflite``. Consumers (``serving.client``,
``serving.edge``) read these keys:

=================  ===============================================================
task               segmentation, detection, classification or instance (Mask R-CNN)
channels           model input channels (images are converted: RGB <-> grey)
multiple           spatial sizes must be multiples of this (2**depth); 1 for patches
tile               side of the training crops
serving_tile       suggested tile side for tiled inference (multiple of ``multiple``)
tile_margin        suggested margin cropped from each tile side: the measured
                   ``receptive_radius`` rounded up to ``multiple``, at most 128
receptive_radius   measured: how far (pixels) one input pixel changes the output;
                   None if it reached the probe's border
patch              classification: side of the patch centred on each nucleus
class_names        classification: names of the output classes
postprocess        tuned post-processing keyword arguments (thresholds.json)
match_radius       detection/classification: matching radius used in evaluation
stochastic         True for Monte-Carlo dropout models; ``mc_samples`` passes
normalization      how pixels become model input (per-image min-max, see below)
stain              fitted stain normaliser (kerasnuc.data.stain.normalizer_from_dict) or None;
                   the prediction engine applies it. Its files (a dcgmm E-step network) are
                   absolute paths in memory; an export stores a copy beside its JSON and a
                   path relative to that JSON's folder (kerasnuc.data.stain.store_files)
=================  ===============================================================

:func:`load_model` is the one loader of a run's model: it reads the folder first, says
"corrupt" for a damaged ``model.keras``, and checks that the model fits the task, channels,
classes and family config.json claims (:mod:`kerasnuc.model_checks`).

This module imports neither TensorFlow nor Keras at import time; :func:`load_model`
and :func:`measure_receptive_radius` import Keras when called.
"""

import datetime
import json
import os
from dataclasses import dataclass


FORMAT = "kerasnuc-export/1"

NORMALIZATION = {
    "method": "per_image_min_max",
    "formula": "x = convert_channels(float32(image)); (x - min(x)) / max(max(x) - min(x), 1e-6)",
    "convert_channels": "to 1 channel: mean over channels; to 3 channels: repeat grey",
    "reference": "kerasnuc.intensity.normalize_image",
    "tiles": "tiles and patches of a larger image use the whole image's (min, max) "
             "(the intensity_range input of the *_with_range signatures)",
}

MAX_SERVING_MARGIN = 128


class RunError(ValueError):
    """A run directory is missing something an export needs (message says what)."""


_REQUIRED = object()


def write_json_atomic(path, data):
    """JSON through a temporary file, so a crash never leaves half a file."""
    from kerasnuc.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def thresholds_record(task, params, metric, value, **extra):
    """thresholds.json, one layout for every task: the post-processing parameters, where they
    were tuned and the validation score that chose them (``metric``: its name), plus the task's
    own settings (match_radius, density_sigma for detection)."""
    return {"task": task, "postprocess": dict(params), "tuned_on": "val" if value is not None else None,
            "validation": {"metric": metric, "value": value}, **extra}


def postprocess_of(thresholds):
    """The post-processing parameters of a thresholds.json (runs before the one layout kept
    detection's under "detection")."""
    return dict(thresholds.get("postprocess") or thresholds.get("detection") or {})


def read_json(path, default=_REQUIRED):
    """A JSON file's content; ``default`` if it does not exist (RunError without a default)."""
    if not os.path.exists(path):
        if default is not _REQUIRED:
            return default
        raise RunError(f"{path}: not found")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: not valid JSON ({error})") from None


def read_json_object(path, default=_REQUIRED):
    """A JSON file that must hold an object (dict): RunError naming the file otherwise."""
    data = read_json(path, default)
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


TASKS = ("segmentation", "detection", "classification", "instance")


def check_config(config, path):
    """The config.json keys every reader relies on: task, channels, model, model_config
    (RunError naming the file)."""
    task = config.get("task", "segmentation")
    if task not in TASKS:
        raise RunError(f"{path}: task '{task}' is none of {', '.join(TASKS)}")
    channels = config.get("channels", 3)
    if isinstance(channels, bool) or channels not in (1, 3):
        raise RunError(f"{path}: channels must be 1 or 3, got {channels!r}")
    if not isinstance(config.get("model", ""), str):
        raise RunError(f"{path}: model must be a model family name, got {config['model']!r}")
    model_config = config.get("model_config") or {}
    if not isinstance(model_config, dict):
        raise RunError(f"{path}: model_config must be a JSON object, got {model_config!r}")
    depth = model_config.get("depth", 0)
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
        raise RunError(f"{path}: model_config depth must be a non-negative integer, got {depth!r}")


@dataclass
class Run:
    path: str
    config: dict
    split: dict
    thresholds: dict
    stain: dict
    given: str = ""  # the path as the user gave it: messages name files the way they were asked for

    @property
    def task(self):  # noqa: D401
        return self.config.get("task", "segmentation")

    def shown(self, name=""):
        """``name`` inside the run folder, as the user spelled the folder."""
        return os.path.join(self.given or self.path, name) if name else (self.given or self.path)


def read_run(run_dir):
    """Read and check a run folder: the one reader of run folders (evaluation, export, the
    prediction engine). Errors name the missing or broken file.

    A fold of a cross-validation run (``RUN/fold2``) works too: its config.json is the parent's.
    A :class:`Run` already read is returned as it is, so callers pass it on instead of
    reading the folder again.
    """
    if isinstance(run_dir, Run):
        return run_dir
    path = os.path.abspath(os.fspath(run_dir)).rstrip(os.sep)
    if path.endswith(".incomplete"):
        raise RunError(f"{path}: this run did not finish (a '.incomplete' folder is never a run); "
                              "train again or evaluate a finished run")
    if not os.path.isdir(path):
        if os.path.isdir(path + ".incomplete"):
            raise RunError(f"{path}: run is incomplete ({path}.incomplete exists: training is still "
                                  "running or crashed)")
        if os.path.isfile(path):
            raise RunError(f"{path}: a file, not a run directory (give the folder holding model.keras "
                           "and config.json)")
        raise RunError(f"{path}: run directory not found")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path) and os.path.isfile(os.path.join(os.path.dirname(path), "config.json")) \
            and os.path.basename(path).startswith("fold"):
        config_path = os.path.join(os.path.dirname(path), "config.json")
    for name, file in (("config.json", config_path), ("split.json", os.path.join(path, "split.json"))):
        if not os.path.isfile(file):
            raise RunError(f"{path}: {name} missing; not a complete training.fit run folder")
    config = read_json_object(config_path)
    check_config(config, config_path)
    split = read_json_object(os.path.join(path, "split.json"))
    if "folds" in split:
        folds = ", ".join(f"{path}/fold{i + 1}" for i in range(len(split["folds"])))
        raise RunError(f"{path}: a cross-validation run; evaluate or export one fold: {folds}")
    if not os.path.isfile(os.path.join(path, "model.keras")):
        raise RunError(f"{path}: model.keras missing; not a complete training.fit run folder")
    thresholds_path = os.path.join(path, "thresholds.json")
    thresholds = {}
    if os.path.isfile(thresholds_path):
        thresholds = read_json_object(thresholds_path)
    elif config.get("task", "segmentation") in ("segmentation", "detection", "instance"):
        raise RunError(f"{path}: thresholds.json missing (the tuned post-processing of a "
                              f"{config.get('task', 'segmentation')} run)")
    stain_path = os.path.join(os.path.dirname(config_path), "stain.json")
    stain = read_stain(stain_path) if config.get("stain") and os.path.isfile(stain_path) else {}
    if config.get("stain") and not stain:
        raise RunError(f"{path}: stain.json missing (the run normalised stains: {config['stain']})")
    return Run(path, config, split, thresholds, stain, os.fspath(run_dir))


def find_config(run_dir):
    """config.json of a run; a cross-validation fold folder (run/foldK) uses its parent's."""
    for folder in (run_dir, os.path.dirname(os.path.abspath(run_dir))):
        path = os.path.join(folder, "config.json")
        if os.path.exists(path):
            return path
    raise RunError(f"{run_dir}: no config.json (is this a training.fit run directory?)")


def load_run(run_dir):
    """(config, thresholds, split) dicts of a run directory, as :func:`read_run` checks it."""
    run = read_run(run_dir)
    return run.config, run.thresholds, run.split


def load_model(run_dir, check=True):
    """The run's ``model.keras`` in Keras safe mode (kerasnuc layers registered first), uncompiled.

    The run folder is read first (:func:`read_run`: a missing or broken file is named before
    Keras starts) and, with ``check``, the model must fit what config.json claims
    (:func:`kerasnuc.model_checks.check_keras_model`): exports and the engine never serve a
    model as something it is not. Errors are :class:`RunError` (one line naming the file)."""
    run = read_run(run_dir)
    model = read_keras_file(run.shown("model.keras"))
    if check:
        from kerasnuc.model_checks import check_keras_model

        check_keras_model(model, run.config, run.shown(),
                          recorded_class_names(run.config, run.path) if run.task == "classification" else (),
                          multiple=model_multiple(run.config))
    return model


def read_keras_file(path):
    """A ``.keras`` file as an uncompiled model; RunError saying "corrupt" for a damaged zip
    (Keras itself calls any unreadable zip "File not found")."""
    import zipfile

    if not os.path.isfile(path):
        raise RunError(f"{path}: not found")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member: a CRC error shows here
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise RunError(f"{path}: not a readable Keras model (corrupt or truncated zip: {error})") from None
    if damaged:
        raise RunError(f"{path}: not a readable Keras model (corrupt zip: member {damaged} fails its CRC check)")
    import keras

    import kerasnuc.models  # noqa: F401  (registers the custom layers)

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001  (a valid zip Keras cannot build a model from)
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise RunError(f"{path}: not a readable Keras model ({detail})") from None


def model_multiple(config):
    """Spatial sizes of the run's model must be multiples of this (:mod:`kerasnuc.models.geometry`)."""
    from kerasnuc.models.geometry import input_multiple

    return input_multiple(config.get("model", "unet"), config.get("model_config"))


def read_stain(path):
    """A stain.json as stored by training, its files (a dcgmm ``stain_model.keras``) resolved
    against its folder; RunError naming stain.json and the file when one is missing."""
    from kerasnuc.data.stain import resolve_paths

    data = read_json_object(path)
    try:
        return resolve_paths(data, os.path.dirname(os.path.abspath(path)), where=path)
    except (OSError, ValueError) as error:
        raise RunError(str(error)) from None


def stain_of(run_dir):
    """The fitted stain normaliser dict stored by training (stain.json; files resolved, see
    :func:`read_stain`), or None."""
    for folder in (run_dir, os.path.dirname(os.path.abspath(run_dir))):
        path = os.path.join(folder, "stain.json")
        if os.path.exists(path):
            data = read_stain(path)
            return {k: v for k, v in data.items() if k in ("method", "params", "fitted")}
    return None


def exported_metadata(meta, folder, prefix="", copy=True):
    """``meta`` as an export writes it into ``folder``: its stain normaliser's files (a dcgmm
    network) copied there as ``<prefix>stain_model.keras``, named relative to ``folder``
    (:func:`kerasnuc.data.stain.store_files`; readers resolve them against the JSON's folder).
    ``copy=False``: the names only."""
    if not meta.get("stain"):
        return meta
    from kerasnuc.data.stain import store_files

    return {**meta, "stain": store_files(meta["stain"], folder, prefix, copy=copy)}


def recorded_class_names(config, run_dir=None):
    """The class names a classifier run records: metrics.json of the run, else the training
    data's records; () if neither says."""
    names = ()
    if run_dir:
        names = tuple(read_json_object(os.path.join(run_dir, "metrics.json"), default={}).get("class_names") or ())
    if not names:
        try:
            from kerasnuc.data import load_dataset

            for record in load_dataset(resolve_spec(config["data"])):
                if record.class_names:
                    names = tuple(record.class_names)
                    break
        except Exception:  # data moved or unreadable: names are a convenience, not a necessity
            names = ()
    return names


def class_names_of(config, num_classes, run_dir=None):
    """Class names for a classifier: :func:`recorded_class_names`, else class_0..K-1."""
    names = list(recorded_class_names(config, run_dir))[:num_classes]
    return names + [f"class_{i}" for i in range(len(names), num_classes)]


def measure_receptive_radius(model, channels, multiple, size=128, max_size=1024):
    """How far, in pixels, changing one input pixel changes the output (exact, by probing).

    Two images that differ in the centre pixel only go through the model (Monte-Carlo
    dropout switched off); the farthest output pixel that differs by more than float32
    noise (1e-6 relative) gives the radius.
    Tiles whose margin is at least this radius reproduce whole-image predictions.
    None if the change reaches the border of a ``max_size`` probe.
    """
    import numpy as np

    deterministic = deterministic_clone(model)
    while size <= max_size:
        size = int(np.ceil(size / multiple) * multiple)
        base = np.zeros((1, size, size, channels), np.float32)
        probe = base.copy()
        centre = size // 2
        probe[0, centre, centre, :] = 1.0
        out = np.asarray(deterministic(np.concatenate([base, probe]), training=False))
        # Identical inputs can differ in the last bits (position-dependent blocking in the
        # convolutions), so "changed" means above float32 noise.
        tolerance = 1e-6 * max(1.0, float(np.abs(out).max()))
        changed = np.abs(out[0] - out[1]).reshape(size, size, -1).max(axis=-1) > tolerance
        rows, cols = np.nonzero(changed)
        if len(rows) == 0:
            return 0
        radius = int(max(np.abs(rows - centre).max(), np.abs(cols - centre).max()))
        if radius < centre - 1:
            return radius
        size *= 2
    return None


def deterministic_clone(model):
    """The model with Monte-Carlo dropout layers as ordinary (inference-off) Dropout, same weights."""
    import keras

    from kerasnuc.models import MCDropout, is_stochastic

    if not is_stochastic(model):
        return model

    def clone(layer):
        if isinstance(layer, MCDropout):
            return keras.layers.Dropout(layer.rate, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def run_metadata(run_dir, model=None, measure=True):
    """The metadata dict of a run (see the module docstring for the keys); ``run_dir`` may be
    the :class:`Run` that :func:`read_run` gave."""
    import keras

    from kerasnuc import __version__
    from kerasnuc.models import is_stochastic

    run = read_run(run_dir)
    run_dir, config, thresholds = run.path, run.config, run.thresholds
    model = model if model is not None else load_model(run)
    task = config.get("task", "segmentation")
    channels = int(config.get("channels", model.input_shape[-1] or 3))
    meta = {
        "format": FORMAT,
        "kerasnuc_version": __version__,
        "keras_version": keras.__version__,
        "tensorflow_version": _tf_version(),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": os.path.abspath(run_dir),
        "task": task,
        "model": config.get("model"),
        "model_config": config.get("model_config") or {},
        "channels": channels,
        "tile": int(config.get("tile", 128)),
        "patch": int(config.get("patch", 32)),
        "postprocess": postprocess_of(thresholds) or config.get("postprocess") or {},
        "postprocess_tuned_on": thresholds.get("tuned_on"),
        "match_radius": float(thresholds.get("match_radius", config.get("match_radius", 6.0))),
        "density_sigma": float(thresholds.get("density_sigma", config.get("density_sigma", 2.0))),
        "stochastic": bool(is_stochastic(model)),
        "mc_samples": int(config.get("mc_samples", 10)),
        "precision_used": config.get("precision_used", "float32"),
        "normalization": NORMALIZATION,
        "stain": stain_of(run_dir),
        "data": config.get("data"),
        # pixel size (µm) of the training images, so slides are read at the same scale
        "mpp": float(config.get("mpp") or 0.0) or None,
    }
    if task == "instance":  # Mask R-CNN: fixed input, tiled to; detections, not maps
        meta.update(instance_metadata(config, model))
        return meta
    meta["output_channels"] = int(model.output_shape[-1])
    if task == "classification":
        patch = int(model.input_shape[1] or meta["patch"])
        meta.update(multiple=1, patch=patch, serving_tile=patch, tile_margin=0, receptive_radius=None,
                    class_names=class_names_of(config, int(model.output_shape[-1]), run_dir))
    else:
        multiple = model_multiple(config)
        radius = measure_receptive_radius(model, channels, multiple) if measure else None
        wanted = MAX_SERVING_MARGIN if radius is None else min(radius, MAX_SERVING_MARGIN)
        margin = int(-(-wanted // multiple) * multiple)
        serving_tile = max(256, meta["tile"], 4 * margin)  # at least half of each tile is kept
        serving_tile = int(-(-serving_tile // multiple) * multiple)
        meta.update(multiple=multiple, serving_tile=serving_tile, tile_margin=margin,
                    receptive_radius=radius, class_names=[])
    return meta


INSTANCE_MARGIN = 64  # pixels of tile overlap on each side: room for a whole nucleus (MoNuSeg's reach ~40 px)


def instance_metadata(config, model):
    """The metadata keys of an instance model: its fixed ``input_size`` (the engine's tile),
    the input multiple, ``tile_margin`` (``INSTANCE_MARGIN`` or the postprocess's), detections
    and mask size; the receptive field of a detector is the whole tile, so it is not probed."""
    multiple = model_multiple(config)
    size = [int(side) for side in model.input_shape[1:3]]
    margin = int((config.get("postprocess") or {}).get("tile_margin", INSTANCE_MARGIN))
    margin = int(-(-margin // multiple) * multiple)
    boxes, _, masks = sorted((tuple(o.shape) for o in model.outputs), key=lambda s: {3: 0, 2: 1, 4: 2}[len(s)])
    return {"multiple": multiple, "input_size": size, "serving_tile": size[0], "tile_margin": margin,
            "receptive_radius": None, "class_names": [], "max_detections": int(boxes[1]),
            "mask_size": int(masks[-1]), "output_names": ["boxes", "scores", "masks"]}


def _tf_version():
    try:
        import tensorflow as tf

        return tf.__version__
    except ImportError:
        return None


def resolve_spec(spec):
    """A dataset spec whose relative path is tried as given, then from the repository root
    (training.fit runs from there, so run configs hold paths like ../shared/data/...)."""
    if not spec or ":" not in spec:
        return spec
    fmt, path = spec.split(":", 1)
    if os.path.isabs(path) or os.path.exists(path):
        return spec
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidate = os.path.normpath(os.path.join(root, path))
    return f"{fmt}:{candidate}" if os.path.exists(candidate) else spec


def records_of_split(run_dir, which, limit=None, stain=False):
    """The run's images of split ``which`` (train / val / test) as NucleiImage records.

    Reads the data spec of config.json (test_data for ``test:`` names, extra_train_data for
    ``extra<i>:`` names). The images are
    the original pixels: the prediction engine applies the run's stain normaliser itself
    (``meta["stain"]``). ``stain=True`` applies it here, for code that feeds the network
    without the engine (int8 calibration crops).
    """
    from kerasnuc.data import load_dataset

    config, _, split = load_run(run_dir)
    names = list(split.get(which) or [])
    if limit:
        names = names[:limit]
    if not names:
        return []
    wanted = set(names)
    records = []
    if any(not n.startswith("test:") for n in names):
        records += [r for r in load_dataset(resolve_spec(config["data"])) if r.name in wanted]
    if config.get("test_data") and any(n.startswith("test:") for n in names):
        for record in load_dataset(resolve_spec(config["test_data"])):
            record.name = f"test:{record.name}"
            if record.name in wanted:
                records.append(record)
    from kerasnuc.data.splits import extra_spec, select_records

    for i, entry in enumerate(config.get("extra_train_data") or []):  # training-only sets: extra<i>:<name>
        if any(n.startswith(f"extra{i}:") for n in names):
            spec, only = extra_spec(entry)
            for record in select_records(load_dataset(resolve_spec(spec)), only):
                record.name = f"extra{i}:{record.name}"
                if record.name in wanted:
                    records.append(record)
    by_name = {r.name: r for r in records}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise RunError(f"{run_dir}: {len(missing)} {which} images of split.json not found in the data "
                       f"({config.get('data')}), e.g. {missing[0]}")
    records = [by_name[n] for n in names]
    stored = stain_of(run_dir) if stain else None
    if stored:
        from kerasnuc.data.stain import normalize_rgb, normalizer_from_dict

        normaliser = normalizer_from_dict(stored)
        for record in records:
            record.image = normalize_rgb(normaliser, record.image)
    return records


def write_run(path, model, task=None, model_name=None, model_config=None, data="sample", split=None,
              postprocess=None, **config):
    """Write a run directory for a model built or trained outside ``training.fit``.

    Gives it what the exporters read: ``model.keras``, ``config.json`` (task, model, channels,
    tile, patch, data spec...), ``thresholds.json`` and ``split.json`` (default: a seeded
    70/15/15 split of ``data``'s image names). Used by the tests to export tiny models.
    """
    from kerasnuc.data import load_dataset
    from kerasnuc.data.splits import train_val_test_split

    os.makedirs(path, exist_ok=True)
    name = model_name or model.name
    if task is None:
        from kerasnuc import models

        task = models.task_of(name)
    channels = int(model.input_shape[-1])
    resolved = {"task": task, "model": name, "model_config": dict(model_config or {}), "channels": channels,
                "tile": 64, "patch": int(model.input_shape[1] or 32), "data": data, "test_data": "",
                "mc_samples": 4, "match_radius": 6.0, "density_sigma": 2.0, "seed": 0,
                "precision_used": "float32", "postprocess": dict(postprocess or {})}
    resolved.update(config)
    if split is None:
        split = train_val_test_split([r.name for r in load_dataset(data)], 0.15, 0.15, seed=0)
    model.save(os.path.join(path, "model.keras"))
    write_json_atomic(os.path.join(path, "config.json"), resolved)
    write_json_atomic(os.path.join(path, "split.json"), {"seed": 0, "grouped_by": "image", **split})
    write_json_atomic(os.path.join(path, "thresholds.json"),
                      {"postprocess": resolved["postprocess"], "tuned_on": None})
    return path


def nucleus_points(record):
    """((K, 2) (x, y), (K,) classes or None) of a record: its classified points, else its
    points, else the centroids of its instance labels (for calibrating / checking classifiers
    on data without classes)."""
    import numpy as np

    from kerasnuc.data.pipeline import classified_points
    from kerasnuc.data.targets import instance_centroids

    points, classes = classified_points(record)
    if len(points):
        return points, classes
    if record.points is not None:
        return np.asarray(record.points, dtype=np.float64).reshape(-1, 2), None
    if record.labels is not None:
        return instance_centroids(record.labels)[0], None
    return np.zeros((0, 2)), None
