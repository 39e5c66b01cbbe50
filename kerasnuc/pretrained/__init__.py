"""Trained models shipped inside the package, loaded by name.

>>> import kerasnuc
>>> kerasnuc.pretrained.available()          # {"fluo": "...", "he": "...", ...}
>>> labels, table = kerasnuc.load("he").predict_instances(image)

Each model is a folder ``kerasnuc/pretrained/<name>/``: a slim training run folder
(``model.keras`` without optimizer state, ``config.json``, ``split.json``,
``thresholds.json``, ``metrics.json``, stain files if the run normalised stains), its int8
``model_int8.tflite`` with the metadata sidecar ``model_int8.json`` (LiteRT, no TensorFlow),
``MODEL_CARD.md`` and ``card.json``. ``python -m export.pretrained`` packs a finished run into
one. :func:`resolve` is the one rule that turns a name into a path, for ``kerasnuc.load`` and
``python -m kerasnuc.predict`` alike. Licences of the training data: :mod:`.licences`.

Importing this package needs no TensorFlow, Keras or JAX.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))

MODELS = {
    "fluo": "nuclei in fluorescence and brightfield images (trained on DSB 2018 stage1_train)",
    "he": "nuclei in H&E histology (trained on MoNuSeg 2018 training images and DSB 2018's H&E images)",
    "crc-detect": "UD-Net nucleus centres in H&E colon tissue (CRCHistoPhenotypes detection)",
    "crc-classify": "DCRN nucleus classes epithelial / inflammatory / fibroblast / others "
                    "(CRCHistoPhenotypes; classifies given centres, e.g. crc-detect's)",
}
"""The shipped names and what each is for (one line)."""

ENGINE_FILES = ("model.keras", "config.json", "split.json", "thresholds.json")
"""What a packed folder must hold for the Keras runtime (:func:`kerasnuc.runs.read_run`)."""

TFLITE = "model_int8.tflite"

_noted = set()  # names whose LiteRT fallback was announced on stderr


class UnknownModel(ValueError):
    """A name that is not a shipped model (the message lists the known ones)."""


class NotPacked(FileNotFoundError):
    """A shipped name whose folder has not been packed into this installation."""


def available():
    """{name: one-line description} of the shipped models."""
    return dict(MODELS)


def _known(name):
    if name not in MODELS:
        raise UnknownModel(f"no pretrained model named {name!r}; known: {', '.join(MODELS)}")
    return name


def path(name):
    """The folder of the shipped model ``name`` (UnknownModel / NotPacked otherwise)."""
    folder = os.path.join(ROOT, _known(name))
    missing = [file for file in ENGINE_FILES + (TFLITE,) if not os.path.isfile(os.path.join(folder, file))]
    if missing:
        raise NotPacked(f"pretrained model {name!r}: not packed yet ({folder} lacks {', '.join(missing)}); "
                        f"pack a finished run with: python -m export.pretrained RUN --name {name} "
                        f"--config configs/pretrained/{name}.json")
    return folder


def card(name):
    """The model card (MODEL_CARD.md) of ``name`` as text."""
    with open(os.path.join(path(name), "MODEL_CARD.md"), encoding="utf-8") as handle:
        return handle.read()


def card_data(name):
    """The machine-readable model card (card.json) of ``name``."""
    import json

    with open(os.path.join(path(name), "card.json"), encoding="utf-8") as handle:
        return json.load(handle)


def keras_available():
    """Whether Keras is installed (looked up, not imported: importing it starts TensorFlow)."""
    import importlib.util

    try:
        return importlib.util.find_spec("keras") is not None
    except (ImportError, ValueError):
        return False


def resolve(source):
    """The path to load for ``source``: itself when it is anything but a bare shipped name, or when
    a file or folder of that name exists here; for a shipped name, its folder (Keras), or its
    int8 ``.tflite`` where Keras is not installed (said once per name on stderr). A bare word
    that is neither a path nor a known name raises FileNotFoundError listing the names."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    text = os.fspath(source)
    if os.path.exists(text) or not _bare(text):
        return source
    if text not in MODELS:  # as before names existed: a missing path, now with the names listed
        raise FileNotFoundError(f"{text}: no such run folder or file, nor a pretrained model name "
                           f"(known: {', '.join(MODELS)})")
    folder = path(text)
    if keras_available():
        return folder
    if text not in _noted:
        _noted.add(text)
        print(f"kerasnuc: Keras is not installed; pretrained model {text!r} runs its int8 {TFLITE} "
              "through LiteRT", file=sys.stderr)
    return os.path.join(folder, TFLITE)


def _bare(text):
    """A word that could only be a model name: no folder separator, suffix or host:port."""
    return bool(text) and not any(mark in text for mark in (os.sep, "/", ".", ":"))
