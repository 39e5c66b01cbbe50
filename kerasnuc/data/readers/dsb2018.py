"""Kaggle Data Science Bowl 2018 (BBBC038) in its native layouts, detected automatically.

``read(path)`` accepts:

(a) Kaggle's folder layout: ``path/<id>/images/<id>.png`` and ``path/<id>/masks/*.png``
    (one binary mask per nucleus). Masks are merged in sorted file order into ids 1..N;
    a later mask overwrites an earlier one where they overlap.
(b) ``path/images/`` + ``path/labels/`` (the layout of ``../shared/data/dsb2018/*``), read
    by :mod:`~kerasnuc.data.readers.labelled_folder`. Labels whose image is not in
    ``images/`` are looked up in ``image_dirs``; by default a folder ``X_original`` (such
    as ``stage1_train_original``) also searches ``../X/images`` (``../stage1_train/images``).
(c) A Kaggle run-length-encoded CSV file (``ImageId,EncodedPixels[,Height,Width,...]``, see
    :mod:`~kerasnuc.data.readers.rle`); the images are taken from ``images/<id>.png`` or
    Kaggle's ``<id>/images/<id>.png`` beside the CSV (or under ``image_dir``). A folder can
    be read with the labels of a CSV in place of its own with ``labels_csv=PATH``.

Records come in sorted id order; ``name`` is the image id.
"""

MPP = None
"""Pixel size of the dataset in µm: mixed microscopes and magnifications; unknown per image."""

import os

import numpy as np

from kerasnuc.data.imageio import DataError, read_image, read_mask
from kerasnuc.data.readers import labelled_folder, rle
from kerasnuc.data.types import NucleiImage
from kerasnuc.data.validation import read_or_skip

IMAGE_EXTENSIONS = labelled_folder.IMAGE_EXTENSIONS


def read(path, channels="keep", require_labels=True, image_dirs=None, labels_csv=None, image_dir=None,
         policy=None, skipped=None):
    """Read a DSB 2018 dataset from a folder (layouts a, b) or an RLE CSV (layout c).

    Args:
        path: folder or ``.csv`` file.
        channels: "keep", 1 or 3 (see :func:`~kerasnuc.data.imageio.read_image`).
        require_labels: raise if an image has no masks/label (Kaggle test folders have
            none: pass False to read them with ``labels=None``).
        image_dirs: extra folders searched for images missing from ``path/images`` (layout b).
        labels_csv: take the labels from this RLE CSV instead of the folder's own.
        image_dir: where the images of an RLE CSV are (default: beside the CSV).
        policy: the :class:`~kerasnuc.data.validation.InputPolicy` for every file read.
        skipped: a list: bad images are noted there (name, file, reason) and left out.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.lower().endswith(".csv"):
            raise DataError(f"{path}: not a DSB 2018 dataset (expected a folder or a run-length-encoded .csv)")
        return _read_csv(path, image_dir or os.path.dirname(os.path.abspath(path)), channels, policy, skipped)
    if not os.path.isdir(path):
        raise DataError(f"{path}: DSB 2018 folder not found")
    if labels_csv is not None:
        return _read_csv(os.fspath(labels_csv), image_dir or path, channels, policy, skipped)
    if os.path.isdir(os.path.join(path, "images")):
        return _read_labelled(path, channels, require_labels, image_dirs, policy, skipped)
    ids = _kaggle_ids(path)
    if ids:
        records = [read_or_skip(skipped, image_id, os.path.join(path, image_id),
                                lambda image_id=image_id: _read_kaggle_one(path, image_id, channels,
                                                                           require_labels, policy))
                   for image_id in ids]
        return [record for record in records if record is not None]
    raise DataError(f"{path}: not a DSB 2018 layout: expected images/ + labels/, Kaggle's <id>/images/<id>.png "
                    f"+ <id>/masks/*.png folders, or an RLE .csv file")


def detect_layout(path):
    """Name of the layout of ``path``: "csv", "labelled", "kaggle" or None."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return "csv" if path.lower().endswith(".csv") else None
    if os.path.isdir(os.path.join(path, "images")):
        return "labelled"
    return "kaggle" if os.path.isdir(path) and _kaggle_ids(path) else None


# -- (a) Kaggle folders ---------------------------------------------------------------------------

def _kaggle_ids(path):
    return [entry for entry in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, entry, "images"))]


def _find_file(folder, stem):
    for ext in IMAGE_EXTENSIONS:
        candidate = os.path.join(folder, stem + ext)
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_kaggle_one(path, image_id, channels, require_labels, policy=None):
    image_folder = os.path.join(path, image_id, "images")
    image_path = _find_file(image_folder, image_id)
    if image_path is None:
        found = sorted(os.listdir(image_folder))
        if len(found) != 1:
            raise DataError(f"{image_folder}: expected the image '{image_id}.png' here, found {found[:5]}")
        image_path = os.path.join(image_folder, found[0])
    image = read_image(image_path, channels=channels, policy=policy)
    mask_folder = os.path.join(path, image_id, "masks")
    labels = None
    if os.path.isdir(mask_folder):
        labels = merge_masks(mask_folder, image.shape[:2], policy)
    elif require_labels:
        raise DataError(f"{mask_folder}: no masks folder for image {image_path} "
                        f"(pass require_labels=False for unlabelled test images)")
    return NucleiImage(name=image_id, image=image, labels=labels, source=image_path)


def merge_masks(mask_folder, shape=None, policy=None):
    """Merge the binary masks of ``mask_folder`` (sorted file order) into labels 1..N.

    Any non-zero pixel belongs to the mask; later masks overwrite earlier ones. Each mask
    is read strictly (:func:`~kerasnuc.data.imageio.read_mask`).
    """
    files = [entry for entry in sorted(os.listdir(mask_folder))
             if os.path.splitext(entry)[1].lower() in IMAGE_EXTENSIONS]
    labels = None if shape is None else np.zeros(shape, dtype=np.int32)
    for index, entry in enumerate(files, start=1):
        mask_path = os.path.join(mask_folder, entry)
        mask = read_mask(mask_path, policy)
        if labels is None:
            labels = np.zeros(mask.shape, dtype=np.int32)
        if mask.shape != labels.shape:
            raise DataError(f"{mask_path}: mask size {mask.shape} differs from image size {labels.shape}")
        labels[mask] = index
    if labels is None:
        raise DataError(f"{mask_folder}: no mask images")
    return labels


# -- (b) images/ + labels/ ------------------------------------------------------------------------

def _default_image_dirs(path):
    base = os.path.basename(os.path.normpath(os.path.abspath(path)))
    if base.endswith("_original"):
        sibling = os.path.join(os.path.dirname(os.path.abspath(path)), base[: -len("_original")], "images")
        if os.path.isdir(sibling):
            return [sibling]
    return []


def _read_labelled(path, channels, require_labels, image_dirs, policy=None, skipped=None):
    label_folder = next((d for d in ("labels", "masks") if os.path.isdir(os.path.join(path, d))), None)
    image_dir = os.path.join(path, "images")
    images = labelled_folder._index(image_dir)
    labels = labelled_folder._index(os.path.join(path, label_folder)) if label_folder else {}
    missing = sorted(set(labels) - set(images))
    if not missing:
        return labelled_folder.read(path, channels=channels, require_labels=require_labels, policy=policy,
                                    skipped=skipped)
    # Labels whose image lives elsewhere (stage1_train_original keeps most images in ../stage1_train).
    dirs = [os.fspath(d) for d in image_dirs] if image_dirs is not None else _default_image_dirs(path)
    for stem in missing:
        found = next((p for p in (_find_file(d, stem) for d in dirs) if p), None)
        if found is None:
            searched = ", ".join([image_dir] + dirs)
            raise DataError(f"{labels[stem]}: no image '{stem}.*' in {searched}")
        images[stem] = found
    label_dir = os.path.join(path, label_folder)
    records = [read_or_skip(skipped, stem, images[stem], lambda stem=stem: labelled_folder.read_pair(
        stem, images[stem], labels.get(stem), channels, policy, require_labels, label_dir)) for stem in sorted(images)]
    return [record for record in records if record is not None]


# -- (c) RLE CSV ----------------------------------------------------------------------------------

def _read_csv(csv_path, image_dir, channels, policy=None, skipped=None):
    folders = [os.path.join(image_dir, "images"), image_dir]
    decoded = rle.read_rle_csv(csv_path, image_dir=_first_with_images(folders), policy=policy)
    records = []
    for image_id, labels in decoded.items():
        image_path = next((p for p in (rle._find_image(f, image_id) for f in folders) if p), None)
        if image_path is None:
            raise DataError(f"{csv_path}: no image for '{image_id}' in {' or '.join(folders)} "
                            f"(as <id>.png or <id>/images/<id>.png)")
        record = read_or_skip(skipped, image_id, image_path,
                              lambda: _csv_record(csv_path, image_id, image_path, labels, channels, policy))
        if record is not None:
            records.append(record)
    return records


def _csv_record(csv_path, image_id, image_path, labels, channels, policy):
    image = read_image(image_path, channels=channels, policy=policy)
    if image.shape[:2] != labels.shape:
        raise DataError(f"{csv_path}: size {labels.shape} of '{image_id}' differs from its image "
                        f"{image_path} {image.shape[:2]}")
    return NucleiImage(name=image_id, image=image, labels=labels, source=image_path)


def _first_with_images(folders):
    return next((f for f in folders if os.path.isdir(f)), folders[-1])
