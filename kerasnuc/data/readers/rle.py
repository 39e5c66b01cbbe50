"""Kaggle DSB 2018 run-length encoding (RLE) of nucleus masks, and its CSV files.

Encoding: space-separated ``start length`` pairs, starts 1-based, pixels numbered
column-major (top to bottom, then left to right), e.g. ``"1 3 10 2"``. A CSV has a
header with at least ``ImageId,EncodedPixels`` and one row per nucleus; Kaggle's
solution files add ``Height,Width`` (and ``Usage``). Rows of one image are merged into
one instance label image, ids 1..N in row order (a later row overwrites an earlier one
where they overlap). A row with an empty ``EncodedPixels`` marks an image without
nuclei.
"""

import csv
import os

import numpy as np

from kerasnuc.atomic import atomic_path
from kerasnuc.data.imageio import DataError

_IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


def rle_encode(mask):
    """Encode a 2-D boolean mask as a Kaggle RLE string ("" for an empty mask)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode: expected a 2-D mask, got shape {mask.shape}")
    flat = np.concatenate([[False], mask.astype(bool).ravel(order="F"), [False]])
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # 1-based positions of run edges
    starts, ends = changes[0::2], changes[1::2]
    return _format_runs(starts, ends - starts)


def _format_runs(starts, lengths):
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2], pairs[1::2] = starts, lengths
    return " ".join(map(str, pairs.tolist()))


def _parse_runs(rle, size, where="RLE"):
    """Return (starts 0-based, lengths) of an RLE string, checked against ``size`` pixels."""
    text = (rle or "").strip()
    if not text:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        numbers = np.array(text.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        raise DataError(f"{where}: run-length encoding must be integers, got '{text[:60]}'") from None
    if len(numbers) % 2:
        raise DataError(f"{where}: run-length encoding has an odd number of values ({len(numbers)})")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if (starts < 0).any():
        raise DataError(f"{where}: run-length encoding has a start below 1 (starts are 1-based)")
    if (lengths < 0).any():
        raise DataError(f"{where}: run-length encoding has a negative run length")
    if len(starts) and int((starts + lengths).max()) > size:
        raise DataError(f"{where}: run-length encoding runs past the end of the image ({size} pixels)")
    return starts, lengths


def _run_indices(starts, lengths):
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def rle_decode(rle, shape):
    """Decode a Kaggle RLE string into a boolean mask of ``shape`` (H, W)."""
    height, width = (int(s) for s in shape)
    flat = np.zeros(height * width, dtype=bool)
    flat[_run_indices(*_parse_runs(rle, height * width))] = True
    return flat.reshape((width, height)).T


def encode_labels(labels):
    """RLE strings of every instance of a label image: ``{id: rle}`` in increasing id order."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"encode_labels: expected a 2-D label image, got shape {labels.shape}")
    flat = labels.ravel(order="F")
    # Runs of equal values, then group the non-background runs by id.
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], edges])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    keep = values != 0
    starts, lengths, values = starts[keep], lengths[keep], values[keep]
    order = np.argsort(values, kind="stable")
    starts, lengths, values = starts[order], lengths[order], values[order]
    ids, first = np.unique(values, return_index=True)
    bounds = np.append(first, len(values))
    return {int(i): _format_runs(starts[a:b] + 1, lengths[a:b]) for i, a, b in zip(ids, bounds[:-1], bounds[1:])}


def _find_image(image_dir, image_id):
    """Path of ``<image_dir>/<id>.*`` or Kaggle's ``<image_dir>/<id>/images/<id>.*``, or None."""
    for folder in (image_dir, os.path.join(image_dir, image_id, "images")):
        for ext in _IMAGE_EXTENSIONS:
            candidate = os.path.join(folder, image_id + ext)
            if os.path.isfile(candidate):
                return candidate
    return None


def _image_shape(path, policy=None):
    from kerasnuc.data.imageio import image_shape

    return image_shape(path, policy)


def read_rle_csv(path, image_dir=None, policy=None):
    """Read a Kaggle RLE CSV into ``{image id: (H, W) int32 labels}`` (ids sorted).

    Shapes come from ``Height``/``Width`` columns or, without them, from the image
    ``<image_dir>/<id>.png`` (or Kaggle's ``<image_dir>/<id>/images/<id>.png``).
    Raises DataError naming the file and line for malformed rows, and for sizes above the
    policy's pixel limit (:class:`~kerasnuc.data.validation.InputPolicy`).
    """
    from kerasnuc.data.validation import resolve_policy

    policy = resolve_policy(policy)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: RLE CSV file not found")
    rows = {}
    shapes = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file (expected a header ImageId,EncodedPixels[,Height,Width])")
            columns = {name.strip().lower(): i for i, name in enumerate(header)}
            if "imageid" not in columns or "encodedpixels" not in columns:
                raise DataError(f"{path}: header {header} lacks ImageId and EncodedPixels columns")
            c_id, c_rle = columns["imageid"], columns["encodedpixels"]
            c_h, c_w = columns.get("height"), columns.get("width")
            for row in reader:
                line = reader.line_num
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) < len(header):
                    raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
                image_id = row[c_id].strip()
                if not image_id:
                    raise DataError(f"{path}, line {line}: empty ImageId")
                if c_h is not None and c_w is not None:
                    try:
                        shape = (int(row[c_h]), int(row[c_w]))
                    except ValueError:
                        raise DataError(f"{path}, line {line}: Height/Width '{row[c_h]}'/'{row[c_w]}' "
                                        f"are not integers") from None
                    if min(shape) < 1:
                        raise DataError(f"{path}, line {line}: invalid image size {shape}")
                    policy.check_pixels(f"{path}, line {line}", shape)
                    if shapes.setdefault(image_id, shape) != shape:
                        raise DataError(f"{path}, line {line}: image {image_id} has size {shape} here but "
                                        f"{shapes[image_id]} on an earlier line")
                rows.setdefault(image_id, []).append((line, row[c_rle]))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a text CSV file ({error})") from None
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV ({error})") from None
    result = {}
    for image_id in sorted(rows):
        shape = shapes.get(image_id)
        if shape is None:
            image_path = _find_image(image_dir, image_id) if image_dir else None
            if image_path is None:
                raise DataError(f"{path}: no Height/Width columns and no image for '{image_id}' "
                                f"(pass image_dir, searched {image_dir!r})")
            shape = _image_shape(image_path, policy)
        height, width = shape
        flat = np.zeros(height * width, dtype=np.int32)
        next_id = 1
        for line, rle in rows[image_id]:
            starts, lengths = _parse_runs(rle, height * width, where=f"{path}, line {line}")
            if len(starts) == 0:
                continue  # an image without nuclei
            flat[_run_indices(starts, lengths)] = next_id
            next_id += 1
        result[image_id] = flat.reshape((width, height)).T.copy()
    return result


def write_rle_csv(path, labels_by_id):
    """Write ``{image id: labels}`` as a Kaggle RLE CSV (``ImageId,EncodedPixels,Height,Width``).

    One row per instance in increasing id order, images in sorted id order; an image
    without instances gets one row with empty ``EncodedPixels`` so that its size is kept.
    The file is written to a temporary file and moved into place (atomic).
    """
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["ImageId", "EncodedPixels", "Height", "Width"])
            for image_id in sorted(labels_by_id):
                labels = np.asarray(labels_by_id[image_id])
                if labels.ndim != 2:
                    raise DataError(f"{path}: labels of '{image_id}' must be 2-D, got shape {labels.shape}")
                height, width = labels.shape
                encoded = encode_labels(labels)
                if not encoded:
                    writer.writerow([image_id, "", height, width])
                for rle in encoded.values():
                    writer.writerow([image_id, rle, height, width])
