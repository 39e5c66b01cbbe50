"""Run configuration: every default explicit, written as ``config.json`` into each run.

Precedence: built-in defaults < ``--config FILE`` (JSON) < command-line flags.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

# Written into a run's config.json beside the settings; ignored when the file is read back.
PROVENANCE_KEYS = ("_comment", "precision_used", "kerasnuc_version", "keras_version", "backend", "machine",
                   "data_relocated_from")
TASKS = ("segmentation", "detection", "classification", "instance")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
SEGMENTATION_TARGETS = ("foreground", "three_class")


@dataclass
class FitConfig:
    """What ``python -m training.fit`` does; the defaults are the quick start."""

    task: str = "segmentation"
    """segmentation, detection, classification or instance (Mask R-CNN: tile is the model's input size)."""
    model: str = "unet"
    """A name from ``kerasnuc.models.available()``."""
    model_config: dict = field(default_factory=lambda: {"filters": 8, "depth": 4})
    """Keyword arguments for the model builder (filters, depth, steps, dropout...). The default
    is the quick start's small U-Net; choosing another model without model_config uses that
    family's paper defaults."""
    data: str = "sample"
    """Dataset spec: 'sample' (shipped DSB 2018 subset) or FORMAT:PATH."""
    test_data: str = ""
    """Optional dataset spec scored as the held-out test set (then 'data' is split into train/val only)."""
    extra_train_data: list = field(default_factory=list)
    """More training images, never validated or tested on: dataset specs, or {"data": SPEC, "only":
    "colour"} to take only a set's colour images (e.g. the brightfield H&E images of DSB 2018)."""
    channels: int = 3
    """Model input channels: 1 (grey) or 3 (RGB); images are converted."""
    mpp: float = 0.0
    """Pixel size of the training images in µm; 0: the dataset reader's (MoNuSeg 0.25, CRCHisto 0.55;
    DSB 2018 has none). Recorded in the run, so prediction reads slides at the same pixel size."""
    epochs: int = 30
    batch_size: int = 8
    tile: int = 128
    """Side of the square training crops; must be divisible by 2**depth."""
    steps_per_epoch: int = 0
    """Batches per epoch; 0 means enough to cover the training pixels once."""
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    """adam, adamw or sgd (with the momentum below)."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1) (the seed 004 recipe: 0.99); ignored by adam and adamw."""
    weight_decay: float = 0.0
    loss: str = "bce_dice"
    """bce, dice, bce_dice, focal (segmentation)."""
    loss_options: dict = field(default_factory=dict)
    """Keyword arguments of the loss, e.g. {"dice_weight": 0.5} for bce_dice."""
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    seed: int = 0
    precision: str = "auto"
    """auto: mixed_float16 on a GPU, float32 on a CPU (mixed is slower there)."""
    augment: dict = field(default_factory=lambda: {"flip": True, "rotate90": True,
                                                   "brightness": 0.1, "contrast": 0.1})
    """Options for kerasnuc.data.augment.Augmenter."""
    postprocess: dict = field(default_factory=lambda: {"threshold": 0.5, "min_distance": 3,
                                                       "min_area": 10})
    """Starting post-processing parameters; tuned on the validation split."""
    tune_postprocess: bool = True
    target: str = "foreground"
    """Segmentation target: 'foreground' (one sigmoid channel; watershed seeded by distance peaks) or
    'three_class' (softmax background / inside / boundary, model_config out_channels 3; the watershed
    is seeded by the inside cores, which separates touching nuclei; loss 'cce_dice')."""
    density_sigma: float = 2.0
    """Detection: sigma (pixels) of the Gaussian put on every nucleus centre."""
    match_radius: float = 6.0
    """Detection/classification: a predicted centre matches a true one within this many pixels."""
    patch: int = 32
    """Classification: side of the square patch centred on each nucleus."""
    balanced: bool = False
    """Classification: draw a class uniformly, then a nucleus of it (for rare classes and
    images whose class mix differs; the validation and test sets are never resampled)."""
    folds: int = 0
    """k-fold cross-validation: 0 for one train/val/test split, K >= 2 for K folds (mean +- std)."""
    split: str = ""
    """A fixed split instead of the seeded fractions: 'monuseg_organ' (the organ-wise MoNuSeg split
    of Kumar et al. 2017 / NucSeg's MOSID: train and validate on breast, kidney, liver, prostate;
    test on 8 same-organ and 6 other-organ images) or a split JSON file (configs/splits/). Empty: none."""
    stain: dict = field(default_factory=dict)
    """Stain normalisation, e.g. {"method": "macenko", "template": "path.png"} (or "reinhard",
    "vahadane"), or a trained DCGMM: {"method": "dcgmm", "model": "DIR", "template": "path.png"}
    (DIR from python -m kerasnuc.data.stain train-dcgmm; copied into the run as
    stain_model.keras); empty: none. Inference applies the run's stain.json itself."""
    max_pixels: int = 2 ** 28
    """Largest image (height x width pixels) read whole into memory, checked from the file header
    before decoding (kerasnuc.data.validation); lazily read slides are not limited."""
    bit_depth: object = "auto"
    """Bits of the data in images stored in more than 8 bits: 'auto' (the smallest of 8/10/12/14/16
    that holds each image's maximum) or a number such as 12; scaled to 8 bits by that range."""
    binary_labels: str = "error"
    """A label image that is a binary mask with several blobs: 'error', or 'components' to number
    its 8-connected blobs as nuclei."""
    time_budget: float = 0.0
    """Minutes of training allowed for each model (each fold); training stops after the
    epoch that would overrun it. 0: no limit. For CPU-budget runs of long recipes."""
    self_correction: int = 0
    """Self-Correction (Li et al., SCHP; segmentation): after the usual ``epochs`` (the warm-up),
    this many cycles with a cosine learning rate restarting each cycle; at each cycle's end the
    weights are averaged over the cycles (BatchNorm statistics re-estimated) and the training labels
    blended with the averaged model's predictions. The averaged model is saved and evaluated. 0: off."""
    self_correction_epochs: int = 10
    """Epochs per self-correction cycle (SCHP: 10)."""
    self_correction_lr_max: float = 1.0
    """Learning rate at the start of each cycle, as a fraction of learning_rate (SCHP: 0.5)."""
    self_correction_lr_min: float = 0.01
    """Learning rate the cosine falls towards at the end of each cycle, as a fraction of
    learning_rate (SCHP: 0.01)."""
    self_correction_bn_batches: int = 0
    """Training batches run to re-estimate the averaged model's BatchNorm statistics; 0: one epoch's."""
    mc_samples: int = 10
    """Stochastic passes averaged when evaluating a Monte-Carlo dropout model."""
    init_weights: str = ""
    """Start from a trained model's weights (fine-tuning): a pretrained name (e.g. 'he'), a run folder
    or a .keras file of the same model and model_config; the optimizer starts fresh. Empty: random."""
    workers: object = "auto"
    """Threads building training batches: a count, or 'auto' (cores - 1, at most 8: 1 on a 2-core CPU,
    where batches cost about one percent of a step; several on a GPU machine, so the pipeline keeps up).
    Batches are a pure function of (seed, epoch, index), so the count never changes what trains."""
    distribute: str = "none"
    """Data-parallel training: none, auto, data_parallel (JAX: keras.distribution over all
    devices/hosts), mirrored (TensorFlow: all GPUs of the machine) or multi_worker
    (TensorFlow: several machines, TF_CONFIG). batch_size is the global batch."""
    out: str = ""
    """Run directory; empty means runs/<model>-<timestamp>."""

    def validate(self):
        from kerasnuc import models
        from kerasnuc.models.geometry import input_multiple

        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got '{self.task}'")
        if self.model not in models.available():
            raise ValueError(f"unknown model '{self.model}'; available: {', '.join(models.available())}")
        if (models.task_of(self.model) == "instance") != (self.task == "instance"):
            raise ValueError(f"model '{self.model}' is a {models.task_of(self.model)} model, task is '{self.task}'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        from kerasnuc.data.validation import InputPolicy

        InputPolicy.from_options(self.max_pixels, self.bit_depth, self.binary_labels)  # ValueError if invalid
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        self._validate_self_correction()
        self._validate_target()
        from kerasnuc.data.pipeline import resolve_workers

        resolve_workers(self.workers)  # ValueError if neither a count nor 'auto'
        if self.split and (self.folds >= 2 or self.test_data):
            raise ValueError(f"split '{self.split}' fixes train/val/test: it excludes folds and test_data")
        from kerasnuc.data.splits import extra_spec

        for extra in self.extra_train_data:
            spec, only = extra_spec(extra)
            if only not in ("", "colour", "grey"):
                raise ValueError(f"extra_train_data {spec}: 'only' must be 'colour' or 'grey', got '{only}'")
        if self.init_weights:
            from training.warm_start import source_file

            source_file(self.init_weights)  # ValueError naming a missing or unusable source
        if self.time_budget < 0:
            raise ValueError(f"time_budget must be >= 0 minutes, got {self.time_budget}")
        from training.distribute import check_choice

        check_choice(self.distribute)
        for name in ("epochs", "batch_size", "tile"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        multiple = input_multiple(self.model, self.model_config)
        if self.task != "classification" and self.tile % multiple:
            raise ValueError(f"tile {self.tile} must be divisible by the input multiple {multiple} of {self.model}")
        return self

    def _validate_target(self):
        if self.target not in SEGMENTATION_TARGETS:
            raise ValueError(f"target must be one of {SEGMENTATION_TARGETS}, got '{self.target}'")
        if self.target == "foreground":
            return
        if self.task != "segmentation":
            raise ValueError(f"target '{self.target}' is for the segmentation task, not '{self.task}'")
        channels = int(self.model_config.get("out_channels", 1))
        if channels != 3:
            raise ValueError(f"target 'three_class' needs model_config out_channels 3, got {channels}")
        if self.loss not in ("cce_dice", "categorical_focal"):
            raise ValueError(f"target 'three_class' trains a softmax: loss 'cce_dice' (or 'categorical_focal'), "
                             f"got '{self.loss}'")

    def _validate_self_correction(self):
        if self.self_correction < 0:
            raise ValueError(f"self_correction must be >= 0 cycles, got {self.self_correction}")
        if not self.self_correction:
            return
        if self.task != "segmentation":
            raise ValueError(f"self_correction is for the segmentation task, not {self.task}")
        if self.self_correction_epochs < 1 or self.self_correction_bn_batches < 0:
            raise ValueError("self_correction_epochs must be >= 1 and self_correction_bn_batches >= 0, got "
                             f"{self.self_correction_epochs} and {self.self_correction_bn_batches}")
        if not 0.0 <= self.self_correction_lr_min <= self.self_correction_lr_max:
            raise ValueError("self_correction_lr_min and _lr_max need 0 <= min <= max, got "
                             f"{self.self_correction_lr_min} and {self.self_correction_lr_max}")
        if self.distribute != "none":
            raise ValueError(f"self_correction does not run with distribute '{self.distribute}' "
                             "(weight averaging and label refinement are single-process); use distribute none")

    @classmethod
    def from_run(cls, run_dir):
        """The FitConfig a run was trained with, read back from its config.json (keys a newer
        kerasnuc added take their defaults; provenance keys are dropped)."""
        from kerasnuc.runs import read_run

        return cls.from_dict(read_run(run_dir).config)

    @classmethod
    def from_dict(cls, values):
        """A FitConfig from a run's config.json content (unknown and provenance keys dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self):
        return dataclasses.asdict(self)


def field_help():
    """Attribute docstrings, used as argparse help (one source of truth)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(FitConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(getattr(following, "value", None), ast.Constant):
            docs[node.target.id] = following.value.value
    return docs


def load_config_file(path):
    """Read a JSON config; unknown keys are an error naming the file and the key."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config must be a JSON object")
    known = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(data) - known - set(PROVENANCE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known: {sorted(known)}")
    return {k: v for k, v in data.items() if k in known}


def resolve(file_values=None, overrides=None):
    """Defaults, then file values, then explicit overrides (None means 'not given')."""
    values = FitConfig().to_dict()
    for source in (file_values or {}, overrides or {}):
        if source.get("model") not in (None, values["model"]):
            values["model_config"] = {}  # another family: start from its own defaults
        for key, value in source.items():
            if value is None:
                continue
            if isinstance(values.get(key), dict) and isinstance(value, dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
    given_task = any((source or {}).get("task") is not None for source in (file_values, overrides))
    if not given_task:  # an instance family (Mask R-CNN) trains as the instance task without --task
        from kerasnuc import models

        if values["model"] in models.available() and models.task_of(values["model"]) == "instance":
            values["task"] = "instance"
    return FitConfig(**values).validate()


def default_run_dir(config):
    import time

    return os.path.join("runs", f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
