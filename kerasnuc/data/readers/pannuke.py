"""PanNuke (Gamper et al. 2019/2020): 256x256 H&E patches with typed nucleus instances.

A fold is three NumPy arrays: ``images.npy`` (N, H, W, 3) float (0..255) or uint8,
``masks.npy`` (N, H, W, 6) with channels 0-4 the instance maps of
neoplastic, inflammatory, connective, dead and epithelial nuclei (channel 5 background),
and ``types.npy`` (N,) tissue names. ``path`` may be a folder holding the three files or
any folder above such folders, e.g. the release's ``Fold 1/images/fold1/{images,types}.npy``
+ ``Fold 1/masks/fold1/masks.npy`` (a ``masks.npy`` is looked for beside ``images.npy``
and in the same place with ``images`` replaced by ``masks``; ``types.npy`` beside either).

Arrays are memory-mapped (``np.load(mmap_mode="r")``). Each record gets:

* ``labels``: instance ids 1..N unique across the five class channels (renumbered class
  by class, in increasing original id within a class; a later channel overwrites an
  earlier one where two overlap);
* ``extra["instance_classes"]``: ``{id: class index}`` (see :data:`CLASS_NAMES`);
* ``points``: instance centroids (x, y) in increasing id order, ``classes`` their class;
* ``extra["tissue"]``: the tissue name from ``types.npy`` (None if unavailable).

Images with a float maximum <= 1 are taken to be scaled to [0, 1] and multiplied by 255.
``types.npy`` is a unicode array in the real release and is loaded with
``allow_pickle=False``; a pickled object array is only loaded with ``allow_pickle=True``
(a trusted file): otherwise a warning says so and tissue names are left out.
"""

import os
import warnings

import numpy as np

from kerasnuc.data.imageio import DataError, _to_uint8_hwc
from kerasnuc.data.types import NucleiImage

CLASS_NAMES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")


def find_folds(path):
    """``[(fold name, images.npy, masks.npy, types.npy or None)]`` under ``path``, sorted."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) != "images.npy":
            raise DataError(f"{path}: expected a PanNuke folder or its images.npy")
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise DataError(f"{path}: PanNuke folder not found")
    folds = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        if "images.npy" not in files:
            continue
        images = os.path.join(folder, "images.npy")
        candidates = [folder]
        parts = os.path.abspath(folder).split(os.sep)
        if "images" in parts:  # the release's Fold 1/images/fold1 -> Fold 1/masks/fold1
            last = len(parts) - 1 - parts[::-1].index("images")
            candidates.append(os.sep.join(parts[:last] + ["masks"] + parts[last + 1:]))
        masks = next((os.path.join(c, "masks.npy") for c in candidates
                      if os.path.isfile(os.path.join(c, "masks.npy"))), None)
        if masks is None:
            raise DataError(f"{images}: no masks.npy beside it" +
                            (f" or in {candidates[1]}" if len(candidates) > 1 else ""))
        types = next((os.path.join(c, "types.npy") for c in candidates
                      if os.path.isfile(os.path.join(c, "types.npy"))), None)
        name = os.path.basename(os.path.abspath(folder))
        folds.append((name, images, masks, types))
    if not folds:
        raise DataError(f"{path}: no PanNuke images.npy found (expected images.npy, masks.npy, types.npy)")
    names = [f[0] for f in folds]
    if len(set(names)) != len(names):  # make names unique with the relative folder
        folds = [(os.path.relpath(os.path.dirname(f[1]), path).replace(os.sep, "_"),) + f[1:] for f in folds]
    return folds


def _load(path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise DataError(f"{path}: not a plain numeric .npy array ({error})") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read .npy file ({error})") from None


def load_types(path, allow_pickle=False):
    """Tissue names of ``types.npy`` as a list of str, or None (with a warning) if pickled and not allowed."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise DataError(f"{path}: cannot read .npy file ({error})") from None
        if not allow_pickle:
            warnings.warn(f"{path}: holds a pickled object array, which is not loaded by default because "
                          f"unpickling can run code; tissue names are left out. If you trust the file, "
                          f"read with allow_pickle=True (or re-save it as a unicode array).", stacklevel=3)
            return None
        try:
            array = np.load(path, allow_pickle=True)
        except Exception as error:
            raise DataError(f"{path}: cannot read pickled .npy file ({error})") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read .npy file ({error})") from None
    return [str(t) for t in np.asarray(array).reshape(-1)]


def to_uint8_image(array):
    """One PanNuke image (H, W, 3) float or integer -> uint8."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    data = array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating) and data.size and data.max() <= 1.0:
        data = data * 255.0
    return np.clip(np.round(data), 0, 255).astype(np.uint8)


def instances_from_mask(mask):
    """Labels (H, W) int32 and ``{id: class}`` from one (H, W, >=5) PanNuke mask."""
    mask = np.asarray(mask)
    labels = np.zeros(mask.shape[:2], dtype=np.int32)
    classes = {}
    next_id = 1
    for channel in range(len(CLASS_NAMES)):
        plane = mask[..., channel]
        if not np.issubdtype(plane.dtype, np.integer):
            plane = np.round(plane).astype(np.int64)
        values, inverse = np.unique(plane, return_inverse=True)
        inverse = inverse.reshape(plane.shape)
        has_zero = values.size and values[0] == 0
        count = len(values) - (1 if has_zero else 0)
        if count == 0:
            continue
        # rank r (1-based among the non-zero values) -> next_id + r - 1
        ranks = inverse + (0 if has_zero else 1)
        inside = plane != 0
        labels[inside] = ranks[inside] + (next_id - 1)
        for new_id in range(next_id, next_id + count):
            classes[new_id] = channel
        next_id += count
    present = set(np.unique(labels).tolist())
    classes = {i: c for i, c in classes.items() if i in present}
    return labels, classes


def _centroids(labels, ids):
    if not ids:
        return np.zeros((0, 2), dtype=np.float64)
    flat = labels.ravel()
    size = int(labels.max()) + 1
    rows, cols = np.indices(labels.shape)
    area = np.bincount(flat, minlength=size)
    x = np.bincount(flat, weights=cols.ravel(), minlength=size)
    y = np.bincount(flat, weights=rows.ravel(), minlength=size)
    ids = np.asarray(ids)
    return np.stack([x[ids] / area[ids], y[ids] / area[ids]], axis=1)


def iter_read(path, channels="keep", allow_pickle=False, indices=None):
    """Yield NucleiImage records fold by fold (sorted folders), image by image."""
    for fold, images_path, masks_path, types_path in find_folds(path):
        images = _load(images_path)
        masks = _load(masks_path)
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DataError(f"{images_path}: expected an (N, H, W, 3) array, got shape {images.shape}")
        if masks.ndim != 4 or masks.shape[3] < len(CLASS_NAMES):
            raise DataError(f"{masks_path}: expected an (N, H, W, 6) array, got shape {masks.shape}")
        if masks.shape[:3] != images.shape[:3]:
            raise DataError(f"{masks_path}: shape {masks.shape} does not match {images_path} {images.shape}")
        if not np.issubdtype(images.dtype, np.number) or not np.issubdtype(masks.dtype, np.number):
            raise DataError(f"{images_path}: images and masks must be numeric arrays")
        types = load_types(types_path, allow_pickle) if types_path else None
        if types is not None and len(types) != images.shape[0]:
            raise DataError(f"{types_path}: {len(types)} tissue names for {images.shape[0]} images in {images_path}")
        wanted = range(images.shape[0]) if indices is None else indices
        width = max(4, len(str(images.shape[0] - 1)))
        for index in wanted:
            index = int(index)
            if not 0 <= index < images.shape[0]:
                raise DataError(f"{images_path}: index {index} out of range (N={images.shape[0]})")
            labels, instance_classes = instances_from_mask(masks[index])
            ids = sorted(instance_classes)
            image = _to_uint8_hwc(to_uint8_image(images[index]), images_path, channels)
            yield NucleiImage(
                name=f"{fold}_{index:0{width}d}", image=image, labels=labels,
                points=_centroids(labels, ids),
                classes=np.array([instance_classes[i] for i in ids], dtype=np.int64),
                class_names=CLASS_NAMES, source=f"{images_path}[{index}]",
                extra={"instance_classes": instance_classes, "tissue": None if types is None else types[index],
                       "fold": fold, "index": index})


def read(path, channels="keep", allow_pickle=False, indices=None, policy=None, skipped=None):
    """Read every PanNuke fold under ``path`` (or only ``indices`` of each fold) as a list.

    ``channels``: "keep", 1 or 3 as in :func:`~kerasnuc.data.imageio.read_image`.
    ``policy``/``skipped`` are accepted like every reader's but do not apply: PanNuke's
    arrays are 8-bit 256 x 256 patches in one file, not image files one by one.
    """
    return list(iter_read(path, channels=channels, allow_pickle=allow_pickle, indices=indices))
