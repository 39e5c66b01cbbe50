"""The nucleus table: one row per instance, measured in one vectorised pass (NumPy, SciPy, OpenCV).

Columns are NumPy arrays of equal length, in pixels of the image given (the writers add µm
and µm² columns when the pixel size is known). ``offset`` shifts centroids and boxes into the
coordinates of a larger image, so blocks of a slide report global positions.

What each column means (pixel-corner coordinates: pixel (r, c) covers [c, c + 1] x [r, r + 1]):

- ``centroid_x/y``: mean of the pixel centres; ``bbox_x0/y0/x1/y1``: half-open pixel box.
- ``area``: pixels; ``perimeter``: scikit-image's 4-neighbourhood perimeter
  (``skimage.measure.perimeter``), computed for all nuclei at once; ``eccentricity``: of the
  ellipse with the same second moments (as ``regionprops``).
- ``solidity``: area / area of the convex hull of the nucleus's pixel squares (always <= 1).
- ``mean_intensity_<c>``: mean pixel value per channel; ``mean_uncertainty``: mean
  Monte-Carlo variance (stochastic models).

``measure(..., outlines=True)`` also returns each nucleus's outline (closed ring through
its boundary pixel centres, simplified within one pixel), which the GeoJSON writer uses.
"""

import numpy as np

# skimage.measure.perimeter's weights of the 3x3 border-pixel codes (neighbourhood 4)
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2.0)
_PERIMETER_WEIGHTS[[13, 23]] = (1.0 + np.sqrt(2.0)) / 2.0
_CODES = [(-1, -1, 10), (-1, 0, 2), (-1, 1, 10), (0, -1, 2), (0, 1, 2), (1, -1, 10), (1, 0, 2), (1, 1, 10)]


def measure(labels, image, variance=None, offset=(0, 0), outlines=False, tolerance=1.0):
    """{column: array} for the instances of ``labels`` (H, W) over ``image`` (H, W, C);
    with ``outlines``, (table, {label: ring}) with rings in the block's pixel-corner coordinates."""
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    top, left = offset
    size = int(labels.max(initial=0)) + 1
    rows, cols = np.nonzero(labels)
    values = labels[rows, cols].astype(np.int64)
    count = np.bincount(values, minlength=size).astype(np.float64)
    ids = np.nonzero(count)[0]
    ids = ids[ids > 0]
    area = count[ids]

    def mean_of(weights):
        return np.bincount(values, weights, minlength=size)[ids] / area

    cy, cx = mean_of(rows.astype(np.float64)), mean_of(cols.astype(np.float64))
    # second central moments -> eccentricity of the equivalent ellipse
    myy = mean_of(rows.astype(np.float64) ** 2) - cy ** 2
    mxx = mean_of(cols.astype(np.float64) ** 2) - cx ** 2
    mxy = mean_of(rows.astype(np.float64) * cols) - cx * cy
    half_sum, root = (myy + mxx) / 2, np.sqrt(((myy - mxx) / 2) ** 2 + mxy ** 2)
    major, minor = half_sum + root, np.maximum(half_sum - root, 0.0)
    eccentricity = np.where(major > 0, np.sqrt(np.clip(1.0 - minor / np.where(major > 0, major, 1), 0, 1)), 0.0)
    boxes = ndi.find_objects(labels.astype(np.int64, copy=False))
    bbox = np.array([[b[0].start, b[1].start, b[0].stop, b[1].stop] for b in (boxes[i - 1] for i in ids)],
                    np.float64).reshape(-1, 4)
    solidity, rings = _hulls_and_outlines(labels, ids, boxes, area, outlines, tolerance)
    table = {
        "label": ids.astype(np.int64),
        "centroid_x": cx + left + 0.5,
        "centroid_y": cy + top + 0.5,
        "bbox_x0": bbox[:, 1] + left, "bbox_y0": bbox[:, 0] + top,
        "bbox_x1": bbox[:, 3] + left, "bbox_y1": bbox[:, 2] + top,
        "area": area,
        "perimeter": _perimeters(labels, size)[ids],
        "eccentricity": eccentricity,
        "solidity": solidity,
    }
    pixels = image[rows, cols].astype(np.float64)
    for channel in range(image.shape[2]):
        table[f"mean_intensity_{channel}"] = mean_of(pixels[:, channel])
    if variance is not None:
        var = np.asarray(variance, np.float64)
        var = var.mean(axis=-1) if var.ndim == 3 else var
        table["mean_uncertainty"] = mean_of(var[rows, cols])
    return (table, rings) if outlines else table


def _perimeters(labels, size):
    """skimage.measure.perimeter (neighbourhood 4) of every label at once, indexed by label."""
    height, width = labels.shape
    padded = np.pad(labels, 1)
    inner = padded[1:-1, 1:-1]

    def shifted(array, dr, dc):
        return array[1 + dr:height + 1 + dr, 1 + dc:width + 1 + dc]

    interior = inner > 0
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        interior &= shifted(padded, dr, dc) == inner
    border = (inner > 0) & ~interior
    border_labels = np.pad(np.where(border, inner, 0), 1)
    code = border.astype(np.int64)
    for dr, dc, weight in _CODES:
        code += weight * (shifted(border_labels, dr, dc) == inner)
    return np.bincount(inner[border], _PERIMETER_WEIGHTS[code[border]], minlength=size)


def _hulls_and_outlines(labels, ids, boxes, area, outlines, tolerance):
    """(solidity per id, {id: ring} or None): one OpenCV contour per nucleus gives both."""
    import cv2

    solidity = np.ones(len(ids))
    rings = {} if outlines else None
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    for k, index in enumerate(ids):
        box = boxes[index - 1]
        r, c = box[0].start, box[1].start
        mask = np.zeros((box[0].stop - r + 2, box[1].stop - c + 2), np.uint8)
        mask[1:-1, 1:-1] = labels[box] == index
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if not contours:
            continue
        points = np.concatenate(contours).reshape(-1, 2).astype(np.float32)
        hull = cv2.convexHull((points[:, None, :] + corners[None].astype(np.float32)).reshape(-1, 1, 2))
        solidity[k] = min(1.0, area[k] / max(cv2.contourArea(hull), 1.0))
        if outlines:
            rings[int(index)] = outline(contours, (r - 1, c - 1), tolerance)
    return solidity, rings


def outline(contours, origin, tolerance=1.0):
    """Closed ring [[x, y], ...] of the largest of a mask's OpenCV ``contours`` (pixel indices
    of a crop whose pixel (0, 0) is image pixel ``origin`` (row, col)), simplified within
    ``tolerance`` pixels, through boundary pixel centres in pixel-corner coordinates."""
    import cv2

    contour = max(contours, key=cv2.contourArea)
    contour = cv2.approxPolyDP(contour, tolerance, True).reshape(-1, 2).astype(np.float64)
    if len(contour) < 3:  # a one- or two-pixel nucleus: its pixel squares' outline
        contour = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64) - 0.5 + contour[:1]
    ring = (contour + [origin[1] + 0.5, origin[0] + 0.5]).round(2).tolist()
    return ring + [ring[0]]


def empty_table(channels, classes=False, uncertainty=False):
    columns = ["id", "centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "area",
               "perimeter", "eccentricity", "solidity", *[f"mean_intensity_{c}" for c in range(channels)]]
    table = {name: np.zeros(0) for name in columns}
    table["id"] = np.zeros(0, np.uint32)
    if uncertainty:
        table["mean_uncertainty"] = np.zeros(0)
    if classes:
        table["class"] = np.zeros(0, object)
        table["class_probability"] = np.zeros(0)
    return table


def concat_tables(tables):
    """One table from the tables of several blocks (same columns), ``id`` first."""
    names = ["id"] + [name for name in tables[0] if name != "id"]
    return {name: np.concatenate([t[name] for t in tables]) for name in names}
