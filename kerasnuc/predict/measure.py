"""The nucleus table: one row per instance, measured with scikit-image's ``regionprops_table``.

Columns are NumPy arrays of equal length, in pixels of the image given (the writers add µm
and µm² columns when the pixel size is known). ``offset`` shifts centroids and boxes into the
coordinates of a larger image, so blocks of a slide report global positions.
"""

import numpy as np

PROPERTIES = ("label", "centroid", "bbox", "area", "perimeter", "eccentricity", "solidity", "intensity_mean")


def measure(labels, image, variance=None, offset=(0, 0)):
    """{column: array} for the instances of ``labels`` (H, W) over ``image`` (H, W, C)."""
    from skimage.measure import regionprops_table

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    raw = regionprops_table(np.asarray(labels, np.int64), intensity_image=image.astype(np.float32),
                            properties=PROPERTIES)
    top, left = offset
    table = {
        "label": raw["label"].astype(np.int64),
        "centroid_x": raw["centroid-1"] + left + 0.5,
        "centroid_y": raw["centroid-0"] + top + 0.5,
        "bbox_x0": raw["bbox-1"] + left, "bbox_y0": raw["bbox-0"] + top,
        "bbox_x1": raw["bbox-3"] + left, "bbox_y1": raw["bbox-2"] + top,
        "area": raw["area"].astype(np.float64),
        "perimeter": raw["perimeter"].astype(np.float64),
        "eccentricity": raw["eccentricity"].astype(np.float64),
        "solidity": raw["solidity"].astype(np.float64),
    }
    for channel in range(image.shape[2]):
        table[f"mean_intensity_{channel}"] = raw[f"intensity_mean-{channel}"].astype(np.float64)
    if variance is not None:
        var = np.asarray(variance, np.float64)
        var = var.mean(axis=-1) if var.ndim == 3 else var
        sums = np.bincount(np.asarray(labels).ravel(), var.ravel(), minlength=int(np.max(labels)) + 1)
        counts = np.bincount(np.asarray(labels).ravel(), minlength=int(np.max(labels)) + 1)
        table["mean_uncertainty"] = sums[table["label"]] / np.maximum(counts[table["label"]], 1)
    return table


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
