"""bench/device/pack.py: the dataset travels to the GPU box as lossless WebP and comes back bit-exact."""

import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "device"))
import pack  # noqa: E402


def test_images_round_trip_bit_exact(tmp_path):
    source = tmp_path / "shared" / "crchistophenotypes"
    (source / "images").mkdir(parents=True)
    (source / "annotations").mkdir()
    (source / "annotations" / "img1_detection.mat").write_bytes(b"points")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(source / "images" / "img1.png"), image)
    out = tmp_path / "device_data"
    pack.pack_dataset(str(source), str(out / "crchistophenotypes"))
    assert not (out / "crchistophenotypes" / "images").exists()  # only WebP travels
    assert (out / "crchistophenotypes" / "annotations" / "img1_detection.mat").read_bytes() == b"points"
    pack.unpack(str(out))
    back = cv2.imread(str(out / "crchistophenotypes" / "images" / "img1.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(back, image)
