"""Padding, tiling, stitching and patch cutting: the one copy, used by the prediction engine.

NumPy only (no TensorFlow, no OpenCV), so it runs wherever LiteRT runs.

Why tiles reproduce the whole image exactly: the image is first padded to the model's
multiple (``pad_to_multiple``), tiles start at multiples
of it (so every tile sees the same max-pooling grid as the whole image), every tile is
normalised with the *whole* image's min and max (training normalised whole images), and
each tile keeps only its centre: neighbouring tiles overlap by at least ``2 * margin`` and
split the overlap in the middle. With ``margin`` at least the network's reach (the
``receptive_radius`` in the export metadata) the stitched map equals the whole-image
prediction up to float32 noise.
"""

from dataclasses import dataclass, field

import numpy as np

from kerasnuc.intensity import convert_channels, intensity_range, normalize_image, normalize_with_range  # noqa: F401

__all__ = ["TilePlan", "pad_to_multiple", "reflect_indices", "patches_at"]


def pad_to_multiple(image, multiple):
    """Pad (H, W, C) at the bottom/right to multiples: reflect where the image is larger than
    the padding, else edge."""
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not (pad_h or pad_w):
        return image
    mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "edge"
    widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, widths, mode=mode)


def reflect_indices(indices, size):
    """Indices mirrored into [0, size) without repeating the edge (np.pad "reflect")."""
    indices = np.asarray(indices, dtype=np.int64)
    if size == 1:
        return np.zeros_like(indices)
    period = 2 * (size - 1)
    indices = np.mod(indices, period)
    return np.where(indices >= size, period - indices, indices)


def _starts_and_cuts(length, tile, margin):
    """Tile starts along one axis and the [lo, hi) part of the axis each tile keeps."""
    if length <= tile:
        return [0], [(0, length)]
    step = tile - 2 * margin
    starts = list(range(0, length - tile, step)) + [length - tile]
    starts = sorted(set(starts))
    cuts = []
    for i, start in enumerate(starts):
        lo = 0 if i == 0 else (starts[i - 1] + tile + start) // 2
        hi = length if i == len(starts) - 1 else (start + tile + starts[i + 1]) // 2
        cuts.append((lo, hi))
    return starts, cuts


@dataclass
class TilePlan:
    """Where the tiles of one (height, width) image go.

    ``tile`` (a side, or a (height, width) pair) and ``margin`` are rounded up to multiples
    of ``multiple``; each tile side must exceed ``2 * margin``. Every tile has the same
    shape ``tile_shape`` (smaller than ``tile`` only where the padded image is), so tiles
    can be batched.
    """

    height: int
    width: int
    tile: object = 256
    margin: int = 32
    multiple: int = 16
    tiles: list = field(init=False)
    tile_shape: tuple = field(init=False)
    padded_shape: tuple = field(init=False)

    def __post_init__(self):
        m = max(int(self.multiple), 1)
        sides = (self.tile, self.tile) if np.ndim(self.tile) == 0 else tuple(self.tile)
        if len(sides) != 2:
            raise ValueError(f"tile must be a side or a (height, width) pair, got {self.tile}")
        sides = tuple(int(-(-int(side) // m) * m) for side in sides)
        self.tile = sides[0] if np.ndim(self.tile) == 0 else sides
        self.margin = int(-(-int(self.margin) // m) * m)
        if min(sides) <= 2 * self.margin:
            raise ValueError(f"tile {self.tile} must be larger than twice the margin {self.margin}")
        self.padded_shape = (int(-(-self.height // m) * m), int(-(-self.width // m) * m))
        rows, row_cuts = _starts_and_cuts(self.padded_shape[0], sides[0], self.margin)
        cols, col_cuts = _starts_and_cuts(self.padded_shape[1], sides[1], self.margin)
        self.tile_shape = (min(sides[0], self.padded_shape[0]), min(sides[1], self.padded_shape[1]))
        self.tiles = [(top, left, rcut, ccut) for top, rcut in zip(rows, row_cuts)
                      for left, ccut in zip(cols, col_cuts)]

    def __len__(self):
        return len(self.tiles)

    def pad(self, image):
        """The image padded to the plan's padded shape."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"image is {image.shape[:2]}, plan is for {(self.height, self.width)}")
        return pad_to_multiple(image, self.multiple)

    def extract(self, padded, indices):
        """(N, tile_h, tile_w, C) stack of tiles ``indices`` cut from the padded image."""
        th, tw = self.tile_shape
        return np.stack([padded[top:top + th, left:left + tw] for top, left, _, _ in
                         (self.tiles[i] for i in indices)])

    def batches(self, batch_size):
        """Tile indices in groups of at most ``batch_size``."""
        indices = list(range(len(self.tiles)))
        return [indices[i:i + batch_size] for i in range(0, len(indices), max(1, batch_size))]

    def stitch(self, outputs):
        """(H, W, K) map from one (tile_h, tile_w, K) output per tile, in plan order."""
        if len(outputs) != len(self.tiles):
            raise ValueError(f"{len(outputs)} tile outputs for {len(self.tiles)} tiles")
        first = np.asarray(outputs[0])
        result = np.zeros(self.padded_shape + first.shape[2:], dtype=first.dtype)
        for (top, left, (r0, r1), (c0, c1)), out in zip(self.tiles, outputs):
            result[r0:r1, c0:c1] = np.asarray(out)[r0 - top:r1 - top, c0 - left:c1 - left]
        return result[:self.height, :self.width]


def patches_at(image, points, size):
    """(K, size, size, C) patches of an (H, W[, C]) image centred on (x, y) points, the image's dtype.

    The one patch cutter (training's evaluation, the engine's classification): each patch
    is centred on the point's nearest pixel (x = c - 0.5 goes to column c; with an even
    ``size`` the centre is at index ``size // 2``), points just outside are clamped to the
    border pixel, and beyond the border the image is mirror-reflected (``np.pad(mode="reflect")``),
    as ``kerasnuc.data.pipeline.ClassificationDataset.patch_at`` does in training.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    height, width = image.shape[:2]
    rows = np.clip(np.floor(points[:, 1] + 0.5).astype(np.int64), 0, height - 1)
    cols = np.clip(np.floor(points[:, 0] + 0.5).astype(np.int64), 0, width - 1)
    offsets = np.arange(size) - size // 2
    row_index = reflect_indices(rows[:, None] + offsets[None, :], height)  # (K, size)
    col_index = reflect_indices(cols[:, None] + offsets[None, :], width)
    return image[row_index[:, :, None], col_index[:, None, :]]


def fitting_margin(tile_shape, margin, multiple):
    """``margin`` rounded up to ``multiple`` (as TilePlan does), lowered to the largest multiple
    that leaves every side of a ``tile_shape`` tile a positive step (``side > 2 * margin``)."""
    m = max(int(multiple), 1)
    margin = -(-max(int(margin), 0) // m) * m
    limit = ((min(tile_shape) - 1) // 2) // m * m
    return int(max(0, min(margin, limit)))


def pad_to_tile(image, multiple, tile_shape):
    """(H, W, C) padded at the bottom/right to multiples of ``multiple`` (the whole-image rule)
    and then, by mirroring, up to at least ``tile_shape``."""
    padded = pad_to_multiple(image, multiple)
    extra = (max(0, tile_shape[0] - padded.shape[0]), max(0, tile_shape[1] - padded.shape[1]))
    if not any(extra):
        return padded
    mode = "reflect" if min(padded.shape[:2]) > 1 else "edge"
    return np.pad(padded, ((0, extra[0]), (0, extra[1])) + ((0, 0),) * (padded.ndim - 2), mode=mode)


# Test-time augmentation: the 8 dihedral views (kerasnuc.postprocess.tta re-exports these).
# k -> (quarter turns counter-clockwise, then mirror left-right); k = 0 is the identity.
DIHEDRAL = tuple((k % 4, k >= 4) for k in range(8))


def _check_k(k):
    if not 0 <= int(k) < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    return DIHEDRAL[int(k)]


def dihedral_transform(image, k):
    """View ``k`` (0..7) of an (H, W, ...) array: rot90 k % 4 times, then mirror if k >= 4.

    Spatial axes are 0 and 1; odd rotations give (W, H, ...). Returns a view.
    """
    turns, mirror = _check_k(k)
    out = np.rot90(image, turns, axes=(0, 1))
    return out[:, ::-1] if mirror else out


def inverse_dihedral(image, k):
    """Undo :func:`dihedral_transform` view ``k`` on an (H', W', ...) array."""
    turns, mirror = _check_k(k)
    out = image[:, ::-1] if mirror else image
    return np.rot90(out, -turns, axes=(0, 1))


def transform_indices(transforms):
    """Dihedral view indices of ``transforms``: a count 1..8 (the first n) or a list of indices."""
    if isinstance(transforms, (int, np.integer)):
        if not 1 <= transforms <= 8:
            raise ValueError(f"transforms must be 1..8 or a list of dihedral indices, got {transforms}")
        return list(range(int(transforms)))
    indices = [int(k) for k in transforms]
    if not indices:
        raise ValueError("transforms is empty")
    for k in indices:
        _check_k(k)
    return indices
