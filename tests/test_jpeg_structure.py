"""Damaged JPEG streams that libjpeg decodes silently are errors naming the file."""

import io

import numpy as np
import pytest
from PIL import Image

from kerasnuc.data.imageio import DataError, read_image
from kerasnuc.data.jpeg_structure import JpegStructureError, check_jpeg_stream


def _image():
    import cv2

    rng = np.random.default_rng(0)
    return cv2.GaussianBlur((rng.random((120, 200, 3)) * 255).astype(np.uint8), (7, 7), 3)


def _jpeg(**options):
    buffer = io.BytesIO()
    Image.fromarray(_image()).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _decodes_silently(data):
    """The premise: Pillow decodes the damaged stream without an error."""
    Image.open(io.BytesIO(data)).load()


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"restart_marker_blocks": 4},
                                     {"progressive": True, "restart_marker_rows": 1}, {"subsampling": 0}])
def test_clean_streams_pass(options, tmp_path):
    data = _jpeg(**options)
    check_jpeg_stream(data)
    check_jpeg_stream(data + b"\x00" * 64)  # padding after EOI
    check_jpeg_stream(data + data)  # an MPO-style second image
    path = tmp_path / "clean.jpg"
    path.write_bytes(data)
    assert read_image(path, channels=3).shape == (120, 200, 3)


def test_end_marker_inside_the_data_is_an_error_naming_the_file(tmp_path):
    data = bytearray(_jpeg())
    scan = data.find(b"\xff\xda")
    data[scan + 1500:scan + 1504] = b"\xff\xd9\xff\xd9"
    _decodes_silently(bytes(data))
    path = tmp_path / "stray_eoi.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"stray_eoi\.jpg: corrupt or truncated image \(JPEG structure: .*after the end-of-image"):
        read_image(path)


def test_lost_restart_interval_is_detected():
    data = _jpeg(restart_marker_blocks=2)
    first = data.find(b"\xff\xd0")
    second = data.find(b"\xff\xd1", first)
    damaged = data[:first] + data[second:]  # one interval's data and its RST0 gone
    _decodes_silently(damaged)
    with pytest.raises(JpegStructureError, match="restart marker"):
        check_jpeg_stream(damaged)


def test_a_whole_missing_tail_of_intervals_is_counted():
    data = _jpeg(restart_marker_blocks=4)
    markers = [i for i in range(len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    damaged = data[:markers[len(markers) // 2]] + b"\xff\xd9"  # the second half of the intervals gone
    _decodes_silently(damaged)
    with pytest.raises(JpegStructureError, match="restart markers where"):
        check_jpeg_stream(damaged)


def test_truncation_and_garbage(tmp_path):
    data = _jpeg()
    with pytest.raises(JpegStructureError, match="truncated"):
        check_jpeg_stream(data[: len(data) // 2])
    with pytest.raises(JpegStructureError, match="start-of-image"):
        check_jpeg_stream(b"\x00" + data)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:-200])
    with pytest.raises(DataError, match=r"cut\.jpg: corrupt or truncated"):
        read_image(path)
