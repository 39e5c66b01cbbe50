"""Dataset readers in their native formats: DSB 2018 (folders, RLE CSV), MoNuSeg, CRCHistoPhenotypes, PanNuke.

Fixtures are written into tmp_path in exactly the native formats; the real-data checks
use ../shared/data beside the repository and are skipped when it is absent.
"""

import gzip
import os

import cv2
import numpy as np
import pytest
import scipy.io
import tifffile

from kerasnuc.data import available_formats, load_dataset
from kerasnuc.data.imageio import DataError, read_label_image
from kerasnuc.data.readers import crchisto, dsb2018, monuseg, pannuke, rle

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA),
                                reason=f"real datasets not found at {os.path.abspath(DATA)} (../shared/data)")


def same_partition(a, b):
    """True if two label images hold the same instances, whatever their ids."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_all_formats_registered():
    assert {"folder", "dsb2018", "monuseg", "crchisto", "pannuke"} <= set(available_formats())


# -- RLE -------------------------------------------------------------------------------------------

def test_rle_is_one_based_and_column_major():
    mask = np.zeros((3, 4), bool)
    mask[0:2, 0] = True  # pixels 1, 2 (top to bottom in column 0)
    mask[1, 1] = True  # pixel 5 (second column, second row)
    mask[:, 3] = True  # pixels 10..12
    assert rle.rle_encode(mask) == "1 2 5 1 10 3"
    np.testing.assert_array_equal(rle.rle_decode("1 2 5 1 10 3", (3, 4)), mask)
    assert rle.rle_encode(np.zeros((3, 4), bool)) == ""
    assert not rle.rle_decode("", (3, 4)).any()


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (31, 17), (64, 64)]:
        for density in (0.0, 0.3, 0.9, 1.0):
            mask = rng.random(shape) < density
            assert rle.rle_decode(rle.rle_encode(mask), shape).dtype == bool
            np.testing.assert_array_equal(rle.rle_decode(rle.rle_encode(mask), shape), mask)
    labels = rng.integers(0, 6, size=(23, 29))
    encoded = rle.encode_labels(labels)
    assert sorted(encoded) == sorted(set(np.unique(labels)) - {0})
    for i, text in encoded.items():
        np.testing.assert_array_equal(rle.rle_decode(text, labels.shape), labels == i)


def test_rle_csv_write_read(tmp_path):
    a = np.zeros((6, 9), np.int32)
    a[1:3, 1:4] = 4
    a[4:6, 6:9] = 2
    a[0, 8] = 7
    empty = np.zeros((5, 5), np.int32)
    path = tmp_path / "labels.csv"
    rle.write_rle_csv(path, {"b": a, "a": empty})
    assert sorted(os.listdir(tmp_path)) == ["labels.csv"]  # no temporary file left
    lines = path.read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels,Height,Width"
    assert lines[1] == "a,,5,5" and len(lines) == 5
    decoded = rle.read_rle_csv(path)
    assert list(decoded) == ["a", "b"]
    assert decoded["a"].shape == (5, 5) and not decoded["a"].any()
    assert decoded["b"].dtype == np.int32 and same_partition(decoded["b"], a)
    assert set(np.unique(decoded["b"])) == {0, 1, 2, 3}


def test_rle_csv_without_sizes_takes_shapes_from_images(tmp_path):
    labels = np.zeros((7, 11), np.int32)
    labels[2:5, 3:9] = 1
    (tmp_path / "x1" / "images").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "x1" / "images" / "x1.png"), np.zeros((7, 11), np.uint8))
    path = tmp_path / "train_labels.csv"
    path.write_text(f"ImageId,EncodedPixels\nx1,{rle.rle_encode(labels > 0)}\n")
    np.testing.assert_array_equal(rle.read_rle_csv(path, image_dir=tmp_path)["x1"], labels)
    with pytest.raises(DataError, match="train_labels.csv.*x1"):
        rle.read_rle_csv(path)
    records = dsb2018.read(path)  # layout (c): images beside the CSV in Kaggle's layout
    assert [r.name for r in records] == ["x1"] and same_partition(records[0].labels, labels)


@pytest.mark.parametrize("body, message", [
    ("a,1 2 3,4,4\n", "line 2.*odd number"),
    ("a,15 3,4,4\n", "line 2.*past the end"),
    ("a,0 3,4,4\n", "line 2.*below 1"),
    ("a,1 x,4,4\n", "line 2.*integers"),
    ("a,1 2,4,four\n", "line 2.*not integers"),
    ("a,1 2,4,4\na,3 1,5,4\n", "line 3.*size"),
])
def test_rle_csv_errors_name_file_and_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text("ImageId,EncodedPixels,Height,Width\n" + body)
    with pytest.raises(DataError, match=f"bad.csv.*{message}"):
        rle.read_rle_csv(path)


def test_rle_csv_bad_header(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,pixels\na,1 2\n")
    with pytest.raises(DataError, match="bad.csv.*ImageId"):
        rle.read_rle_csv(path)
    with pytest.raises(DataError, match="missing.csv.*not found"):
        rle.read_rle_csv(tmp_path / "missing.csv")


@needs_data
def test_rle_solution_reproduces_stage1_test_labels():
    folder = os.path.join(DATA, "dsb2018", "stage1_test")
    decoded = rle.read_rle_csv(os.path.join(folder, "stage1_solution.csv"))
    assert len(decoded) == 65
    total = 0
    for image_id, labels in decoded.items():
        expected = read_label_image(os.path.join(folder, "labels", image_id + ".png"))
        assert same_partition(labels, expected), image_id
        total += len(np.unique(labels)) - 1
        # and the encoding of the shipped labels decodes back to them
        for i, text in list(rle.encode_labels(expected).items())[:3]:
            np.testing.assert_array_equal(rle.rle_decode(text, expected.shape), expected == i)
    assert total == 4152
    records = load_dataset("dsb2018:" + os.path.join(folder, "stage1_solution.csv"))
    assert len(records) == 65 and records[0].image.shape[:2] == records[0].labels.shape


# -- DSB 2018 folders --------------------------------------------------------------------------

def _mask(shape, rows, cols):
    mask = np.zeros(shape, np.uint8)
    mask[rows, cols] = 255
    return mask


def write_kaggle_dsb(root):
    """Two images in Kaggle's layout; returns {id: expected labels}."""
    expected = {}
    shape = (20, 30)
    # image "b1": RGBA grey (R=G=B, alpha 255) with three masks, the last overlapping the second.
    rgba = np.zeros(shape + (4,), np.uint8)
    rgba[..., :3] = np.arange(30, dtype=np.uint8)[None, :, None]
    rgba[..., 3] = 255
    masks = {"m2.png": _mask(shape, slice(2, 6), slice(2, 8)),
             "m1.png": _mask(shape, slice(10, 15), slice(3, 9)),
             "m3.png": _mask(shape, slice(4, 8), slice(6, 12))}
    labels = np.zeros(shape, np.int32)
    labels[10:15, 3:9] = 1  # m1 (sorted file order)
    labels[2:6, 2:8] = 2  # m2
    labels[4:8, 6:12] = 3  # m3 overwrites m2 where they overlap
    expected["b1"] = labels
    (root / "b1" / "images").mkdir(parents=True)
    (root / "b1" / "masks").mkdir()
    cv2.imwrite(str(root / "b1" / "images" / "b1.png"), rgba)
    for name, mask in masks.items():
        cv2.imwrite(str(root / "b1" / "masks" / name), mask)
    # image "a0": RGB colour, one mask
    rgb = np.random.default_rng(1).integers(0, 255, size=(16, 12, 3), dtype=np.uint8)
    (root / "a0" / "images").mkdir(parents=True)
    (root / "a0" / "masks").mkdir()
    cv2.imwrite(str(root / "a0" / "images" / "a0.png"), rgb[..., ::-1])
    cv2.imwrite(str(root / "a0" / "masks" / "only.png"), _mask((16, 12), slice(0, 16), slice(5, 6)))
    expected["a0"] = np.zeros((16, 12), np.int32)
    expected["a0"][:, 5] = 1
    return expected, rgb


def test_dsb_kaggle_folder_layout(tmp_path):
    expected, rgb = write_kaggle_dsb(tmp_path)
    assert dsb2018.detect_layout(tmp_path) == "kaggle"
    records = load_dataset(f"dsb2018:{tmp_path}")
    assert [r.name for r in records] == ["a0", "b1"]
    a0, b1 = records
    np.testing.assert_array_equal(a0.image, rgb)
    assert b1.image.shape == (20, 30, 1)  # alpha dropped, grey kept as one channel
    for record in records:
        assert record.labels.dtype == np.int32
        np.testing.assert_array_equal(record.labels, expected[record.name])
    assert b1.source.endswith(os.path.join("b1", "images", "b1.png"))


def test_dsb_kaggle_errors(tmp_path):
    write_kaggle_dsb(tmp_path)
    cv2.imwrite(str(tmp_path / "b1" / "masks" / "m9.png"), np.zeros((21, 30), np.uint8))
    with pytest.raises(DataError, match=r"m9.png.*size"):
        dsb2018.read(tmp_path)
    os.remove(tmp_path / "b1" / "masks" / "m9.png")
    (tmp_path / "b1" / "masks" / "m0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"m0.png.*not a readable"):
        dsb2018.read(tmp_path)
    os.remove(tmp_path / "b1" / "masks" / "m0.png")
    (tmp_path / "c2" / "images").mkdir(parents=True)  # a test image without masks
    cv2.imwrite(str(tmp_path / "c2" / "images" / "c2.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"c2.*masks"):
        dsb2018.read(tmp_path)
    records = dsb2018.read(tmp_path, require_labels=False)
    assert [r.name for r in records] == ["a0", "b1", "c2"] and records[2].labels is None
    with pytest.raises(DataError, match="not a DSB 2018 layout"):
        dsb2018.read(tmp_path / "b1" / "masks")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"dsb2018:{tmp_path / 'nowhere'}")


def test_dsb_labelled_layout_with_images_elsewhere(tmp_path):
    corrected = tmp_path / "stage1_train"
    original = tmp_path / "stage1_train_original"
    for folder in (corrected / "images", original / "images", original / "labels", corrected / "labels"):
        folder.mkdir(parents=True)
    labels = {}
    for i, stem in enumerate(["s0", "s1", "s2"]):
        lab = np.zeros((10, 10), np.uint16)
        lab[i:i + 3, 2:5] = 1
        lab[6:9, 6:9] = 2
        labels[stem] = lab
        cv2.imwrite(str(original / "labels" / f"{stem}.png"), lab)
    for stem in ("s0", "s2"):  # shared images live in the corrected set
        cv2.imwrite(str(corrected / "images" / f"{stem}.png"), np.full((10, 10), 7, np.uint8))
        cv2.imwrite(str(corrected / "labels" / f"{stem}.png"), labels[stem])
    cv2.imwrite(str(original / "images" / "s1.png"), np.full((10, 10), 9, np.uint8))
    records = dsb2018.read(original)
    assert [r.name for r in records] == ["s0", "s1", "s2"]
    assert records[1].image[0, 0, 0] == 9 and records[0].image[0, 0, 0] == 7
    assert records[0].source == str(corrected / "images" / "s0.png")
    for record in records:
        np.testing.assert_array_equal(record.labels, labels[record.name])
    assert len(dsb2018.read(corrected)) == 2  # plain images/ + labels/ (labelled_folder)
    os.remove(corrected / "images" / "s2.png")
    with pytest.raises(DataError, match=r"s2.png.*no image 's2"):
        dsb2018.read(original)


# -- MoNuSeg -----------------------------------------------------------------------------------

REGIONS = [  # (x, y) vertices; region 2 overlaps region 1, region 3 is empty
    [(5, 2), (15, 2), (15, 8), (5, 8)],
    [(12, 4), (25, 4), (25, 12), (12, 12)],
    [],
    [(30.5, 20.2), (38.1, 22.7), (34.3, 30.9)],
]


def aperio_xml(regions):
    body = []
    for number, vertices in enumerate(regions, start=1):
        points = "".join(f'<Vertex X="{x:.6f}" Y="{y}"/>' for x, y in vertices)
        body.append(f'<Region Id="{number}" Type="0"><Attributes/><Vertices>{points}</Vertices></Region>')
    return ('<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Attributes>'
            '<Attribute Name="Description" Id="0" Value=""/></Attributes><Regions><RegionAttributeHeaders>'
            '<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/></RegionAttributeHeaders>'
            + "".join(body) + "</Regions></Annotation></Annotations>")


def expected_regions(shape):
    from skimage.draw import polygon

    labels = np.zeros(shape, np.int32)
    for number, vertices in enumerate(REGIONS, start=1):
        if vertices:
            v = np.array(vertices, float)
            rows, cols = polygon(v[:, 1], v[:, 0], shape)
            labels[rows, cols] = number
    return labels


TILE = np.random.default_rng(2).integers(0, 255, size=(36, 44, 3), dtype=np.uint8)


def test_monuseg_original_layout_tiff_and_xml(tmp_path):
    (tmp_path / "Tissue Images").mkdir()
    (tmp_path / "Annotations").mkdir()
    tifffile.imwrite(tmp_path / "Tissue Images" / "TCGA-1.tif", TILE, photometric="rgb")
    (tmp_path / "Annotations" / "TCGA-1.xml").write_text(aperio_xml(REGIONS))
    records = load_dataset(f"monuseg:{tmp_path}")
    assert len(records) == 1
    record = records[0]
    assert record.name == "TCGA-1"
    np.testing.assert_array_equal(record.image, TILE)
    labels = record.labels
    np.testing.assert_array_equal(labels, expected_regions(TILE.shape[:2]))
    assert labels[3, 12] == 1 and labels[12, 3] == 0  # rows from Y, columns from X
    assert labels[6, 14] == 2  # the later region overwrites the earlier one
    assert set(np.unique(labels)) == {0, 1, 2, 4}  # the empty region 3 leaves a gap
    assert record.extra["xml_regions"] == 4
    lab, count = monuseg.read_aperio_xml(tmp_path / "Annotations" / "TCGA-1.xml", (36, 44), return_count=True)
    assert count == 4 and np.array_equal(lab, labels)


def test_monuseg_flat_folder_xml_gz(tmp_path):
    tifffile.imwrite(tmp_path / "TCGA-2.tif", TILE, photometric="rgb")
    with gzip.open(tmp_path / "TCGA-2.xml.gz", "wt") as handle:
        handle.write(aperio_xml(REGIONS[:2]))
    cv2.imwrite(str(tmp_path / "TCGA-3.png"), TILE[..., ::-1])
    (tmp_path / "TCGA-3.xml").write_text(aperio_xml(REGIONS[3:]))
    records = monuseg.read(tmp_path)
    assert [r.name for r in records] == ["TCGA-2", "TCGA-3"]
    assert set(np.unique(records[0].labels)) == {0, 1, 2}
    assert records[0].extra["xml_regions"] == 2
    assert set(np.unique(records[1].labels)) == {0, 1}
    np.testing.assert_array_equal(records[1].image, TILE)


def test_monuseg_prefers_label_png(tmp_path):
    for folder in ("images", "labels", "annotations"):
        (tmp_path / folder).mkdir()
    cv2.imwrite(str(tmp_path / "images" / "T.png"), TILE[..., ::-1])
    png = np.zeros(TILE.shape[:2], np.uint16)
    png[1:4, 1:4] = 9
    cv2.imwrite(str(tmp_path / "labels" / "T.png"), png)
    with gzip.open(tmp_path / "annotations" / "T.xml.gz", "wt") as handle:
        handle.write(aperio_xml(REGIONS))
    record, = monuseg.read(tmp_path)
    np.testing.assert_array_equal(record.labels, png)
    assert record.extra["xml_regions"] == 4
    record, = monuseg.read(tmp_path, prefer="xml")
    np.testing.assert_array_equal(record.labels, expected_regions(TILE.shape[:2]))


def test_monuseg_errors_name_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "A.tif", TILE, photometric="rgb")
    (tmp_path / "A.xml").write_text(aperio_xml(REGIONS)[:-20])
    with pytest.raises(DataError, match=r"A.xml: malformed XML"):
        monuseg.read(tmp_path)
    (tmp_path / "A.xml").write_text(aperio_xml(REGIONS).replace('Y="8"', "", 1))
    with pytest.raises(DataError, match=r"A.xml: region 1 .*without Y"):
        monuseg.read(tmp_path)
    (tmp_path / "A.xml").write_text("<Root><Region/></Root>")
    with pytest.raises(DataError, match=r"A.xml: not an Aperio"):
        monuseg.read(tmp_path)
    os.remove(tmp_path / "A.xml")
    (tmp_path / "A.xml.gz").write_bytes(gzip.compress(aperio_xml(REGIONS).encode())[:50])
    with pytest.raises(DataError, match=r"A.xml.gz"):
        monuseg.read(tmp_path)
    os.remove(tmp_path / "A.xml.gz")
    with pytest.raises(DataError, match=r"A.tif: no label image or XML"):
        monuseg.read(tmp_path)
    (tmp_path / "B.xml").write_text(aperio_xml(REGIONS))
    with pytest.raises(DataError, match=r"B.xml: annotation without an image"):
        monuseg.read(tmp_path)
    with pytest.raises(DataError, match="MoNuSeg folder not found"):
        monuseg.read(tmp_path / "missing")


@needs_data
def test_monuseg_xml_reproduces_shared_labels():
    root = os.path.join(DATA, "monuseg2018", "train")
    files = monuseg.find_files(root)
    with_xml = {stem: f for stem, f in files.items() if f[2]}
    assert len(files) == 30 and len(with_xml) == 13
    regions = 0
    for stem, (_, label_path, xml_path) in with_xml.items():
        expected = read_label_image(label_path)
        labels, count = monuseg.read_aperio_xml(xml_path, expected.shape, return_count=True)
        np.testing.assert_array_equal(labels, expected, err_msg=stem)
        regions += count
    assert regions == 4951


# -- CRCHistoPhenotypes ------------------------------------------------------------------------

CRC = {  # 1-based (x, y) as MATLAB stores them
    "img2": {"detection": [[10, 20], [30.5, 5], [0.3, 12]],  # the last lies just outside the image
             "epithelial": [[10, 20]], "inflammatory": [], "fibroblast": [[30.5, 5], [0.3, 12]],
             "others": []},
    "img10": {"detection": [[1, 1]], "epithelial": [], "inflammatory": [[1, 1]], "fibroblast": [],
              "others": []},
}


def _savemat(path, points):
    array = np.asarray(points, np.float64).reshape(-1, 2) if points else np.zeros((0, 2), np.uint8)
    scipy.io.savemat(str(path), {"detection": array})


def write_crc_original(root):
    images = {}
    for k, (name, content) in enumerate(CRC.items()):
        det = root / "Detection" / name
        cls = root / "Classification" / name
        det.mkdir(parents=True)
        cls.mkdir(parents=True)
        image = np.full((40, 50, 3), 40 * k + 10, np.uint8)
        image[..., 1] = 3
        images[name] = image
        cv2.imwrite(str(det / f"{name}.bmp"), image[..., ::-1])
        cv2.imwrite(str(cls / f"{name}.bmp"), image[..., ::-1])
        _savemat(det / f"{name}_detection.mat", content["detection"])
        for cname in crchisto.CLASS_NAMES:
            _savemat(cls / f"{name}_{cname}.mat", content[cname])
    return images


def _check_crc(records, images):
    assert [r.name for r in records] == ["img2", "img10"]  # natural order
    for record in records:
        content = CRC[record.name]
        np.testing.assert_array_equal(record.image, images[record.name])
        assert record.labels is None
        np.testing.assert_allclose(record.points, np.array(content["detection"], float) - 1)
        classified = [p for c in crchisto.CLASS_NAMES for p in content[c]]
        np.testing.assert_allclose(record.extra["class_points"], np.array(classified, float).reshape(-1, 2) - 1)
        expected = [i for i, c in enumerate(crchisto.CLASS_NAMES) for _ in content[c]]
        np.testing.assert_array_equal(record.classes, expected)
        assert record.class_names == crchisto.CLASS_NAMES
    assert records[0].points[2, 0] == pytest.approx(-0.7)  # kept, not dropped


def test_crchisto_original_layout(tmp_path):
    images = write_crc_original(tmp_path)
    _check_crc(load_dataset(f"crchisto:{tmp_path}"), images)


def test_crchisto_shared_layout(tmp_path):
    (tmp_path / "images").mkdir()
    images = {}
    for k, (name, content) in enumerate(CRC.items()):
        image = np.full((40, 50, 3), 40 * k + 10, np.uint8)
        image[..., 1] = 3
        images[name] = image
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), image[..., ::-1])
        folder = tmp_path / "annotations" / name
        folder.mkdir(parents=True)
        for key in ("detection",) + crchisto.CLASS_NAMES:
            _savemat(folder / f"{name}_{key}.mat", content[key])
    _check_crc(crchisto.read(tmp_path), images)


def test_crchisto_errors_name_the_file(tmp_path):
    write_crc_original(tmp_path)
    mat = tmp_path / "Detection" / "img2" / "img2_detection.mat"
    scipy.io.savemat(str(mat), {"points": np.ones((2, 2))})
    with pytest.raises(DataError, match=r"img2_detection.mat: no variable 'detection'"):
        crchisto.read(tmp_path)
    scipy.io.savemat(str(mat), {"detection": np.ones((2, 3))})
    with pytest.raises(DataError, match=r"img2_detection.mat: .*K x 2"):
        crchisto.read(tmp_path)
    mat.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"img2_detection.mat: cannot read"):
        crchisto.read(tmp_path)
    os.remove(mat)
    with pytest.raises(DataError, match=r"img2_detection.mat: annotation file not found"):
        crchisto.read(tmp_path)
    _savemat(mat, CRC["img2"]["detection"])
    os.remove(tmp_path / "Classification" / "img10" / "img10_others.mat")
    with pytest.raises(DataError, match=r"img10_others.mat: classification file missing"):
        crchisto.read(tmp_path)
    with pytest.raises(DataError, match="not a CRCHistoPhenotypes layout"):
        crchisto.read(tmp_path / "Classification")


# -- PanNuke -----------------------------------------------------------------------------------

def write_pannuke(root, n=3, types_dtype="U"):
    """A fold in the release layout: Fold 1/images/fold1/{images,types}.npy + Fold 1/masks/fold1/masks.npy."""
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, size=(n, 256, 256, 3))
    masks = np.zeros((n, 256, 256, 6))
    masks[0, 10:20, 10:30, 0] = 5  # neoplastic
    masks[0, 40:50, 40:44, 0] = 7  # neoplastic
    masks[0, 100:111, 60:71, 2] = 9  # connective
    masks[0, 200:202, 0:4, 4] = 5  # epithelial, same id as a neoplastic nucleus
    masks[1, 0:256, 0:1, 1] = 3  # inflammatory
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    img_dir = root / "Fold 1" / "images" / "fold1"
    mask_dir = root / "Fold 1" / "masks" / "fold1"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    np.save(img_dir / "images.npy", images)
    np.save(mask_dir / "masks.npy", masks)
    tissues = ["Breast", "Colon", "Kidney"][:n]
    np.save(img_dir / "types.npy", np.array(tissues, dtype=object if types_dtype == "O" else "U"),
            allow_pickle=types_dtype == "O")
    return images, masks, tissues


def test_pannuke_fold_layout(tmp_path):
    images, _, tissues = write_pannuke(tmp_path)
    records = load_dataset(f"pannuke:{tmp_path}")
    assert [r.name for r in records] == ["fold1_0000", "fold1_0001", "fold1_0002"]
    r0, r1, r2 = records
    assert r0.image.dtype == np.uint8 and r0.image.shape == (256, 256, 3)
    np.testing.assert_array_equal(r0.image, np.clip(np.round(images[0]), 0, 255).astype(np.uint8))
    assert r0.labels.dtype == np.int32
    assert r0.extra["instance_classes"] == {1: 0, 2: 0, 3: 2, 4: 4}
    expected = np.zeros((256, 256), np.int32)
    expected[10:20, 10:30] = 1
    expected[40:50, 40:44] = 2
    expected[100:111, 60:71] = 3
    expected[200:202, 0:4] = 4
    np.testing.assert_array_equal(r0.labels, expected)
    np.testing.assert_allclose(r0.points, [[19.5, 14.5], [41.5, 44.5], [65, 105], [1.5, 200.5]])
    np.testing.assert_array_equal(r0.classes, [0, 0, 2, 4])
    assert r0.class_names[4] == "epithelial"
    assert r1.extra["instance_classes"] == {1: 1} and r1.labels.sum() == 256
    assert r2.labels.max() == 0 and r2.points.shape == (0, 2) and len(r2.classes) == 0
    assert [r.extra["tissue"] for r in records] == tissues
    assert len(pannuke.read(tmp_path / "Fold 1" / "images" / "fold1", indices=[1])) == 1


def test_pannuke_object_types_and_errors(tmp_path):
    write_pannuke(tmp_path, n=2, types_dtype="O")
    with pytest.warns(UserWarning, match="types.npy.*pickled"):
        records = pannuke.read(tmp_path)
    assert records[0].extra["tissue"] is None
    assert [r.extra["tissue"] for r in pannuke.read(tmp_path, allow_pickle=True)] == ["Breast", "Colon"]
    mask_path = tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy"
    np.save(mask_path, np.zeros((2, 256, 128, 6)))
    with pytest.raises(DataError, match=r"masks.npy: shape .* does not match"):
        pannuke.read(tmp_path)
    os.remove(mask_path)
    with pytest.raises(DataError, match=r"images.npy: no masks.npy"):
        pannuke.read(tmp_path)
    with pytest.raises(DataError, match="no PanNuke images.npy"):
        pannuke.read(tmp_path / "Fold 1" / "masks")
