"""Dataset specs: ``FORMAT:PATH`` strings naming a reader and where the data is.

``sample`` is the small DSB 2018 subset shipped with kerasnuc. Readers register
themselves in ``FORMATS``; add a format by adding a module to ``readers/`` and a row here.
"""

import importlib
import os

from kerasnuc.data.imageio import DataError

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "sample")

# format name -> (reader module, what it reads)
FORMATS = {
    "folder": ("kerasnuc.data.readers.labelled_folder", "images/ + labels/ with matching file names"),
    "dsb2018": ("kerasnuc.data.readers.dsb2018",
                "DSB 2018: Kaggle <id>/images + <id>/masks folders, images/ + labels/, or an RLE .csv"),
    "monuseg": ("kerasnuc.data.readers.monuseg",
                "MoNuSeg: H&E tiles + Aperio XML (.xml/.xml.gz) outlines, or images/ + labels/ [+ annotations/]"),
    "crchisto": ("kerasnuc.data.readers.crchisto",
                 "CRCHistoPhenotypes: Detection/ + Classification/ .mat points, or images/ + annotations/"),
    "pannuke": ("kerasnuc.data.readers.pannuke",
                "PanNuke folds: images.npy, masks.npy (5 class instance maps), types.npy"),
}


def available_formats():
    """Format names with a one-line description each."""
    return {name: description for name, (_, description) in sorted(FORMATS.items())}


def parse_spec(spec):
    """Split ``FORMAT:PATH`` (or ``sample``) into (format, path)."""
    if spec == "sample":
        return "folder", SAMPLE_DIR
    if ":" not in spec:
        if os.path.isdir(spec):
            return "folder", spec
        raise DataError(f"dataset spec '{spec}': expected FORMAT:PATH with FORMAT one of "
                        f"{', '.join(sorted(FORMATS))}, or 'sample'")
    fmt, path = spec.split(":", 1)
    if fmt not in FORMATS:
        raise DataError(f"dataset spec '{spec}': unknown format '{fmt}'; known: {', '.join(sorted(FORMATS))}")
    if not os.path.exists(path):
        raise DataError(f"dataset spec '{spec}': {path} does not exist")
    return fmt, path


def dataset_mpp(spec):
    """Pixel size (µm) of a dataset's images as its reader knows it, or None."""
    fmt, _ = parse_spec(spec)
    return getattr(importlib.import_module(FORMATS[fmt][0]), "MPP", None)


def load_dataset(spec, **options):
    """Read a dataset from its spec; returns a list of NucleiImage."""
    fmt, path = parse_spec(spec)
    module = importlib.import_module(FORMATS[fmt][0])
    return module.read(path, **options)
