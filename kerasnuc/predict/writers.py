"""Outputs people load elsewhere: instance labels, QuPath GeoJSON, a CSV of the nucleus table, an overlay.

Every file is written to a temporary name beside its target and renamed when complete, so
a crash never leaves half a file. Coordinates are pixels of the image given, shifted by
``origin`` and scaled by ``downsample`` into level-0 pixels of a slide.
"""

import csv
import json
import os
import uuid

import numpy as np

FORMATS = ("labels", "geojson", "csv", "overlay")

# QuPath-like class colours, cycled
COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 200, 0), (160, 0, 160), (0, 200, 200), (128, 128, 128)]


def _atomic(path, write):
    """Call ``write(tmp_path)``, then rename the temporary file to ``path``."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_labels(path, labels):
    """uint32 instance labels: TIFF (.tif/.tiff; tiled, zlib) or 16-bit PNG (at most 65535 nuclei)."""
    labels = np.asarray(labels)
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        def write(tmp):
            big = labels.size > 4096 * 4096
            tifffile.imwrite(tmp, labels.astype(np.uint32), compression="zlib",
                             tile=(256, 256) if min(labels.shape) >= 256 else None, bigtiff=big)
        return _atomic(path, write)
    import cv2

    if labels.max(initial=0) > 65535:
        raise ValueError(f"{path}: {int(labels.max())} nuclei do not fit a 16-bit PNG; write .tif")

    def write(tmp):
        if not cv2.imwrite(tmp, labels.astype(np.uint16)):
            raise OSError(f"{path}: could not write PNG")
    return _atomic(path, write)


def polygons(labels, table_ids, offset=(0, 0), tolerance=1.0):
    """{id: closed ring [[x, y], ...]} of the outer contour of each instance, simplified within
    ``tolerance`` pixels (OpenCV), in pixel-corner coordinates shifted by ``offset`` (x, y)."""
    import cv2
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    rings = {}
    slices = ndi.find_objects(labels.astype(np.int64))
    wanted = set(int(i) for i in table_ids)
    for index, box in enumerate(slices, 1):
        if box is None or index not in wanted:
            continue
        r, c = box[0].start, box[1].start
        mask = np.pad((labels[box] == index).astype(np.uint8), 1)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if not contours:
            continue
        contour = max(contours, key=cv2.contourArea)
        contour = cv2.approxPolyDP(contour, tolerance, True).reshape(-1, 2).astype(np.float64)
        if len(contour) < 3:
            contour = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64) + contour[:1]
        # pixel centres (c - 1 for the pad) to corners (+0.5): the ring goes round the pixels
        points = contour + [c - 1 + 0.5 + offset[0], r - 1 + 0.5 + offset[1]]
        ring = points.round(2).tolist()
        rings[index] = ring + [ring[0]]
    return rings


def measurement_columns(table):
    return [name for name in table if name not in ("id", "class")]


def write_geojson(path, labels, table, mpp=None, offset=(0, 0), downsample=1.0, class_names=None):
    """A QuPath FeatureCollection: one detection per nucleus, polygon in level-0 pixels."""
    rings = polygons(labels, table["id"])
    names = list(class_names or sorted(set(table.get("class", []))))
    features = []
    for row in range(len(table["id"])):
        nucleus = int(table["id"][row])
        if nucleus not in rings:
            continue
        ring = (np.asarray(rings[nucleus]) * downsample + np.asarray(offset, np.float64)).round(2).tolist()
        measurements = {name: float(table[name][row]) for name in measurement_columns(table)}
        if mpp:
            measurements["area_um2"] = measurements["area"] * (mpp * downsample) ** 2
            measurements["perimeter_um"] = measurements["perimeter"] * mpp * downsample
        properties = {"objectType": "detection", "measurements": measurements}
        if "class" in table:
            name = str(table["class"][row])
            colour = COLOURS[names.index(name) % len(COLOURS)] if name in names else COLOURS[-1]
            properties["classification"] = {"name": name, "color": list(colour)}
        features.append({"type": "Feature", "id": str(uuid.uuid4()),
                         "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties})
    collection = {"type": "FeatureCollection", "features": features}

    def write(tmp):
        with open(tmp, "w") as handle:
            json.dump(collection, handle)
    return _atomic(path, write)


def write_table_csv(path, table, mpp=None):
    """The nucleus table, one row per nucleus; µm / µm² columns when the pixel size is known."""
    columns = list(table)
    extra = ["area_um2", "perimeter_um", "centroid_x_um", "centroid_y_um"] if mpp else []

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns + extra)
            for row in range(len(table["id"])):
                values = [table[name][row] for name in columns]
                values = [f"{v:.4f}" if isinstance(v, (float, np.floating)) else v for v in values]
                if mpp:
                    values += [f"{table['area'][row] * mpp ** 2:.4f}", f"{table['perimeter'][row] * mpp:.4f}",
                               f"{table['centroid_x'][row] * mpp:.4f}", f"{table['centroid_y'][row] * mpp:.4f}"]
                writer.writerow(values)
    return _atomic(path, write)


def write_overlay(path, image, labels, max_side=4096):
    """The image with nucleus outlines (magenta), downscaled so its longer side is at most ``max_side``."""
    import cv2
    from skimage.segmentation import find_boundaries

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    rgb = np.repeat(image[..., :1], 3, axis=-1) if image.shape[2] == 1 else image[..., :3]
    rgb = rgb.astype(np.uint8)
    labels = np.asarray(labels)
    step = max(1, int(np.ceil(max(labels.shape) / max_side)))
    if step > 1:
        rgb, labels = rgb[::step, ::step], labels[::step, ::step]
    out = rgb.copy()
    out[find_boundaries(labels, mode="inner")] = (255, 0, 255)

    def write(tmp):
        if not cv2.imwrite(tmp, out[..., ::-1]):
            raise OSError(f"{path}: could not write PNG")
    return _atomic(path, write)
