"""CRCHistoPhenotypes (Sirinukunwattana et al. 2016): nucleus centres in colon H&E tiles.

Layouts found automatically under ``path``:

* the original release: ``Detection/imgN/imgN.bmp`` + ``Detection/imgN/imgN_detection.mat``
  and ``Classification/imgN/imgN_{epithelial,inflammatory,fibroblast,others}.mat``;
* ``images/imgN.png`` + ``annotations/imgN/imgN_*.mat`` (``../shared/data/crchistophenotypes``).

Each ``.mat`` file holds one variable ``detection``: a K x 2 array of (x, y) in MATLAB
1-based coordinates (an empty class may be 0 x 2). Points are converted to 0-based pixel
coordinates (x - 1, y - 1); points that lie just outside the image are kept.

Records (in natural name order img1, img2, ..., img100) carry:

* ``points``: the detection points (K, 2);
* ``extra["class_points"]``: the classified points (K2, 2), class by class in
  :data:`CLASS_NAMES` order, with their class index in ``classes`` (K2,);
* ``class_names``: :data:`CLASS_NAMES`.

Images without classification files get ``classes=None`` and no ``class_points``.
"""

MPP = 0.55
"""Pixel size of the dataset in µm: cropped at 20x, 0.55 µm/px (Sirinukunwattana et al. 2016)."""

import os
import re

import numpy as np

from kerasnuc.data.imageio import DataError, read_image
from kerasnuc.data.types import NucleiImage
from kerasnuc.data.validation import read_or_skip

CLASS_NAMES = ("epithelial", "inflammatory", "fibroblast", "others")
IMAGE_EXTENSIONS = (".bmp", ".png", ".tif", ".tiff", ".jpg", ".jpeg")


def natural_key(name):
    """Sort key putting img2 before img10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_points_mat(path, key="detection"):
    """The (K, 2) float64 (x, y) points of a CRCHistoPhenotypes ``.mat`` file, 1-based as stored."""
    import scipy.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: annotation file not found")
    try:
        content = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises ValueError, TypeError, MatReadError, ...
        raise DataError(f"{path}: cannot read MATLAB file ({type(error).__name__}: {error})") from None
    if key not in content:
        found = sorted(k for k in content if not k.startswith("__"))
        raise DataError(f"{path}: no variable '{key}' (found {found})")
    array = np.asarray(content[key])
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: '{key}' must be a K x 2 numeric array of x, y, got shape {array.shape} "
                        f"dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise DataError(f"{path}: '{key}' holds non-finite coordinates")
    return array


def _find_image(folder, stem):
    for ext in IMAGE_EXTENSIONS:
        candidate = os.path.join(folder, stem + ext)
        if os.path.isfile(candidate):
            return candidate
    return None


def _subfolder(path, name):
    for entry in sorted(os.listdir(path)):
        if entry.lower() == name and os.path.isdir(os.path.join(path, entry)):
            return os.path.join(path, entry)
    return None


def find_files(path):
    """``{name: (image path, detection .mat, {class: .mat} or None)}`` in natural name order."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: CRCHistoPhenotypes folder not found")
    detection_dir = _subfolder(path, "detection")
    if detection_dir is not None:  # original release
        classification_dir = _subfolder(path, "classification")
        names = [e for e in os.listdir(detection_dir) if os.path.isdir(os.path.join(detection_dir, e))]
        if not names:
            raise DataError(f"{detection_dir}: no imgN/ folders")
        files = {}
        for name in sorted(names, key=natural_key):
            folder = os.path.join(detection_dir, name)
            image = _find_image(folder, name)
            if image is None:
                raise DataError(f"{folder}: no image '{name}.bmp'")
            class_folder = os.path.join(classification_dir, name) if classification_dir else None
            files[name] = (image, os.path.join(folder, f"{name}_detection.mat"), _class_files(class_folder, name))
        return files
    image_dir, annotation_dir = _subfolder(path, "images"), _subfolder(path, "annotations")
    if image_dir is None or annotation_dir is None:
        raise DataError(f"{path}: not a CRCHistoPhenotypes layout: expected Detection/imgN/ (+ Classification/imgN/)"
                        f" or images/ + annotations/imgN/")
    stems = {}
    for entry in os.listdir(image_dir):
        stem, ext = os.path.splitext(entry)
        if ext.lower() in IMAGE_EXTENSIONS:
            if stem in stems:
                raise DataError(f"{image_dir}: two images named '{stem}'")
            stems[stem] = os.path.join(image_dir, entry)
    if not stems:
        raise DataError(f"{image_dir}: no images")
    files = {}
    for name in sorted(stems, key=natural_key):
        folder = os.path.join(annotation_dir, name)
        files[name] = (stems[name], os.path.join(folder, f"{name}_detection.mat"), _class_files(folder, name))
    return files


def _class_files(folder, name):
    if folder is None or not os.path.isdir(folder):
        return None
    paths = {c: os.path.join(folder, f"{name}_{c}.mat") for c in CLASS_NAMES}
    present = [c for c, p in paths.items() if os.path.isfile(p)]
    if not present:
        return None
    if len(present) != len(CLASS_NAMES):
        missing = [paths[c] for c in CLASS_NAMES if c not in present]
        raise DataError(f"{missing[0]}: classification file missing (the other classes of {name} exist)")
    return paths


def read(path, channels="keep", require_classes=False, policy=None, skipped=None):
    """Read CRCHistoPhenotypes into NucleiImage records with points (no labels).

    ``require_classes``: raise DataError for an image without classification files.
    ``policy``: the :class:`~kerasnuc.data.validation.InputPolicy` for the images; with a
    ``skipped`` list, a bad image is noted there and left out instead.
    """
    records = []
    for name, files in find_files(path).items():
        record = read_or_skip(skipped, name, files[0],
                              lambda: _read_one(name, *files, channels, require_classes, policy))
        if record is not None:
            records.append(record)
    return records


def _read_one(name, image_path, detection_path, class_paths, channels, require_classes, policy):
    image = read_image(image_path, channels=channels, policy=policy)
    points = read_points_mat(detection_path) - 1.0
    extra = {"detection_path": detection_path}
    classes = None
    if class_paths is not None:
        chunks = [read_points_mat(class_paths[c]) - 1.0 for c in CLASS_NAMES]
        extra["class_points"] = np.concatenate(chunks, axis=0)
        classes = np.concatenate([np.full(len(c), i, dtype=np.int64) for i, c in enumerate(chunks)])
    elif require_classes:
        raise DataError(f"{image_path}: no classification files {name}_{{{','.join(CLASS_NAMES)}}}.mat")
    return NucleiImage(name=name, image=image, points=points, classes=classes,
                       class_names=CLASS_NAMES if classes is not None else (), source=image_path, extra=extra)
