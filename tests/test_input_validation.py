"""Hostile input: truncated or corrupt files, huge headers, high bit depths, binary masks given
as labels and impossible MoNuSeg regions are clear one-line errors naming the file (or a
counted warning), under one policy (kerasnuc.data.validation), in the readers and the CLIs.

Every fixture is made here in tmp_path; the huge images are headers only (a crafted PNG, a
sparse TIFF), so nothing large is ever decoded or written.
"""

import gzip
import json
import os
import struct
import time
import warnings
import zlib

import cv2
import numpy as np
import pytest
import tifffile

from kerasnuc.data import load_dataset
from kerasnuc.data.imageio import DataError, read_image, read_label_image
from kerasnuc.data.readers import monuseg
from kerasnuc.data.validation import DataWarning, InputPolicy, data_bits

RNG = np.random.default_rng(15)


def _rgb(height=48, width=64):
    """A smooth RGB test image (compresses like a real one, so truncation cuts pixel data)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) % 256
    return (base + RNG.integers(0, 20, base.shape)).clip(0, 255).astype(np.uint8)


def _write(path, rgb):
    """Write ``rgb`` as PNG/JPEG/BMP (OpenCV) or TIFF (tifffile) by the file name."""
    path = str(path)
    if path.endswith(".tif"):
        tifffile.imwrite(path, rgb, photometric="rgb")
    else:
        assert cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _truncate(path, keep=0.6):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])
    return path


def _png_header(path, width, height, bit_depth=8):
    """A valid PNG claiming width x height (grey), with a few bytes of pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                           + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return str(path)


# ---------------------------------------------------------------------------- truncated and corrupt files

@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_truncated_images_are_errors_naming_the_file(tmp_path, ext):
    rgb = _rgb()
    intact = _write(tmp_path / f"intact{ext}", rgb)
    read = read_image(intact)
    assert read.shape == rgb.shape and read.dtype == np.uint8
    if ext != ".jpg":
        np.testing.assert_array_equal(read, rgb)  # lossless formats: the very pixels
    cut = _truncate(_write(tmp_path / f"cut{ext}", rgb))
    with pytest.raises(DataError, match=rf"^{cut}: .*(truncated|cannot read TIFF)"):
        read_image(cut)
    # cut just before the end (the JPEG EOI marker / PNG IEND missing)
    data = open(intact, "rb").read()
    open(tmp_path / f"tail{ext}", "wb").write(data[:-12])
    with pytest.raises(DataError, match=rf"tail{ext}: "):
        read_image(tmp_path / f"tail{ext}")


def test_corrupt_and_foreign_files_are_errors_naming_the_file(tmp_path):
    (tmp_path / "text.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"text.png: not a readable image"):
        read_image(tmp_path / "text.png")
    path = _write(tmp_path / "flip.png", _rgb())
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside IDAT: the chunk CRC no longer matches
    open(path, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"flip.png: corrupt or truncated PNG"):
        read_image(path)
    with pytest.raises(DataError, match=r"missing.png: image file not found"):
        read_image(tmp_path / "missing.png")
    # a TIFF saved under .png is recognised by its header and read by tifffile
    tifffile.imwrite(tmp_path / "really_tiff.png", _rgb(), photometric="rgb")
    assert read_image(tmp_path / "really_tiff.png").shape == (48, 64, 3)


def test_bad_label_files_are_one_line_data_errors(tmp_path):
    labels = np.zeros((40, 50), np.uint16)
    labels[5:15, 5:15], labels[20:30, 20:35] = 1, 2
    tifffile.imwrite(tmp_path / "l.tif", labels)
    cv2.imwrite(str(tmp_path / "l.png"), labels)
    for name in ("l.tif", "l.png"):
        np.testing.assert_array_equal(read_label_image(tmp_path / name), labels)
        path = _truncate(str(tmp_path / name), 0.3)
        with pytest.raises(DataError) as caught:
            read_label_image(path)
        assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
    (tmp_path / "x.tif").write_bytes(b"II*\0garbage")
    with pytest.raises(DataError, match=r"x.tif: cannot read TIFF label"):
        read_label_image(tmp_path / "x.tif")


# ---------------------------------------------------------------------------- pixel limit before decoding

def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    big = _png_header(tmp_path / "x.png", 30000, 30000)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"^.*x.png: 30000 x 30000 = 900 MP exceeds the 268 MP pixel limit; "
                                        r"raise it with --max-pixels$"):
        read_image(big)
    huge = _png_header(tmp_path / "huge.png", 100000, 100000)  # was a raw cv2.error
    with pytest.raises(DataError, match=r"huge.png: 100000 x 100000 = 10000 MP exceeds"):
        read_label_image(huge)
    # JPEG: a real file whose SOF0 header is patched to 60000 x 60000
    jpeg = _write(tmp_path / "j.jpg", _rgb())
    data = bytearray(open(jpeg, "rb").read())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    open(jpeg, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"j.jpg: 60000 x 60000 = 3600 MP exceeds"):
        read_image(jpeg)
    # TIFF: a sparse 900 MP file (8 KB on disk) is refused from its page shape
    tifffile.imwrite(tmp_path / "t.tif", shape=(30000, 30000), dtype=np.uint8)
    with pytest.raises(DataError, match=r"t.tif: 30000 x 30000 = 900 MP exceeds"):
        read_image(tmp_path / "t.tif")
    assert time.perf_counter() - started < 5  # nothing was decoded
    # the limit is the policy's: raised, a small image passes; lowered, it is refused
    small = _write(tmp_path / "s.png", _rgb())
    with pytest.raises(DataError, match=r"s.png: 48 x 64 = 0.00307 MP exceeds the 0.001 MP pixel limit"):
        read_image(small, policy=InputPolicy(max_pixels=1000))
    assert read_image(small, policy=InputPolicy(max_pixels=48 * 64)).shape == (48, 64, 3)


def test_rle_csv_sizes_are_under_the_pixel_limit(tmp_path):
    csv = tmp_path / "sol.csv"
    csv.write_text("ImageId,EncodedPixels,Height,Width\na,1 3,100000,100000\n")
    with pytest.raises(DataError, match=r"sol.csv, line 2: 100000 x 100000 = 10000 MP exceeds"):
        from kerasnuc.data.readers import rle

        rle.read_rle_csv(csv)


def test_slides_are_read_lazily_and_not_under_the_plain_image_limit(tmp_path):
    pytest.importorskip("zarr")
    from kerasnuc.predict.sources import SlideView, open_view

    level0 = np.tile(_rgb(64, 64), (8, 8, 1))  # 512 x 512
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), photometric="rgb", metadata=None)
        tif.write(level0[::2, ::2], tile=(256, 256), photometric="rgb", metadata=None, subfiletype=1)
    policy = InputPolicy(max_pixels=1000)
    with pytest.raises(DataError, match="exceeds the 0.001 MP pixel limit"):
        read_image(path, policy=policy)  # read whole: limited
    view = open_view(str(path), policy=policy)  # read block by block: not limited
    assert isinstance(view, SlideView) and view.shape == (512, 512, 3)
    np.testing.assert_array_equal(view.read(0, 64, 0, 64), level0[:64, :64])


def test_16_bit_slides_are_scaled_by_their_real_range_or_the_stated_depth(tmp_path):
    pytest.importorskip("zarr")
    from kerasnuc.predict.sources import open_view

    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 4096, (512, 512), dtype=np.uint16)  # a 12-bit scan in 16-bit pages
    level0[0, 0] = 4095
    path = tmp_path / "slide12.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), photometric="minisblack", metadata=None)
        tif.write(level0[::2, ::2], tile=(256, 256), photometric="minisblack", metadata=None, subfiletype=1)
    pixels = open_view(str(path)).read(0, 64, 0, 64)[..., 0]
    np.testing.assert_array_equal(pixels, np.rint(level0[:64, :64] * (255 / 4095)).astype(np.uint8))
    assert len(np.unique(pixels)) > 200  # not 16 levels, as a shift by 8 bits would leave
    stated = open_view(str(path), policy=InputPolicy(bit_depth=16)).read(0, 64, 0, 64)[..., 0]
    np.testing.assert_array_equal(stated, np.rint(level0[:64, :64] * (255 / 65535)).astype(np.uint8))


# ---------------------------------------------------------------------------- bit depth

def test_high_bit_depth_is_scaled_by_its_real_range(tmp_path):
    levels = np.arange(38, dtype=np.uint16) * 110  # 38 grey levels of 12-bit data (max 4070)
    image = np.repeat(levels[None, :], 4, axis=0)
    cv2.imwrite(str(tmp_path / "g12.png"), image)
    tifffile.imwrite(tmp_path / "g12.tif", image)
    for name in ("g12.png", "g12.tif"):
        auto = read_image(tmp_path / name)
        assert len(np.unique(auto)) == 38  # 255 / 65535 would leave 3
        assert auto.max() == round(4070 * 255 / 4095)
        as16 = read_image(tmp_path / name, policy=InputPolicy(bit_depth=16))
        assert len(np.unique(as16)) < 20 and as16.max() == round(4070 * 255 / 65535)
        with pytest.raises(DataError, match=rf"{name}: values up to 4070 do not fit the stated 10-bit depth"):
            read_image(tmp_path / name, policy=InputPolicy(bit_depth=10))
    assert [data_bits(v) for v in (0, 255, 256, 1023, 1024, 4095, 16383, 16384, 65535, 70000)] == \
        [8, 8, 10, 10, 12, 12, 14, 16, 16, 17]
    # 16-bit files holding 8-bit values and plain 8-bit files keep their values
    cv2.imwrite(str(tmp_path / "low.png"), np.arange(200, dtype=np.uint16).reshape(10, 20))
    np.testing.assert_array_equal(read_image(tmp_path / "low.png")[..., 0], np.arange(200).reshape(10, 20))
    rgb = _rgb()
    _write(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png", policy=InputPolicy(bit_depth=12)), rgb)
    with pytest.raises(ValueError, match="bit depth must be 'auto' or a number"):
        InputPolicy(bit_depth="twelve")


# ---------------------------------------------------------------------------- binary masks as labels

def _binary_mask(value=255):
    mask = np.zeros((40, 60), np.uint8)
    mask[3:10, 3:10] = mask[20:30, 5:15] = mask[12:18, 40:55] = value
    return mask


def test_binary_mask_given_as_labels_is_an_error_or_numbered_blobs(tmp_path):
    for value in (255, 1):
        path = str(tmp_path / f"mask{value}.png")
        cv2.imwrite(path, _binary_mask(value))
        with pytest.raises(DataError, match=rf"mask{value}.png: looks like a binary mask, not instance labels "
                                            rf"\(3 separate blobs all with id {value}\); .*--binary-labels components"):
            read_label_image(path)
        labels = read_label_image(path, policy=InputPolicy(binary_labels="components"))
        assert sorted(np.unique(labels)) == [0, 1, 2, 3]
        np.testing.assert_array_equal(labels > 0, _binary_mask(value) > 0)
    one = np.zeros((20, 20), np.uint8)
    one[5:9, 5:9] = 1  # a single nucleus with id 1 is a valid instance label
    cv2.imwrite(str(tmp_path / "one.png"), one)
    np.testing.assert_array_equal(read_label_image(tmp_path / "one.png"), one)
    instances = _binary_mask(1).astype(np.uint16)
    instances[20:30, 5:15] = 2  # two ids: instance labels, left alone
    cv2.imwrite(str(tmp_path / "inst.png"), instances)
    np.testing.assert_array_equal(read_label_image(tmp_path / "inst.png"), instances)


def test_class_map_given_as_labels_is_an_error_or_numbered_blobs(tmp_path):
    """Real label sets split a nucleus into at most 3 blobs; one id over 6 is a class map."""
    classes = np.zeros((64, 64), np.uint8)
    for k in range(6):
        classes[2 + 10 * k: 7 + 10 * k, 2:7] = 1       # class 1: six nuclei
        classes[2 + 10 * k: 7 + 10 * k, 30:35] = 2     # class 2: six more
    path = str(tmp_path / "classes.png")
    cv2.imwrite(path, classes)
    with pytest.raises(DataError, match=r"classes.png: looks like a class map, not instance labels "
                                        r"\(id 1 covers 6 separate blobs; 2 ids cover 5 or more\)"):
        read_label_image(path)
    labels = read_label_image(path, policy=InputPolicy(binary_labels="components"))
    assert labels.max() == 12 and sorted(np.unique(labels)) == list(range(13))
    np.testing.assert_array_equal(labels > 0, classes > 0)


def _folder(root, images, labels=None):
    """images/ + labels/ folder; ``images``: {stem: (ext, rgb or None for a truncated file)}."""
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    for stem, (ext, rgb) in images.items():
        path = _write(root / "images" / f"{stem}{ext}", _rgb() if rgb is None else rgb)
        if rgb is None:
            _truncate(path)
        label = (labels or {}).get(stem)
        if label is None:
            label = np.zeros((48, 64), np.uint16)
            label[5:15, 5:20], label[25:40, 30:50] = 1, 2
        cv2.imwrite(str(root / "labels" / f"{stem}.png"), label)
    return root


def test_folder_reader_applies_the_policy_and_skips_bad_inputs(tmp_path):
    mask = np.zeros((48, 64), np.uint8)
    mask[5:15, 5:20] = mask[25:40, 30:50] = 255
    root = _folder(tmp_path / "d", {"a": (".png", _rgb()), "b": (".jpg", None), "c": (".png", _rgb())},
                   labels={"c": mask})
    with pytest.raises(DataError, match=r"b.jpg: corrupt or truncated image"):
        load_dataset(f"folder:{root}")
    skipped = []
    records = load_dataset(f"folder:{root}", skipped=skipped)
    assert [r.name for r in records] == ["a"]
    assert [(s["name"], os.path.basename(s["file"])) for s in skipped] == [("b", "b.jpg"), ("c", "c.png")]
    assert "truncated" in skipped[0]["error"] and "binary mask" in skipped[1]["error"]
    assert skipped[1]["error"].startswith(str(root / "labels" / "c.png"))
    records = load_dataset(f"folder:{root}", skipped=[], policy=InputPolicy(binary_labels="components"))
    assert [r.name for r in records] == ["a", "c"] and records[1].labels.max() == 2


# ---------------------------------------------------------------------------- MoNuSeg geometry

def _aperio(regions):
    body = "".join(f'<Region Id="{rid}"><Vertices>'
                   + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices) + "</Vertices></Region>"
                   for rid, vertices in regions)
    return f"<Annotations><Annotation><Regions>{body}</Regions></Annotation></Annotations>"


def test_monuseg_regions_that_cannot_be_drawn_are_skipped_with_one_counted_warning(tmp_path):
    square = [(5, 5), (15, 5), (15, 15), (5, 15)]
    regions = [(1, square), (5, [(20, 20), (30, 30)]), (7, [(1, 1), (1e300, 1), (1, 8)]), (9, [(3, 3)]),
               (12, [(500, 500), (520, 500), (510, 520)]), (13, [(30, 2), ("nan", 2), (35, 8)]),
               (14, [(25, 20), (38, 20), (38, 30)])]
    tifffile.imwrite(tmp_path / "A.tif", _rgb(), photometric="rgb")
    (tmp_path / "A.xml").write_text(_aperio(regions))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record, = monuseg.read(tmp_path)  # no OverflowError from 1e300
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert messages == [f"{tmp_path / 'A.xml'}: skipped 5 regions (2 with fewer than 3 vertices: ids 5, 9; "
                        "2 with non-finite or absurd coordinates: ids 7, 13; 1 outside the image: id 12)"]
    assert sorted(np.unique(record.labels)) == [0, 1, 7]  # ids keep document order (region 14 is 7th)
    assert (record.labels == 1).sum() == 121
    (tmp_path / "A.xml").write_text(_aperio([(5, [(1, 1), (2, 2)]), (6, [(900, 900), (950, 900), (920, 950)])]))
    with pytest.raises(DataError, match=r"A.xml: none of its 2 regions can be drawn: skipped 2 regions"):
        monuseg.read(tmp_path)
    os.remove(tmp_path / "A.xml")
    (tmp_path / "A.xml.gz").write_bytes(gzip.compress(_aperio([(1, square)]).encode()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file gives no warning
        assert monuseg.read(tmp_path)[0].labels.max() == 1


# ---------------------------------------------------------------------------- the CLIs

@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """An untrained tiny U-Net run folder (the evaluator and the predictor only read its files)."""
    from kerasnuc import models

    run = tmp_path_factory.mktemp("ivrun") / "run"
    os.makedirs(run)
    json.dump({"task": "segmentation", "model": "unet", "model_config": {"filters": 4, "depth": 2},
               "data": "sample", "channels": 3}, open(run / "config.json", "w"))
    json.dump({"train": [], "val": [], "test": []}, open(run / "split.json", "w"))
    json.dump({"postprocess": {"threshold": 0.5, "min_distance": 3, "min_area": 10}},
              open(run / "thresholds.json", "w"))
    models.build("unet", input_shape=(None, None, 3), filters=4, depth=2).save(run / "model.keras")
    return str(run)


def test_evaluate_refuses_a_truncated_jpeg_or_skips_it_with_skip_bad(seg_run, tmp_path):
    from training import evaluate

    mask = np.zeros((48, 64), np.uint8)
    mask[5:15, 5:20] = mask[25:40, 30:50] = 255
    root = _folder(tmp_path / "d", {"good": (".png", _rgb()), "cut": (".jpg", None), "mask": (".png", _rgb())},
                   labels={"mask": mask})
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as caught:
        evaluate.main([seg_run, "--data", f"folder:{root}", "--out", str(out)])
    message = str(caught.value.code)
    assert message.startswith("training.evaluate: ") and "cut.jpg: corrupt or truncated image" in message
    assert "\n" not in message and not out.exists()  # nothing half-written
    evaluate.main([seg_run, "--data", f"folder:{root}", "--out", str(out), "--skip-bad"])
    metrics = json.load(open(out / "metrics.json"))
    assert [row["name"] for row in metrics["per_image"]] == ["good"]
    assert [os.path.basename(s["file"]) for s in metrics["skipped_inputs"]] == ["cut.jpg", "mask.png"]
    report = open(out / "report.md").read()
    assert "## Skipped inputs" in report and "cut.jpg" in report and "looks like a binary mask" in report
    evaluate.main([seg_run, "--data", f"folder:{root}", "--out", str(out), "--skip-bad",
                   "--binary-labels", "components", "--bit-depth", "12", "--max-pixels", "2**20"])
    metrics = json.load(open(out / "metrics.json"))
    assert [row["name"] for row in metrics["per_image"]] == ["good", "mask"]
    assert metrics["options"]["input_policy"] == {"max_pixels": 2 ** 20, "bit_depth": 12,
                                                  "binary_labels": "components"}
    with pytest.raises(SystemExit, match=r"training.evaluate: .*/cut.png: 48 x 64 = 0.00307 MP exceeds the "
                                         r"0.0001 MP pixel limit; raise it with --max-pixels$"):
        evaluate.main([seg_run, "--data", f"folder:{root}", "--out", str(out), "--max-pixels", "100"])
    # the run's own split: a bad image of the split is skipped, not "missing"; the run's policy applies
    run = tmp_path / "run"
    os.makedirs(run)
    for name in ("split.json", "model.keras", "thresholds.json"):
        os.symlink(os.path.join(seg_run, name), run / name)
    config = {**json.load(open(os.path.join(seg_run, "config.json"))), "data": f"folder:{root}",
              "binary_labels": "components"}
    json.dump(config, open(run / "config.json", "w"))
    json.dump({"train": [], "val": [], "test": ["cut", "good", "mask"]}, open(tmp_path / "split.json", "w"))
    os.replace(tmp_path / "split.json", run / "split.json")
    with pytest.raises(evaluate.EvaluationError, match=r"cut.jpg: corrupt or truncated image"):
        evaluate.evaluate_run(str(run), log=lambda m: None)
    result = evaluate.evaluate_run(str(run), skip_bad=True, log=lambda m: None)
    assert [row["name"] for row in result["per_image"]] == ["good", "mask"]
    assert [s["name"] for s in result["skipped_inputs"]] == ["cut"]


def test_predict_stops_at_the_first_bad_input_or_skips_and_lists_them(seg_run, tmp_path):
    from kerasnuc.predict import __main__ as cli

    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a_good.png", _rgb())
    _truncate(_write(folder / "b_cut.jpg", _rgb()))
    _png_header(folder / "c_big.png", 30000, 30000)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as caught:
        cli.main([seg_run, str(folder), "--out", str(out), "--format", "labels,csv"])
    message = str(caught.value.code)
    assert message.startswith("kerasnuc.predict: ") and "b_cut.jpg: corrupt or truncated image" in message
    assert "\n" not in message
    assert not [n for n in os.listdir(out) if ".tmp" in n or n.startswith("b_cut")]
    code = cli.main([seg_run, str(folder), "--out", str(out), "--format", "labels,csv", "--skip-bad",
                     "--bit-depth", "auto", "--max-pixels", "2**28"])
    assert code == 0
    skipped = json.load(open(out / "skipped.json"))["skipped"]
    assert [os.path.basename(s["file"]) for s in skipped] == ["b_cut.jpg", "c_big.png"]
    assert "exceeds the 268 MP pixel limit" in skipped[1]["error"]
    assert sorted(os.listdir(out)) == ["a_good_labels.tif", "a_good_nuclei.csv", "skipped.json"]


def test_fit_takes_the_policy_flags_and_refuses_huge_images(tmp_path):
    from training import fit
    from training.config import resolve

    args = fit.build_parser().parse_args(["--bit-depth", "12", "--max-pixels", "1G", "--binary-labels",
                                          "components"])
    config = resolve(overrides={k: v for k, v in vars(args).items() if k not in ("config", "overwrite")})
    assert (config.bit_depth, config.max_pixels, config.binary_labels) == (12, 10 ** 9, "components")
    assert resolve().to_dict()["bit_depth"] == "auto"
    with pytest.raises(ValueError, match="binary_labels must be one of"):
        resolve(overrides={"binary_labels": "merge"})
    root = tmp_path / "big"
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    _png_header(root / "images" / "x.png", 30000, 30000)
    _png_header(root / "labels" / "x.png", 30000, 30000, bit_depth=16)
    with pytest.raises(SystemExit, match=r"training.fit: .*x.png: 30000 x 30000 = 900 MP exceeds the 268 MP"):
        fit.main(["--data", f"folder:{root}", "--out", str(tmp_path / "run"), "--epochs", "1"])
