"""MoNuSeg (Kumar et al. 2017/2020): H&E tiles with Aperio XML nucleus outlines.

Layouts found automatically under ``path``:

* the original download: ``Tissue Images/*.tif`` + ``Annotations/*.xml`` (folder names
  matched case-insensitively, ``_`` for the space also accepted);
* a flat folder holding both the tiles and the XML files (the MoNuSeg test set);
* ``images/*.png`` + ``labels/*.png`` + ``annotations/*.xml.gz`` (``../shared/data/monuseg2018/train``).

Annotations may be ``.xml`` or gzip-compressed ``.xml.gz``. Each ``Region`` is rasterised
with :func:`skimage.draw.polygon` (rows from ``Y``, columns from ``X``) in document order,
region *i* (1-based) getting id *i*; later regions overwrite earlier ones, so ids may have
gaps. This reproduces the shared label PNGs exactly. When an image has both a label image
and an XML file the label image is used; the XML is still counted
(``extra["xml_path"]``, ``extra["xml_regions"]``).
"""

MPP = 0.25
"""Pixel size of the dataset in µm: TCGA slides scanned at 40x (about 0.25 µm/px; Kumar et al. 2017)."""

import gzip
import os
import zlib

import numpy as np

from kerasnuc.data.imageio import DataError, read_image, read_label_image
from kerasnuc.data.types import NucleiImage
from kerasnuc.data.validation import read_or_skip, warn

try:  # defusedxml guards against entity-expansion attacks when it is installed
    from defusedxml import ElementTree as _ET  # type: ignore
except ImportError:  # the standard parser does not fetch external entities
    import xml.etree.ElementTree as _ET

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg")
XML_SUFFIXES = (".xml.gz", ".xml")
_IMAGE_FOLDERS = ("tissue images", "tissue_images", "tissueimages", "images")
_LABEL_FOLDERS = ("labels", "masks")
_XML_FOLDERS = ("annotations", "annotation")


def _parse_xml(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: annotation file not found")
    try:
        if path.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return _ET.parse(handle).getroot()
        return _ET.parse(path).getroot()
    except _ET.ParseError as error:
        raise DataError(f"{path}: malformed XML ({error})") from None
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read annotation file ({error})") from None
    except Exception as error:  # defusedxml's refusals (entities, DTDs)
        raise DataError(f"{path}: refused XML ({type(error).__name__}: {error})") from None


MIN_VERTICES = 3
MAX_COORDINATE = 2.0 ** 24
"""Vertex coordinates beyond this many pixels (about 16.8 million; larger than any slide) are absurd."""
_SKIP_REASONS = (("vertices", f"with fewer than {MIN_VERTICES} vertices"),
                 ("coordinates", "with non-finite or absurd coordinates"),
                 ("outside", "outside the image"))


def read_aperio_regions(path, shape=None):
    """The polygons of an Aperio XML file (``.xml`` or ``.xml.gz``) in document order.

    Returns a list of (V, 2) float64 arrays of (x, y) vertices, one per ``Region``. Regions
    that cannot be drawn (fewer than 3 vertices; non-finite coordinates or beyond
    ``MAX_COORDINATE``; with ``shape`` (H, W), wholly outside the image) come back empty
    (V = 0, so the others keep their ids) and are summarised in one
    :class:`~kerasnuc.data.validation.DataWarning` naming the file and the regions' ids.
    DataError if a vertex lacks X or Y or is not a number, or if none of the regions can be drawn.
    """
    path = os.fspath(path)
    root = _parse_xml(path)
    if root.tag != "Annotations":
        raise DataError(f"{path}: not an Aperio annotation file (root element <{root.tag}>, "
                        f"expected <Annotations>)")
    regions, skipped = [], {key: [] for key, _ in _SKIP_REASONS}
    for number, region in enumerate(root.iter("Region"), start=1):
        points = _region_points(path, number, region)
        problem = _region_problem(points, shape)
        if problem:
            skipped[problem].append(region.get("Id") or str(number))
            points = np.zeros((0, 2), dtype=np.float64)
        regions.append(points)
    _report_skipped(path, len(regions), skipped)
    return regions


def _region_points(path, number, region):
    """(V, 2) float64 vertices of one Region; DataError naming it for a missing or non-numeric X/Y."""
    texts = [(vertex.get("X"), vertex.get("Y")) for vertex in region.iter("Vertex")]
    try:  # fast path: numpy parses the strings (a missing attribute becomes NaN)
        points = np.array(texts, dtype=np.float64).reshape(-1, 2)
        if np.isfinite(points).all():
            return points
    except (TypeError, ValueError):
        points = None
    for vertex in region.iter("Vertex"):  # slow path, to say what is wrong
        for axis in ("X", "Y"):
            if vertex.get(axis) is None:
                raise DataError(f"{path}: region {number} (Id={region.get('Id')}) has a Vertex without {axis}")
            try:
                float(vertex.get(axis))
            except ValueError:
                raise DataError(f"{path}: region {number} (Id={region.get('Id')}) has a non-numeric Vertex "
                                f"X={vertex.get('X')!r} Y={vertex.get('Y')!r}") from None
    if points is None:
        raise DataError(f"{path}: region {number} (Id={region.get('Id')}) has unreadable vertices")
    return points  # 'nan' or 'inf' written out: the caller skips the region


def _region_problem(points, shape):
    """Why a polygon cannot be drawn ('vertices', 'coordinates', 'outside') or None."""
    if len(points) < MIN_VERTICES:
        return "vertices"
    if not np.isfinite(points).all() or np.abs(points).max() > MAX_COORDINATE:
        return "coordinates"
    if shape is not None:
        height, width = shape[:2]
        x, y = points[:, 0], points[:, 1]
        if x.max() < 0 or y.max() < 0 or x.min() > width - 1 or y.min() > height - 1:
            return "outside"
    return None


def _report_skipped(path, total, skipped):
    """One warning per file: 'f.xml: skipped 3 regions (2 with fewer than 3 vertices: ids 5, 9; ...)'."""
    count = sum(len(ids) for ids in skipped.values())
    if not count:
        return
    parts = [f"{len(skipped[key])} {what}: id{'s' if len(skipped[key]) > 1 else ''} "
             f"{', '.join(skipped[key][:10])}{', ...' if len(skipped[key]) > 10 else ''}"
             for key, what in _SKIP_REASONS if skipped[key]]
    summary = f"skipped {count} region{'s' if count > 1 else ''} ({'; '.join(parts)})"
    if count == total:
        raise DataError(f"{path}: none of its {total} regions can be drawn: {summary}")
    warn(f"{path}: {summary}")


def rasterise_regions(regions, shape):
    """Instance labels (H, W) int32 from polygons: region i gets id i, later overwrite earlier."""
    from skimage.draw import polygon

    labels = np.zeros(tuple(int(s) for s in shape), dtype=np.int32)
    for index, points in enumerate(regions, start=1):
        if len(points):
            rows, cols = polygon(points[:, 1], points[:, 0], labels.shape)
            labels[rows, cols] = index
    return labels


def read_aperio_xml(path, shape, return_count=False):
    """Rasterise an Aperio XML file into (H, W) int32 instance labels.

    With ``return_count=True`` returns ``(labels, number of regions)``.
    """
    regions = read_aperio_regions(path, shape)
    labels = rasterise_regions(regions, shape)
    return (labels, len(regions)) if return_count else labels


def count_aperio_regions(path):
    """Number of ``Region`` elements of an Aperio XML file (parses it, no rasterising)."""
    root = _parse_xml(path)
    return sum(1 for _ in root.iter("Region"))


def _xml_stem(entry):
    lower = entry.lower()
    for suffix in XML_SUFFIXES:
        if lower.endswith(suffix):
            return entry[: -len(suffix)]
    return None


def _subfolder(path, names):
    for entry in sorted(os.listdir(path)):
        if entry.lower() in names and os.path.isdir(os.path.join(path, entry)):
            return os.path.join(path, entry)
    return None


def _index(folder, kind):
    files = {}
    if folder is None:
        return files
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if not os.path.isfile(full):
            continue
        if kind == "xml":
            stem = _xml_stem(entry)
        else:
            stem, ext = os.path.splitext(entry)
            stem = stem if ext.lower() in IMAGE_EXTENSIONS else None
        if stem is None:
            continue
        if stem in files:
            raise DataError(f"{folder}: two {kind} files for '{stem}': {os.path.basename(files[stem])} and {entry}")
        files[stem] = full
    return files


def find_files(path):
    """``{stem: (image path, label path or None, xml path or None)}`` of a MoNuSeg folder (sorted)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: MoNuSeg folder not found")
    image_dir = _subfolder(path, _IMAGE_FOLDERS)
    label_dir = _subfolder(path, _LABEL_FOLDERS)
    xml_dir = _subfolder(path, _XML_FOLDERS)
    images = _index(image_dir or path, "image")
    labels = _index(label_dir, "image")
    xmls = _index(xml_dir, "xml")
    if xml_dir is None:  # XML files beside the images (flat folder, or inside the image folder)
        for folder in dict.fromkeys([path, image_dir or path]):
            for stem, xml in _index(folder, "xml").items():
                xmls.setdefault(stem, xml)
    if not images:
        raise DataError(f"{path}: no MoNuSeg images (expected 'Tissue Images/*.tif' + 'Annotations/*.xml', "
                        f"images/ + labels/ [+ annotations/], or .tif and .xml files side by side)")
    for stem, xml in xmls.items():
        if stem not in images:
            raise DataError(f"{xml}: annotation without an image '{stem}.*'")
    return {stem: (images[stem], labels.get(stem), xmls.get(stem)) for stem in sorted(images)}


def read(path, channels="keep", require_labels=True, prefer="labels", count_regions=True, policy=None,
         skipped=None):
    """Read a MoNuSeg folder into NucleiImage records in sorted name order.

    Args:
        prefer: "labels" (use a label image when there is one, the XML otherwise) or
            "xml" (always rasterise the XML when there is one).
        count_regions: parse XML files that are not rasterised to count their regions.
        require_labels: raise DataError for an image with neither labels nor XML.
        policy: the :class:`~kerasnuc.data.validation.InputPolicy` for every image and label.
        skipped: a list: bad images, labels or annotations are noted there and left out.
    """
    if prefer not in ("labels", "xml"):
        raise ValueError(f"prefer must be 'labels' or 'xml', got {prefer!r}")
    records = []
    for stem, files in find_files(path).items():
        record = read_or_skip(skipped, stem, files[0], lambda: _read_one(
            stem, *files, channels, require_labels, prefer, count_regions, policy))
        if record is not None:
            records.append(record)
    return records


def _read_one(stem, image_path, label_path, xml_path, channels, require_labels, prefer, count_regions, policy):
    image = read_image(image_path, channels=channels, policy=policy)
    extra = {}
    labels = None
    if label_path is not None and (prefer == "labels" or xml_path is None):
        labels = read_label_image(label_path, policy=policy)
        if labels.shape != image.shape[:2]:
            raise DataError(f"{label_path}: label size {labels.shape} differs from image size "
                            f"{image.shape[:2]} of {image_path}")
        extra["label_path"] = label_path
    if xml_path is not None:
        extra["xml_path"] = xml_path
        if labels is None:
            labels, extra["xml_regions"] = read_aperio_xml(xml_path, image.shape[:2], return_count=True)
        elif count_regions:
            extra["xml_regions"] = count_aperio_regions(xml_path)
    if labels is None and require_labels:
        raise DataError(f"{image_path}: no label image or XML annotation for '{stem}'")
    return NucleiImage(name=stem, image=image, labels=labels, source=image_path, extra=extra)
