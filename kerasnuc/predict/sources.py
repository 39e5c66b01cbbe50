"""Where pixels come from: images in memory, image files, pyramidal TIFF / OME-TIFF and vendor slides.

The engine never holds a slide: it asks a *view* for the block it is working on. A view is
an (H, W, C) image at the pixel size the model wants, with ``read(top, bottom, left, right)``,
the intensity range that normalises all of it, and ``downsample``: how many level-0 pixels
one of its pixels spans (so coordinates can be reported in level-0 pixels).

- :class:`ArrayView`: an array (or a file that fits in memory); exact min-max over all of it.
- :func:`open_slide`: pyramidal TIFF / OME-TIFF through ``tifffile`` + ``zarr`` (lazy
  levels), vendor formats (SVS, NDPI, MRXS, SCN, ...) through ``openslide-python`` with
  ``openslide-bin`` (the ``[wsi]`` extra). :class:`SlideView` reads the level nearest the
  wanted pixel size (never coarser) and resamples blocks to it exactly; its intensity range
  and tissue mask come from a thumbnail.
"""

import math
import os

import numpy as np

from kerasnuc.data.imageio import DataError

OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_EXTENSIONS = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
SLIDE_EXTENSIONS = OPENSLIDE_EXTENSIONS + TIFF_EXTENSIONS
THUMBNAIL_SIDE = 2048
# a TIFF is read lazily as a slide when it is pyramidal or at least this many pixels
LAZY_PIXELS = 8192 * 8192


class ArrayView:
    """An image in memory as a view: level 0, exact intensity range."""

    downsample = 1.0
    is_slide = False

    def __init__(self, image, path="", mpp=None):
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise ValueError(f"{path or 'image'}: expected an (H, W) or (H, W, C) image, got shape {image.shape}")
        self.image, self.path, self.mpp = image, path, mpp
        self.shape = image.shape

    def read(self, top, bottom, left, right):
        return self.image[top:bottom, left:right]

    def value_range(self, channels):
        """(min, max) after channel conversion, over the whole image, in row strips (no full float copy)."""
        from kerasnuc.intensity import intensity_range

        lows, highs = [], []
        step = max(1, (1 << 24) // max(1, self.shape[1] * self.shape[2]))
        for top in range(0, self.shape[0], step):
            low, high = intensity_range(self.image[top:top + step], channels)
            lows.append(low)
            highs.append(high)
        return min(lows), max(highs)

    def tissue(self):
        """None: every block of an image is worth predicting."""
        return None


class Slide:
    """A multi-resolution image: levels of (height, width), their downsamples and a reader."""

    def __init__(self, path, levels, downsamples, channels, mpp, reader, close=None):
        self.path, self.levels, self.downsamples = path, levels, downsamples
        self.channels, self.mpp, self._reader, self._close = channels, mpp, reader, close

    @property
    def shape(self):
        return (*self.levels[0], self.channels)

    def read(self, level, top, bottom, left, right):
        """uint8 (h, w, C) pixels of ``level`` (clipped to the level)."""
        height, width = self.levels[level]
        top, left = max(int(top), 0), max(int(left), 0)
        bottom, right = min(int(bottom), height), min(int(right), width)
        try:
            return self._reader(level, top, bottom, left, right)
        except DataError:
            raise
        except Exception as error:  # decoders raise many types
            raise DataError(f"{self.path}: cannot read level {level} rows {top}-{bottom}, "
                            f"columns {left}-{right} ({error})") from None

    @classmethod
    def from_array(cls, image, path="", mpp=None):
        """A one-level slide of an image in memory (to resample it like a slide)."""
        image = ArrayView(image, path).image
        return cls(path, [image.shape[:2]], [1.0], image.shape[2], mpp,
                   lambda level, top, bottom, left, right: image[top:bottom, left:right])

    def close(self):
        if self._close is not None:
            self._close()

    def view(self, mpp=None, downsample=None):
        """A :class:`SlideView` at pixel size ``mpp`` (µm/px; needs the slide's own pixel size)
        or at ``downsample`` level-0 pixels per pixel; default level 0."""
        if mpp and downsample is None:
            if not self.mpp:
                raise DataError(f"{self.path}: the slide does not record its pixel size; "
                                "pass --mpp for it (or predict at level 0)")
            downsample = float(mpp) / self.mpp
        return SlideView(self, max(float(downsample or 1.0), 1e-6))


class SlideView:
    """A slide resampled to ``downsample`` level-0 pixels per pixel, read block by block.

    Blocks come from the finest level that is not coarser than wanted and are resized with
    area interpolation when that level does not match within 1 %.
    """

    is_slide = True

    def __init__(self, slide, downsample):
        self.slide, self.downsample, self.path = slide, downsample, slide.path
        finer = [i for i, d in enumerate(slide.downsamples) if d <= downsample * 1.01]
        self.level = max(finer, key=lambda i: slide.downsamples[i]) if finer else 0
        self.scale = slide.downsamples[self.level] / downsample  # level pixels -> view pixels
        if abs(self.scale - 1.0) < 0.01:
            self.scale = 1.0
        height, width = slide.levels[self.level]
        self.shape = (int(round(height * self.scale)), int(round(width * self.scale)), slide.channels)
        self.mpp = slide.mpp * downsample if slide.mpp else None
        self._thumb = None

    def read(self, top, bottom, left, right):
        bottom, right = min(bottom, self.shape[0]), min(right, self.shape[1])
        if self.scale == 1.0:
            return self.slide.read(self.level, top, bottom, left, right)
        import cv2

        inverse = 1.0 / self.scale
        pixels = self.slide.read(self.level, math.floor(top * inverse), math.ceil(bottom * inverse),
                                 math.floor(left * inverse), math.ceil(right * inverse))
        out = cv2.resize(pixels, (right - left, bottom - top), interpolation=cv2.INTER_AREA)
        return out[..., None] if out.ndim == 2 else out

    def thumbnail(self):
        """(uint8 image of at most THUMBNAIL_SIDE per side, view pixels per thumbnail pixel)."""
        if self._thumb is None:
            import cv2

            levels = self.slide.levels
            # the coarsest level that still has THUMBNAIL_SIDE / 2 pixels a side (or the finest)
            fits = [i for i, (h, w) in enumerate(levels) if max(h, w) >= THUMBNAIL_SIDE // 2]
            level = max(fits, key=lambda i: self.slide.downsamples[i]) if fits else 0
            height, width = levels[level]
            if max(height, width) > THUMBNAIL_SIDE * 2:  # no small level: sample rows and columns
                pixels = _strided_read(self.slide, level, THUMBNAIL_SIDE)
            else:
                pixels = self.slide.read(level, 0, height, 0, width)
            side = max(pixels.shape[:2])
            if side > THUMBNAIL_SIDE:
                factor = THUMBNAIL_SIDE / side
                pixels = cv2.resize(pixels, (max(1, round(pixels.shape[1] * factor)),
                                             max(1, round(pixels.shape[0] * factor))), interpolation=cv2.INTER_AREA)
                pixels = pixels[..., None] if pixels.ndim == 2 else pixels
            self._thumb = (pixels, self.shape[0] / pixels.shape[0])
        return self._thumb

    def value_range(self, channels):
        """The slide's (min, max) after channel conversion, taken from its thumbnail, so every
        block of the slide is normalised alike."""
        from kerasnuc.intensity import intensity_range

        return intensity_range(self.thumbnail()[0], channels)

    def tissue(self):
        """(bool mask on the thumbnail, view pixels per mask pixel): where there is tissue."""
        pixels, step = self.thumbnail()
        return tissue_mask(pixels), step


def tissue_mask(thumbnail):
    """True where a thumbnail shows tissue rather than glass: saturation (brightfield RGB) or
    brightness against the background (grey), Otsu threshold, closed and dilated a little."""
    import cv2

    pixels = np.asarray(thumbnail)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] >= 3:
        signal = cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_RGB2HSV)[..., 1]
    else:
        grey = pixels[..., 0]
        signal = 255 - grey if np.median(grey) > 127 else grey  # tissue darker than bright glass
    signal = cv2.GaussianBlur(np.ascontiguousarray(signal), (5, 5), 0)
    threshold, _ = cv2.threshold(signal, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = signal > max(threshold, 12)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    return cv2.dilate(mask, kernel).astype(bool)


def _strided_read(slide, level, side):
    """Every n-th row and column of a level too large to read whole, in bands of rows (so a
    tiled file decodes each tile once)."""
    height, width = slide.levels[level]
    step = max(1, math.ceil(max(height, width) / side))
    band = max(step, 256 // step * step)
    rows = []
    for top in range(0, height, band):
        rows.append(slide.read(level, top, min(top + band, height), 0, width)[::step, ::step])
    return np.concatenate(rows, axis=0)


def is_slide_path(path):
    """True for files read lazily as slides: vendor formats, and TIFFs that are pyramidal or huge."""
    lower = path.lower()
    if lower.endswith(OPENSLIDE_EXTENSIONS):
        return True
    if lower.endswith(TIFF_EXTENSIONS):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return len(series.levels) > 1 or int(np.prod(series.shape[:2])) >= LAZY_PIXELS
        except Exception:
            return False  # read_image reports what is wrong with it
    return False


def open_slide(path, policy=None):
    """A :class:`Slide` for a pyramidal TIFF / OME-TIFF (tifffile) or a vendor format (OpenSlide).
    ``policy``: its bit depth scales slides stored in 16 bits (see :func:`_slide_bits`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: slide file not found")
    if path.lower().endswith(TIFF_EXTENSIONS):
        try:
            return _tiff_slide(path, policy)
        except DataError:
            raise
        except Exception as error:
            tiff_error = error
        try:
            return _openslide_slide(path)
        except DataError:
            pass
        raise DataError(f"{path}: cannot read TIFF ({tiff_error})")
    return _openslide_slide(path)


def _tiff_slide(path, policy=None):
    import tifffile

    try:
        import zarr
    except ImportError:
        raise DataError(f"{path}: reading slides needs zarr: pip install 'kerasnuc[wsi]'") from None
    tif = tifffile.TiffFile(path)
    try:
        series = tif.series[0]
        axes = series.axes
        levels, arrays, downsamples = [], [], []
        store = tif.series[0].aszarr()
        group = zarr.open(store, mode="r")
        members = [group] if isinstance(group, zarr.Array) else [group[str(i)] for i in range(len(series.levels))]
        base = None
        for array, level in zip(members, series.levels):
            if "S" in axes and axes.index("S") < axes.index("Y"):
                raise DataError(f"{path}: planar (channels-first) slides are not supported; axes {axes}")
            height, width = level.shape[axes.index("Y")], level.shape[axes.index("X")]
            base = base or (height, width)
            levels.append((height, width))
            arrays.append(array)
            downsamples.append(base[0] / height)
        extra = [a for a in axes if a not in "YXS"]
        if any(series.shape[axes.index(a)] > 1 for a in extra):
            raise DataError(f"{path}: expected one 2-D image (axes {axes}, shape {series.shape}); "
                            "pick a plane and save it first")
        channels = series.shape[axes.index("S")] if "S" in axes else 1
        index = tuple(0 for a in axes if a not in "YXS")
        dtype = series.dtype
        # the coarsest level, strided to at most ~4 MP (a single-level slide is never read whole)
        step = max(1, int(np.ceil(np.sqrt(levels[-1][0] * levels[-1][1] / 2 ** 22))))
        sample = arrays[-1][tuple(slice(None, None, step) if a in "YX" else slice(None) for a in axes)]
        bits = _slide_bits(sample, dtype, path, policy)

        def reader(level, top, bottom, left, right):
            pixels = np.asarray(arrays[level][index + (slice(top, bottom), slice(left, right))])
            return _as_uint8(pixels.reshape(bottom - top, right - left, -1), dtype, path, bits)

        channels = 3 if channels >= 3 else 1
        return Slide(path, levels, downsamples, channels, _tiff_mpp(tif), reader, close=tif.close)
    except Exception:
        tif.close()
        raise


def _slide_bits(coarsest, dtype, path, policy):
    """The bit depth a 16-bit slide's pixels are scaled by: the stated ``--bit-depth``, or ('auto')
    the one its coarsest level's maximum needs (a 12-bit scan stored in 16 bits keeps its 4096
    levels instead of losing 4 bits to the container's maximum). None for 8-bit slides."""
    from kerasnuc.data.validation import data_bits, resolve_policy

    if dtype == np.uint8:
        return None
    if dtype != np.uint16:
        raise DataError(f"{path}: slides of pixel type {dtype} are not supported (uint8 or uint16)")
    policy = resolve_policy(policy)
    if policy.bit_depth != "auto":
        return int(policy.bit_depth)
    return data_bits(int(np.asarray(coarsest).max(initial=0)))


def _as_uint8(pixels, dtype, path, bits=16):
    if pixels.shape[2] == 4:
        pixels = pixels[..., :3]
    if dtype == np.uint8:
        return pixels
    if dtype == np.uint16:  # values above the depth (missed by the coarsest level) saturate
        scaled = pixels.astype(np.float32) * np.float32(255.0 / (2 ** bits - 1))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    raise DataError(f"{path}: slides of pixel type {dtype} are not supported (uint8 or uint16)")


def _tiff_mpp(tif):
    """Level-0 µm per pixel of a TIFF: OME PhysicalSizeX, Aperio's MPP, or the resolution tags."""
    import re

    if tif.is_ome:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata or "")
        if match:
            factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm", 1.0)
            return float(match.group(1)) * factor
    page = tif.pages[0]
    description = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        numerator, denominator = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = numerator / denominator if denominator else 0
        if per_unit > 0 and unit in (2, 3):  # inch, centimetre
            return (25400.0 if unit == 2 else 10000.0) / per_unit
    return None


def _openslide_slide(path):
    try:
        import openslide
    except ImportError:
        raise DataError(f"{path}: reading this slide format needs OpenSlide: "
                        "pip install 'kerasnuc[wsi]'") from None
    try:
        slide = openslide.OpenSlide(path)
    except Exception as error:
        raise DataError(f"{path}: OpenSlide cannot open it ({error})") from None
    mpp = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)

    def reader(level, top, bottom, left, right):
        scale = slide.level_downsamples[level]
        region = slide.read_region((int(round(left * scale)), int(round(top * scale))), level,
                                   (right - left, bottom - top))
        rgba = np.asarray(region)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255  # transparent (outside the scanned area) is glass
        return rgb

    levels = [(h, w) for w, h in slide.level_dimensions]
    return Slide(path, levels, list(slide.level_downsamples), 3, float(mpp) if mpp else None, reader,
                 close=slide.close)


def open_view(path, mpp=None, model_mpp=None, image_mpp=None, policy=None):
    """A view of an image file at the pixel size to predict at: ``mpp``, else the model's
    ``model_mpp``. The file's own pixel size is read from it or given as ``image_mpp``; without
    it (or without a target) the image is used as it is. Slides are read lazily; other images
    whole, under ``policy`` (:class:`~kerasnuc.data.validation.InputPolicy`: pixel limit, bit depth)."""
    from kerasnuc.data.imageio import read_image

    path = os.fspath(path)
    target = mpp or model_mpp
    if is_slide_path(path):
        slide = open_slide(path, policy)
        slide.mpp = slide.mpp or image_mpp
        return slide.view(mpp=target if target and slide.mpp else None)
    image = read_image(path, policy=policy)
    if target and image_mpp and abs(target / image_mpp - 1) > 0.01:
        return Slide.from_array(image, path, image_mpp).view(mpp=target)
    return ArrayView(image, path, image_mpp)
