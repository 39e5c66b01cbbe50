"""Augmentation that keeps images, masks, density maps and points aligned (NumPy/OpenCV only).

One random geometric transform is drawn per call and applied to the image, every mask
and the points alike; then intensity and stain jitter touch the image only. Nothing here
imports a deep-learning framework, so it runs under every Keras backend and in worker
processes.

Conventions: images are (H, W, C) float in [0, 1] (uint8 also works); masks are (H, W)
or (H, W, K); integer/bool masks (instance labels) are resampled with nearest neighbour
and stay integer labels, float masks (probability, distance, density maps) bilinearly.
Points are (N, 2) (x, y) with pixel centres at integers; a point that leaves the output
is dropped together with its class.
"""

import math

import cv2
import numpy as np

from kerasnuc.data.targets import reflect_indices

__all__ = ["Augmenter"]


class Augmenter:
    """Random geometric, intensity and stain augmentation, reproducible from a NumPy Generator.

    Options (the positional ones and their defaults are the original behaviour; every
    keyword-only one is off by default):

    * ``flip``: mirror left-right with probability 1/2; with ``rotate90`` this gives all
      8 dihedral transforms, exact (no interpolation).
    * ``rotate90``: rotate by k * 90 degrees, k uniform in 0..3.
    * ``brightness`` / ``contrast``: ``(x - 0.5) * U(1 - c, 1 + c) + 0.5 + U(-b, b)``, clipped to [0, 1].
    * ``rotate``: free rotation by U(-rotate, rotate) degrees (bilinear for the image).
    * ``elastic``: elastic deformation, maximum displacement in pixels per axis; the
      displacement field is bicubic-smooth noise on a grid of ``elastic_spacing`` pixels.
    * ``crop``: (h, w) output size, placed at random. With ``rotate``/``elastic`` the window
      is placed where it needs no pixels from beyond the input if the input is large
      enough (see :meth:`context_size`); otherwise the image is mirror-reflected.
    * ``hed``: HED stain jitter for RGB images (Tellez et al. 2018): each of scikit-image's
      H, E, D concentrations becomes ``c * U(1 - hed, 1 + hed) + U(-hed_bias, hed_bias)``
      (``hed_bias`` None: same as ``hed``). Grey images are left alone.
    * ``point_margin``: keep points up to this many pixels outside the output (so a
      density map can include the tails of nuclei just beyond a crop).

    Call: ``image, masks = augmenter(rng, image, [mask, ...])`` or, with points,
    ``image, masks, points, classes = augmenter(rng, image, masks, points, classes)``.
    Keyword-only at call time: ``crop=(h, w)`` and ``point_margin`` override the options,
    ``crop_center=True`` puts the crop window at the input's centre (patch classification).
    """

    def __init__(self, flip=True, rotate90=True, brightness=0.1, contrast=0.1, *, rotate=0.0,
                 elastic=0.0, elastic_spacing=32, crop=None, hed=0.0, hed_bias=None, point_margin=0.0):
        self.flip, self.rotate90 = flip, rotate90
        self.brightness, self.contrast = brightness, contrast
        self.rotate = float(rotate or 0.0)
        self.elastic, self.elastic_spacing = float(elastic or 0.0), max(int(elastic_spacing), 2)
        self.crop = tuple(int(v) for v in crop) if crop is not None else None
        self.hed = float(hed or 0.0)
        self.hed_bias = self.hed if hed_bias is None else float(hed_bias)
        self.point_margin = float(point_margin)

    # ------------------------------------------------------------------ sizes

    @property
    def needs_context(self):
        """True when the transform samples pixels outside the output window (rotation, elastic)."""
        return bool(self.rotate or self.elastic)

    def context_size(self, height, width=None):
        """(H, W) input window needed so an (height, width) output needs no reflected pixels."""
        width = height if width is None else width
        if not self.needs_context:
            return int(height), int(width)
        angles = np.radians(np.linspace(0.0, min(abs(self.rotate), 90.0), 91))
        cos, sin = np.abs(np.cos(angles)), np.abs(np.sin(angles))
        margin = self._elastic_margin()
        return (int(math.ceil(np.max(height * cos + width * sin) + margin)) + 1,
                int(math.ceil(np.max(width * cos + height * sin) + margin)) + 1)

    def _elastic_margin(self):
        """Extra input pixels (both sides together) that the elastic displacement may reach."""
        return 2.0 * (math.ceil(self.elastic * math.sqrt(2.0)) + 1) if self.elastic else 0.0

    # ------------------------------------------------------------------ call

    def __call__(self, rng, image, masks=(), points=None, classes=None, *, crop=None, crop_center=False,
                 point_margin=None):
        masks = list(masks)
        margin = self.point_margin if point_margin is None else float(point_margin)
        with_points = points is not None
        if with_points:
            points = np.asarray(points, dtype=np.float64).reshape(-1, 2).copy()
            classes = None if classes is None else np.asarray(classes)
        image, masks, points = self._dihedral(rng, image, masks, points)
        crop = self.crop if crop is None else tuple(int(v) for v in crop)
        image, masks, points, classes = self._warp(rng, image, masks, points, classes, crop, crop_center, margin)
        image = self._intensity(rng, image)
        image, masks = np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks]
        if not with_points:
            return image, masks
        return image, masks, points, classes

    def augment_batch(self, rng, images, *, crop=None, crop_center=False):
        """(B, H, W, C) images without masks or points -> (B, h, w, C): what ``[self(rng, x,
        crop=crop, crop_center=crop_center)[0] for x in images]`` gives, with the same random
        draws in the same order, but the intensity and stain jitter computed once for the whole
        batch (the per-image calls are mostly Python overhead on 32x32 patches: issue 18).
        Equal up to float rounding of the batched matrix products (checked to 1e-6)."""
        images = np.asarray(images)
        if self.needs_context:  # resampling per image: nothing to share
            return np.stack([self(rng, x, crop=crop, crop_center=crop_center)[0] for x in images])
        crop = self.crop if crop is None else tuple(int(v) for v in crop)
        geometric, draws = [], []
        for x in images:
            x, _, _ = self._dihedral(rng, x, [], None)
            out_h, out_w = crop if crop is not None else x.shape[:2]
            if (out_h, out_w) != x.shape[:2]:
                x = self._crop(rng, x, [], None, None, out_h, out_w, crop_center, 0.0)[0]
            geometric.append(x)
            draws.append(self._intensity_draws(rng, x))
        batch = np.stack(geometric)
        if not draws or not draws[0]:
            return batch
        as_uint8 = batch.dtype == np.uint8
        x = batch.astype(np.float32) / 255.0 if as_uint8 else batch
        if "hed" in draws[0]:
            scale = np.stack([d["hed"][0] for d in draws])[:, None, None, :]
            shift = np.stack([d["hed"][1] for d in draws])[:, None, None, :]
            x = _hed_apply(x, scale, shift)
        if "linear" in draws[0]:
            scale = np.array([d["linear"][0] for d in draws], dtype=x.dtype)[:, None, None, None]
            shift = np.array([d["linear"][1] for d in draws], dtype=x.dtype)[:, None, None, None]
            x = np.clip((x - np.float32(0.5)) * scale + np.float32(0.5) + shift, 0.0, 1.0)
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8) if as_uint8 else x

    def _intensity_draws(self, rng, image):
        """The random numbers :meth:`_intensity` draws for ``image``, in its order."""
        draws = {}
        if not (self.hed or self.hed_bias or self.contrast or self.brightness):
            return draws
        if (self.hed or self.hed_bias) and image.ndim == 3 and image.shape[-1] == 3:
            draws["hed"] = (rng.uniform(1.0 - self.hed, 1.0 + self.hed, size=3),
                            rng.uniform(-self.hed_bias, self.hed_bias, size=3))
        if self.contrast or self.brightness:
            draws["linear"] = (1.0 + rng.uniform(-self.contrast, self.contrast),
                               rng.uniform(-self.brightness, self.brightness))
        return draws

    # ------------------------------------------------------------------ geometry

    def _dihedral(self, rng, image, masks, points):
        """Flip then rotate by k * 90 degrees (same random draws as the original Augmenter)."""
        if self.flip and rng.random() < 0.5:
            if points is not None:
                points[:, 0] = image.shape[1] - 1 - points[:, 0]
            image, masks = image[:, ::-1], [m[:, ::-1] for m in masks]
        if self.rotate90:
            k = int(rng.integers(4))
            if points is not None:
                width, height = image.shape[1], image.shape[0]
                for _ in range(k):  # np.rot90 sends (x, y) to (y, W - 1 - x) and swaps H, W
                    points = np.stack([points[:, 1], width - 1 - points[:, 0]], axis=1)
                    width, height = height, width
            image, masks = np.rot90(image, k), [np.rot90(m, k) for m in masks]
        return image, masks, points

    def _warp(self, rng, image, masks, points, classes, crop, crop_center, margin):
        """Free rotation, elastic deformation and cropping as one resampling."""
        height, width = image.shape[:2]
        out_h, out_w = crop if crop is not None else (height, width)
        if not self.needs_context:
            if (out_h, out_w) == (height, width):
                return image, masks, points, classes
            return self._crop(rng, image, masks, points, classes, out_h, out_w, crop_center, margin)
        angle = math.radians(rng.uniform(-self.rotate, self.rotate)) if self.rotate else 0.0
        cos, sin = math.cos(angle), math.sin(angle)
        centre = self._window_centre(rng, height, width, out_h, out_w, cos, sin, crop_center)
        # Output (u, v) = R (p - centre) + output centre; R rotates by ``angle``.
        rotation = np.array([[cos, sin], [-sin, cos]])
        out_centre = np.array([(out_w - 1) / 2.0, (out_h - 1) / 2.0])
        v, u = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
        displacement = self._displacement(rng, out_h, out_w) if self.elastic else None
        if displacement is not None:
            u, v = u + displacement[0], v + displacement[1]
        # Source of each output pixel: p = R^T (q - out_centre) + centre.
        qu, qv = u - out_centre[0], v - out_centre[1]
        map_x = (rotation[0, 0] * qu + rotation[1, 0] * qv + centre[0]).astype(np.float32)
        map_y = (rotation[0, 1] * qu + rotation[1, 1] * qv + centre[1]).astype(np.float32)
        image = _remap(image, map_x, map_y, nearest=False)
        masks = [_remap(m, map_x, map_y, nearest=_is_label(m)) for m in masks]
        if points is not None:
            moved = (points - centre) @ rotation.T + out_centre
            if displacement is not None:
                moved = _invert_displacement(moved, displacement)
            points, classes = _keep_inside(moved, classes, out_h, out_w, margin)
        return image, masks, points, classes

    def _window_centre(self, rng, height, width, out_h, out_w, cos, sin, crop_center):
        """(x, y) input centre of the output window: inside the input where it fits."""
        box_w = out_w * abs(cos) + out_h * abs(sin)
        box_h = out_h * abs(cos) + out_w * abs(sin)
        margin = self._elastic_margin()
        centre = []
        for size, box in ((width, box_w + margin), (height, box_h + margin)):
            low, high = (box - 1) / 2.0, size - 1 - (box - 1) / 2.0
            if crop_center or high <= low:
                centre.append((size - 1) / 2.0)
            else:
                centre.append(rng.uniform(low, high))
        return np.array(centre)

    def _crop(self, rng, image, masks, points, classes, out_h, out_w, crop_center, margin):
        """Integer-offset crop (exact); inputs smaller than the crop are mirror-reflected."""
        height, width = image.shape[:2]
        offsets = []
        for size, out in ((height, out_h), (width, out_w)):
            if crop_center:
                offsets.append((size - out) // 2)
            else:
                offsets.append(int(rng.integers(size - out + 1)) if size >= out else 0)
        top, left = offsets
        rows = reflect_indices(np.arange(top, top + out_h), height)
        cols = reflect_indices(np.arange(left, left + out_w), width)
        image = image[rows][:, cols]
        masks = [m[rows][:, cols] for m in masks]
        if points is not None:
            points, classes = _keep_inside(points - [left, top], classes, out_h, out_w, margin)
        return image, masks, points, classes

    def _displacement(self, rng, height, width):
        """(2, H, W) float64 smooth random displacement (dx, dy), |d| <= elastic per axis."""
        spacing = self.elastic_spacing
        grid_h, grid_w = height // spacing + 2, width // spacing + 2
        coarse = rng.uniform(-1.0, 1.0, size=(2, grid_h, grid_w)).astype(np.float32)
        fine = [cv2.resize(c, ((grid_w - 1) * spacing + 1, (grid_h - 1) * spacing + 1),
                           interpolation=cv2.INTER_CUBIC)[:height, :width] for c in coarse]
        return np.clip(np.stack(fine).astype(np.float64), -1.0, 1.0) * self.elastic

    # ------------------------------------------------------------------ intensity

    def _intensity(self, rng, image):
        """HED jitter (RGB only), then brightness/contrast; uint8 in, uint8 out."""
        if not (self.hed or self.hed_bias or self.contrast or self.brightness):
            return image
        as_uint8 = image.dtype == np.uint8
        x = image.astype(np.float32) / 255.0 if as_uint8 else image
        if (self.hed or self.hed_bias) and x.ndim == 3 and x.shape[-1] == 3:
            x = _hed_jitter(rng, x, self.hed, self.hed_bias)
        if self.contrast or self.brightness:
            scale = 1.0 + rng.uniform(-self.contrast, self.contrast)
            shift = rng.uniform(-self.brightness, self.brightness)
            x = np.clip((x - 0.5) * scale + 0.5 + shift, 0.0, 1.0)
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8) if as_uint8 else x


def _keep_inside(points, classes, height, width, margin):
    """Drop points (and their classes) outside the (height, width) output widened by ``margin``."""
    keep = ((points[:, 0] >= -0.5 - margin) & (points[:, 0] < width - 0.5 + margin)
            & (points[:, 1] >= -0.5 - margin) & (points[:, 1] < height - 0.5 + margin))
    return points[keep], (None if classes is None else classes[keep])


def _is_label(mask):
    return np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool


def _remap(array, map_x, map_y, nearest):
    """Resample (H, W[, K]) at (map_x, map_y); mirror-reflect beyond the edge.

    Nearest neighbour by indexing (any dtype, labels stay exact); bilinear via OpenCV in
    float32 (or float64), at most 4 channels per OpenCV call.
    """
    if nearest:
        rows = reflect_indices(np.floor(map_y + 0.5).astype(np.int64), array.shape[0])
        cols = reflect_indices(np.floor(map_x + 0.5).astype(np.int64), array.shape[1])
        return array[rows, cols]
    dtype = array.dtype
    work = array if dtype in (np.float32, np.float64) else array.astype(np.float32)
    if work.ndim == 3 and work.shape[2] > 4:
        parts = [_remap(work[..., i:i + 4], map_x, map_y, False) for i in range(0, work.shape[2], 4)]
        return np.concatenate([p if p.ndim == 3 else p[..., None] for p in parts], axis=2)
    out = cv2.remap(np.ascontiguousarray(work), map_x, map_y, cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REFLECT_101)
    if work.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    if dtype == np.uint8:
        out = np.clip(np.rint(out), 0, 255)
    return out.astype(dtype, copy=False)


def _sample_bilinear(field, points):
    """Bilinear samples (N,) of a (H, W) field at (N, 2) (x, y), clamped to the field."""
    height, width = field.shape
    x = np.clip(points[:, 0], 0, width - 1)
    y = np.clip(points[:, 1], 0, height - 1)
    x0, y0 = np.minimum(np.floor(x).astype(int), width - 2), np.minimum(np.floor(y).astype(int), height - 2)
    x0, y0 = np.maximum(x0, 0), np.maximum(y0, 0)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = x - x0, y - y0
    top = field[y0, x0] * (1 - fx) + field[y0, x1] * fx
    bottom = field[y1, x0] * (1 - fx) + field[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _invert_displacement(targets, displacement, iterations=8):
    """Output positions u with u + d(u) = target (the image at u came from target).

    Fixed-point iteration ``u <- target - d(u)``; converges because the field is smooth
    (its slope is about elastic / elastic_spacing, well below 1).
    """
    u = targets.copy()
    for _ in range(iterations):
        u = targets - np.stack([_sample_bilinear(displacement[0], u),
                                _sample_bilinear(displacement[1], u)], axis=1)
    return u


def _hed_jitter(rng, rgb, sigma, bias):
    """(H, W, 3) float RGB in [0, 1] -> same, with H, E, D concentrations scaled and shifted."""
    scale = rng.uniform(1.0 - sigma, 1.0 + sigma, size=3)
    shift = rng.uniform(-bias, bias, size=3)
    return _hed_apply(rgb, scale, shift)


def _hed_apply(rgb, scale, shift):
    """(..., 3) float RGB -> same with HED concentrations ``c * scale + shift`` (broadcast)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.clip(rgb, 0.0, 1.0)) * scale + shift
    return np.clip(hed2rgb(hed), 0.0, 1.0).astype(rgb.dtype, copy=False)
