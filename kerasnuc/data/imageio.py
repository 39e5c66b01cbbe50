"""Reading and writing image files with clear errors: one place, one policy for bad input.

Every file is checked before its pixels are decoded: its header must name a known format and
its size must be within the policy's pixel limit (:mod:`kerasnuc.data.validation`). Then it is
decoded strictly, so a truncated or corrupt file is an error naming it rather than an image
with grey-filled rows: PNG by OpenCV after Pillow's ``verify()`` checked every chunk's CRC up to
IEND (OpenCV keeps 16-bit RGB); JPEG, BMP and the other formats Pillow knows by Pillow's
``load()``, which raises on missing data, JPEG after its marker structure was checked whole
(:mod:`kerasnuc.data.jpeg_structure`: libjpeg decodes a damaged stream silently); TIFF by tifffile. All errors are :class:`DataError`.
"""

import io
import os

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from kerasnuc.atomic import atomic_path
from kerasnuc.data.jpeg_structure import JpegStructureError, check_jpeg_stream
from kerasnuc.data.validation import DataError, check_instance_labels, resolve_policy, scale_to_uint8

__all__ = ["DataError", "image_shape", "read_image", "read_label_image", "read_mask", "write_png_atomic"]

# The policy's max_pixels replaces Pillow's own decompression-bomb check (89 MP warning, 179 MP
# error), which would refuse images the policy allows; the size is still checked before decoding.
Image.MAX_IMAGE_PIXELS = None
TIFF_SUFFIXES = (".tif", ".tiff")


def read_image(path, channels="keep", policy=None):
    """Read an image as (H, W, C) uint8 RGB (alpha dropped) or grey, C in (1, 3).

    ``channels``: "keep" (grey stays 1 channel, RGB 3), 1 (convert to grey) or 3.
    Images stored in more than 8 bits are scaled by the policy's bit depth (default: each
    image's real range, see :func:`kerasnuc.data.validation.scale_to_uint8`).
    """
    path = os.fspath(path)
    array = _decode(path, "image", policy)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIFF
    return _to_uint8_hwc(array, path, channels, policy)


def image_shape(path, policy=None):
    """(height, width) of an image file from its header, checked against the pixel limit; no decoding."""
    path = os.fspath(path)
    return _open_checked(path, "image", resolve_policy(policy))[1]


def _to_uint8_hwc(array, path, channels, policy=None):
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"{path}: expected a 2-D grey, RGB or RGBA image, got shape {array.shape}")
    if array.shape[2] == 4:
        array = array[..., :3]
    array = scale_to_uint8(array, path, policy)
    if array.shape[2] == 3 and channels == "keep" and _is_grey(array):
        array = array[..., :1]
    if channels == 1 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)[..., None]
    elif channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _is_grey(rgb):
    return np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


def read_label_image(path, policy=None):
    """Read an instance label image (uint8/uint16/int32 PNG or TIFF) as (H, W) int32.

    A binary mask given as labels is an error or numbered by connected components, as the
    policy's ``binary_labels`` says.
    """
    path = os.fspath(path)
    array = _decode(path, "label", policy)
    if array.ndim == 3:
        if array.shape[2] in (3, 4) and all(np.array_equal(array[..., 0], array[..., i]) for i in (1, 2)):
            array = array[..., 0]
        else:
            raise DataError(f"{path}: label image must be single-channel, got shape {array.shape}")
    if array.ndim != 2:
        raise DataError(f"{path}: label image must be 2-D, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: label image must hold integers, got {array.dtype}")
    if array.size and array.min() < 0:
        raise DataError(f"{path}: label image has negative ids")
    if array.size and int(array.max()) > np.iinfo(np.int32).max:
        raise DataError(f"{path}: label ids up to {int(array.max())} do not fit 32-bit labels")
    return check_instance_labels(array.astype(np.int32), path, policy)


def read_mask(path, policy=None):
    """A binary mask file (one nucleus, e.g. DSB 2018's masks/*.png) as (H, W) bool: any non-zero pixel."""
    path = os.fspath(path)
    array = _decode(path, "mask", policy)
    if array.ndim == 3:
        array = array[..., :3].max(axis=2)
    return array != 0


# ---------------------------------------------------------------------------- strict decoding

def _decode(path, what, policy):
    """Pixels of ``path`` in its own dtype, RGB(A) channel order; DataError naming it otherwise."""
    policy = resolve_policy(policy)
    kind, _ = _open_checked(path, what, policy)
    if kind == "tiff":
        return _decode_tiff(path, what)
    if kind == "PNG":
        return _decode_png(path, what)
    return _decode_pillow(path, what)


def _open_checked(path, what, policy):
    """(format, (height, width)) from the header, after the existence and pixel-limit checks."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} file not found")
    if path.lower().endswith(TIFF_SUFFIXES):
        return "tiff", _tiff_header(path, what, policy)
    try:
        with Image.open(path) as image:
            kind, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable {what} (unknown format or corrupt header)") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: not a readable {what} ({error})") from None
    if kind == "TIFF":
        return "tiff", _tiff_header(path, what, policy)
    policy.check_pixels(path, (height, width))
    return kind, (height, width)


def _tiff_header(path, what, policy):
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
    except Exception as error:  # tifffile raises several types
        raise DataError(f"{path}: cannot read TIFF {what} ({error})") from None
    planes = [size for size, axis in zip(shape, axes) if axis != "S"]
    policy.check_pixels(path, planes)
    return tuple(shape[axes.index(a)] for a in "YX") if "Y" in axes and "X" in axes else tuple(planes[-2:])


def _decode_tiff(path, what):
    import tifffile

    try:
        return tifffile.imread(path)
    except Exception as error:  # truncated strips, bad compression data...
        raise DataError(f"{path}: cannot read TIFF {what} ({error})") from None


def _decode_png(path, what):
    with open(path, "rb") as handle:  # read once: verified by Pillow, decoded by OpenCV
        data = handle.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # every chunk present and its CRC right, up to IEND
    except Exception as error:
        raise DataError(f"{path}: corrupt or truncated PNG {what} ({error})") from None
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        raise DataError(f"{path}: cannot decode PNG {what} ({str(error).strip().splitlines()[-1]})") from None
    if array is None:
        raise DataError(f"{path}: corrupt or truncated PNG {what} (the decoder gave up)")
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return array


_PILLOW_MODES = {"1": "L", "LA": "L", "La": "L", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
                 "HSV": "RGB", "RGBa": "RGBA", "RGBX": "RGB"}


def _decode_pillow(path, what):
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError(f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process; "
                        "refusing to read images that may be truncated")
    try:
        with Image.open(path) as image:
            if image.format in ("JPEG", "MPO"):  # libjpeg decodes a damaged stream silently
                with open(path, "rb") as handle:
                    check_jpeg_stream(handle.read())
            image.load()  # raises on truncated or corrupt data
            if image.mode == "P":
                image = image if what != "image" else image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode in _PILLOW_MODES:
                image = image.convert(_PILLOW_MODES[image.mode])
            return np.asarray(image)
    except DataError:
        raise
    except JpegStructureError as error:
        raise DataError(f"{path}: corrupt or truncated {what} (JPEG structure: {error})") from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError...
        raise DataError(f"{path}: corrupt or truncated {what} ({error})") from None


def write_png_atomic(path, array):
    """Write a PNG through a temporary file so a crash never leaves half a file."""
    path = os.fspath(path)
    data = array
    if data.ndim == 3 and data.shape[2] == 3:
        data = cv2.cvtColor(data, cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, data):
            raise DataError(f"{path}: could not write PNG")
