"""Images plus instance label images with matching names.

Covers the layout of ``../shared/data/dsb2018/*`` and the shipped sample
(``images/<id>.png`` + ``labels/<id>.png``) and users' own data: any folder with
``images/`` and ``labels/`` (or ``masks/``) subfolders whose files share stems.
"""

import os

from kerasnuc.data.imageio import DataError, read_image, read_label_image
from kerasnuc.data.types import NucleiImage
from kerasnuc.data.validation import read_or_skip

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


def _index(folder):
    files = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(entry)
        if ext.lower() in IMAGE_EXTENSIONS:
            if stem in files:
                raise DataError(f"{folder}: two files share the name '{stem}'")
            files[stem] = os.path.join(folder, entry)
    return files


def read(path, channels="keep", require_labels=True, image_folder="images", label_folder=None, policy=None,
         skipped=None):
    """Read every image under ``path/images`` with its label under ``path/labels``.

    Raises DataError naming the folder or file if the layout is wrong or a label is
    missing, unreadable or has another size than its image. ``policy``: the
    :class:`~kerasnuc.data.validation.InputPolicy` for every file; with a ``skipped`` list,
    a bad image or label is noted there and left out instead.
    """
    path = os.fspath(path)
    image_dir = os.path.join(path, image_folder)
    if not os.path.isdir(image_dir):
        raise DataError(f"{path}: no '{image_folder}/' folder (expected {image_folder}/ and labels/)")
    if label_folder is None:
        label_folder = next((d for d in ("labels", "masks") if os.path.isdir(os.path.join(path, d))), "labels")
    label_dir = os.path.join(path, label_folder)
    images = _index(image_dir)
    if not images:
        raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels = _index(label_dir) if os.path.isdir(label_dir) else {}
    if require_labels and not labels:
        raise DataError(f"{path}: no label images under '{label_folder}/'")
    records = []
    for stem, image_path in images.items():
        record = read_or_skip(skipped, stem, image_path, lambda: read_pair(
            stem, image_path, labels.get(stem), channels, policy, require_labels, label_dir))
        if record is not None:
            records.append(record)
    return records


def read_pair(stem, image_path, label_path, channels="keep", policy=None, require_labels=True, label_dir=""):
    """One NucleiImage from an image and its label file (or none); DataError naming the file that is wrong."""
    label = None
    if label_path is not None:
        label = read_label_image(label_path, policy=policy)
    elif require_labels:
        raise DataError(f"{image_path}: no label image '{stem}.*' in {label_dir}")
    image = read_image(image_path, channels=channels, policy=policy)
    if label is not None and label.shape != image.shape[:2]:
        raise DataError(f"{label_path}: label size {label.shape} differs from image size {image.shape[:2]}"
                        f" of {image_path}")
    return NucleiImage(name=stem, image=image, labels=label, source=image_path)
