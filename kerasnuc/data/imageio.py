"""Reading and writing image files with clear errors (OpenCV, tifffile for TIFF)."""

import os

import cv2
import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


def read_image(path, channels="keep"):
    """Read an image as (H, W, C) uint8 RGB(A dropped) or grey, C in (1, 3).

    ``channels``: "keep" (grey stays 1 channel, RGB 3), 1 (convert to grey) or 3.
    16-bit images are rescaled to 8 bit by their maximum.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: image file not found")
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        try:
            array = tifffile.imread(path)
        except Exception as error:  # tifffile raises several types
            raise DataError(f"{path}: cannot read TIFF ({error})") from None
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)
    else:
        array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if array is None:
            raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
        if array.ndim == 3:
            code = cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB
            array = cv2.cvtColor(array, code)
    return _to_uint8_hwc(array, path, channels)


def _to_uint8_hwc(array, path, channels):
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"{path}: expected a 2-D grey, RGB or RGBA image, got shape {array.shape}")
    if array.shape[2] == 4:
        array = array[..., :3]
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number):
            raise DataError(f"{path}: unsupported pixel type {array.dtype}")
        top = float(array.max()) or 1.0
        scale = 255.0 / (65535.0 if array.dtype == np.uint16 and top > 255 else max(top, 255.0))
        array = np.clip(array.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
    if array.shape[2] == 3 and channels == "keep" and _is_grey(array):
        array = array[..., :1]
    if channels == 1 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)[..., None]
    elif channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _is_grey(rgb):
    return np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


def read_label_image(path):
    """Read an instance label image (uint8/uint16/int32 PNG or TIFF) as (H, W) int32."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: label file not found")
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        array = tifffile.imread(path)
    else:
        array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DataError(f"{path}: not a readable label image")
    if array.ndim == 3:
        if array.shape[2] in (3, 4) and all(np.array_equal(array[..., 0], array[..., i]) for i in (1, 2)):
            array = array[..., 0]
        else:
            raise DataError(f"{path}: label image must be single-channel, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: label image must hold integers, got {array.dtype}")
    if array.min() < 0:
        raise DataError(f"{path}: label image has negative ids")
    return array.astype(np.int32)


def write_png_atomic(path, array):
    """Write a PNG through a temporary file so a crash never leaves half a file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}.png"
    data = array
    if data.ndim == 3 and data.shape[2] == 3:
        data = cv2.cvtColor(data, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(tmp, data):
        raise DataError(f"{path}: could not write PNG")
    os.replace(tmp, path)
