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
POINT_FORMATS = ("geojson", "csv", "overlay")  # a detection model's centres have no label image

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
            tifffile.imwrite(tmp, np.asarray(labels, np.uint32), compression="zlib",
                             tile=(256, 256) if min(labels.shape) >= 256 else None, bigtiff=big)
        return _atomic(path, write)
    import cv2

    if labels.max(initial=0) > 65535:
        raise ValueError(f"{path}: {int(labels.max())} nuclei do not fit a 16-bit PNG; write .tif")

    def write(tmp):
        if not cv2.imwrite(tmp, labels.astype(np.uint16)):
            raise OSError(f"{path}: could not write PNG")
    return _atomic(path, write)


def polygons(labels, table_ids, tolerance=1.0):
    """{id: closed ring [[x, y], ...]} of the outer contour of each instance, simplified within
    ``tolerance`` pixels (OpenCV), in pixel-corner coordinates (:func:`kerasnuc.predict.measure.outline`)."""
    import cv2
    from scipy import ndimage as ndi

    from kerasnuc.predict.measure import outline

    labels = np.asarray(labels)
    rings = {}
    slices = ndi.find_objects(labels.astype(np.int64))
    wanted = set(int(i) for i in table_ids)
    for index, box in enumerate(slices, 1):
        if box is None or index not in wanted:
            continue
        mask = np.zeros((box[0].stop - box[0].start + 2, box[1].stop - box[1].start + 2), np.uint8)
        mask[1:-1, 1:-1] = labels[box] == index
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if contours:
            rings[index] = outline(contours, (box[0].start - 1, box[1].start - 1), tolerance)
    return rings


def measurement_columns(table):
    return [name for name in table if name not in ("id", "class")]


def geojson_features(labels, table, offset=(0, 0), downsample=1.0, mpp=None, class_names=None, rings=None):
    """QuPath detections (dicts) of the nuclei of ``table`` outlined in ``labels`` (or given as
    ``rings``, {id: ring}), whose pixel (0, 0) is view pixel ``offset`` (top, left); rings in
    level-0 pixels (x ``downsample``). A table of centres only (a detection model's, no label
    image) gives Point detections (:func:`point_features`)."""
    if labels is None and rings is None:
        return point_features(table, class_names)
    rings = polygons(labels, table["id"]) if rings is None else rings
    names = list(class_names or sorted(set(table.get("class", []))))
    shift = np.asarray([offset[1], offset[0]], np.float64)
    features = []
    for row in range(len(table["id"])):
        nucleus = int(table["id"][row])
        if nucleus not in rings:
            continue
        ring = ((np.asarray(rings[nucleus]) + shift) * downsample).round(2).tolist()
        measurements = {name: float(table[name][row]) for name in measurement_columns(table)}
        if mpp:  # table sizes are in level-0 pixels already
            measurements["area_um2"] = measurements["area"] * mpp ** 2
            measurements["perimeter_um"] = measurements["perimeter"] * mpp
        properties = {"objectType": "detection", "measurements": measurements}
        if "class" in table:
            name = str(table["class"][row])
            colour = COLOURS[names.index(name) % len(COLOURS)] if name in names else COLOURS[-1]
            properties["classification"] = {"name": name, "color": list(colour)}
        features.append({"type": "Feature", "id": str(uuid.uuid4()),
                         "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties})
    return features


def point_features(table, class_names=None):
    """QuPath detections with Point geometries at a point table's centres (level-0 pixels,
    already counting pixel corners as QuPath does), with score and class as measurements."""
    names = list(class_names or sorted(set(table.get("class", []))))
    features = []
    for row in range(len(table["id"])):
        point = [round(float(table["centroid_x"][row]), 2), round(float(table["centroid_y"][row]), 2)]
        measurements = {name: float(table[name][row]) for name in measurement_columns(table)
                        if name not in ("centroid_x", "centroid_y")}
        properties = {"objectType": "detection", "measurements": measurements}
        if "class" in table:
            name = str(table["class"][row])
            colour = COLOURS[names.index(name) % len(COLOURS)] if name in names else COLOURS[-1]
            properties["classification"] = {"name": name, "color": list(colour)}
        features.append({"type": "Feature", "id": str(uuid.uuid4()),
                         "geometry": {"type": "Point", "coordinates": point}, "properties": properties})
    return features


class _Streamed:
    """A file written in pieces to a temporary name and renamed by ``close``; ``abort`` removes it."""

    def __init__(self, path):
        self.path = path
        root, ext = os.path.splitext(path)
        self.tmp = f"{root}.tmp{os.getpid()}{ext}"

    def abort(self):
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def _finish(self):
        os.replace(self.tmp, self.path)
        return self.path


class GeoJSONWriter(_Streamed):
    """A QuPath FeatureCollection written block by block (one detection per nucleus)."""

    def __init__(self, path, mpp=None, class_names=None):
        super().__init__(path)
        self.mpp, self.class_names = mpp, class_names
        self.handle = open(self.tmp, "w")
        self.handle.write('{"type": "FeatureCollection", "features": [')
        self.count = 0

    def add(self, labels, table, offset=(0, 0), downsample=1.0, rings=None):
        for feature in geojson_features(labels, table, offset, downsample, self.mpp, self.class_names, rings):
            self.handle.write(("," if self.count else "") + "\n" + json.dumps(feature))
            self.count += 1

    def close(self):
        self.handle.write("\n]}\n")
        self.handle.close()
        return self._finish()

    def abort(self):
        self.handle.close()
        super().abort()


class CSVWriter(_Streamed):
    """The nucleus table, one row per nucleus, block by block; µm / µm² columns when the pixel size is known."""

    def __init__(self, path, columns, mpp=None):
        super().__init__(path)
        self.columns, self.mpp = list(columns), mpp
        self.handle = open(self.tmp, "w", newline="")
        self.writer = csv.writer(self.handle)
        self.sizes = "area" in self.columns  # a point table has centres only
        extra = (["area_um2", "perimeter_um"] if self.sizes else []) + ["centroid_x_um", "centroid_y_um"]
        self.writer.writerow(self.columns + (extra if mpp else []))

    def add(self, table):
        mpp = self.mpp
        for row in range(len(table["id"])):
            values = [table[name][row] for name in self.columns]
            values = [f"{v:.4f}" if isinstance(v, (float, np.floating)) else v for v in values]
            if mpp and self.sizes:
                values += [f"{table['area'][row] * mpp ** 2:.4f}", f"{table['perimeter'][row] * mpp:.4f}"]
            if mpp:
                values += [f"{table['centroid_x'][row] * mpp:.4f}", f"{table['centroid_y'][row] * mpp:.4f}"]
            self.writer.writerow(values)

    def close(self):
        self.handle.close()
        return self._finish()

    def abort(self):
        self.handle.close()
        super().abort()


def write_geojson(path, labels, table, mpp=None, offset=(0, 0), downsample=1.0, class_names=None):
    """A QuPath FeatureCollection of a whole label image and its table."""
    writer = GeoJSONWriter(path, mpp, class_names)
    try:
        writer.add(labels, table, offset, downsample)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_table_csv(path, table, mpp=None):
    """The nucleus table as CSV (see :class:`CSVWriter`)."""
    writer = CSVWriter(path, list(table), mpp)
    try:
        writer.add(table)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class LabelsWriter:
    """Instance labels of a view, pasted block by block, written at ``close``.

    Up to ``LARGE`` pixels (4096 x 4096: 64 MB) they are held in memory and written by
    :func:`write_labels`; beyond that (slides) they are pasted into a compressed zarr array on
    disk beside the output and written as a tiled, pyramidal (nearest-neighbour levels) uint32
    OME-TIFF, band by band, so memory stays flat (held in memory, an 8192 x 8192 label image
    alone is 256 MB). A 16-bit PNG is written whole, so it is held in memory up to ``LARGEST_PNG``.
    """

    LARGE = 4096 * 4096
    LARGEST_PNG = 8192 * 8192

    def __init__(self, path, shape, mpp=None):
        self.path, self.shape, self.mpp = path, tuple(shape[:2]), mpp
        tiff = path.lower().endswith((".tif", ".tiff"))
        self.large = self.shape[0] * self.shape[1] > (self.LARGE if tiff else self.LARGEST_PNG)
        self.store = None
        if not self.large:
            self.array = np.zeros(self.shape, np.uint32)
            return
        if not tiff:
            raise ValueError(f"{path}: a {self.shape[1]} x {self.shape[0]} label image needs .tif (OME-TIFF)")
        import tempfile

        try:
            import zarr
        except ImportError:
            raise ValueError(f"{path}: labels of a slide need zarr: pip install 'kerasnuc[wsi]'") from None
        self.store = tempfile.mkdtemp(prefix=".labels-", dir=os.path.dirname(os.path.abspath(path)))
        self.array = zarr.open_array(os.path.join(self.store, "labels.zarr"), mode="w", shape=self.shape,
                                     chunks=(1024, 1024), dtype=np.uint32, fill_value=0)

    def add(self, result):
        from kerasnuc.predict.engine import paste_labels

        paste_labels(self.array, result)

    def close(self):
        try:
            if not self.large:
                return write_labels(self.path, self.array)
            return _atomic(self.path, lambda tmp: write_pyramid(tmp, self.array, self.mpp, scratch=self.store))
        finally:
            self._cleanup()

    def abort(self):
        self._cleanup()

    def _cleanup(self):
        if self.store is not None:
            import shutil

            shutil.rmtree(self.store, ignore_errors=True)
            self.store = None


def write_pyramid(path, array, mpp=None, tile=256, min_side=1024, scratch=None):
    """A uint32 (H, W) array (NumPy or zarr) as a tiled, zlib, pyramidal OME-TIFF, in bands of
    ``tile`` rows.

    Each coarser level is every second row and column of the level above it (the same pixels
    as striding level 0 by the level's factor: nearest neighbour), written band by band to a
    raw file in ``scratch`` (a folder; default a temporary one beside ``path``) while the level
    above is written, and read back band by band: memory is one band of the widest level, not
    a level-0 region that grows with the coarsest level's factor.
    """
    import contextlib
    import shutil
    import tempfile

    import tifffile

    height, width = array.shape
    factors = [1]
    while max(height, width) // (factors[-1] * 2) >= min_side:
        factors.append(factors[-1] * 2)
    shapes = [(-(-height // f), -(-width // f)) for f in factors]  # level k+1: every 2nd pixel of level k
    folder = scratch or tempfile.mkdtemp(prefix=".pyramid-", dir=os.path.dirname(os.path.abspath(path)))
    files = [os.path.join(folder, f"level{level}.u32") for level in range(len(shapes))]

    def tiles(level, coarser):
        rows, cols = shapes[level]
        source = open(files[level], "rb") if level else None
        try:
            for top in range(0, rows, tile):
                count = min(tile, rows - top)
                band = (np.asarray(array[top:top + count], dtype=np.uint32) if source is None
                        else np.fromfile(source, np.uint32, count * cols).reshape(count, cols))
                if coarser is not None:  # band tops are even: its even rows and columns are the next level's
                    np.ascontiguousarray(band[::2, ::2]).tofile(coarser)
                for left in range(0, cols, tile):
                    yield np.ascontiguousarray(band[:, left:left + tile])
        finally:
            if source is not None:
                source.close()

    metadata = {"axes": "YX"}
    if mpp:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    try:
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
            for level, shape in enumerate(shapes):
                options = dict(subifds=len(shapes) - 1, metadata=metadata) if level == 0 else dict(subfiletype=1)
                # tifffile stops after the last tile without exhausting the generator: files are
                # closed here, not by the generator running out
                with open(files[level + 1], "wb") if level + 1 < len(shapes) else contextlib.nullcontext() as coarser:
                    generator = tiles(level, coarser)
                    try:
                        tif.write(generator, shape=shape, dtype=np.uint32, tile=(tile, tile),
                                  compression="zlib", **options)
                    finally:
                        generator.close()
                if level:
                    os.remove(files[level])
    finally:
        if scratch is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for name in files[1:]:
                if os.path.exists(name):
                    os.remove(name)


class OverlayWriter:
    """The image with nucleus outlines (magenta), downscaled to at most ``max_side`` pixels a side,
    drawn block by block over an overview of the view; a detection model's centres as dots."""

    def __init__(self, path, view, max_side=4096):
        self.path = path
        height, width = view.shape[:2]
        self.step = max(1, int(np.ceil(max(height, width) / max_side)))
        self.downsample = float(getattr(view, "downsample", 1.0) or 1.0)
        self.canvas = overview(view, -(-height // self.step), -(-width // self.step))

    def add(self, result):
        from skimage.segmentation import find_boundaries

        if result.labels is None and result.table is not None and "bbox_x0" not in result.table:
            self._add_points(result.table)
            return
        if result.labels is None or not result.labels.any():
            return
        top, bottom, left, right = result.box
        step = self.step
        # sample the block on the canvas grid
        r_first, c_first = -(-top // step) * step - top, -(-left // step) * step - left
        sampled = result.labels[r_first::step, c_first::step]
        edges = find_boundaries(sampled, mode="inner")
        rows, cols = np.nonzero(edges)
        self.canvas[rows + (top + r_first) // step, cols + (left + c_first) // step] = (255, 0, 255)

    def _add_points(self, table):
        """Dots (radius 2 px of the overlay) at the table's level-0 centres."""
        import cv2

        scale = self.downsample * self.step
        for x, y in zip(table["centroid_x"], table["centroid_y"]):
            centre = (int(round(x / scale - 0.5)), int(round(y / scale - 0.5)))
            cv2.circle(self.canvas, centre, 2, (255, 0, 255), thickness=-1)

    def close(self):
        import cv2

        def write(tmp):
            if not cv2.imwrite(tmp, self.canvas[..., ::-1]):
                raise OSError(f"{self.path}: could not write PNG")
        return _atomic(self.path, write)

    def abort(self):
        pass


def overview(view, height, width):
    """uint8 RGB (height, width, 3) picture of a whole view (strided image or resized thumbnail)."""
    import cv2

    if hasattr(view, "thumbnail"):
        pixels = view.thumbnail()[0]
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    else:
        step = -(-view.shape[0] // height)
        pixels = np.asarray(view.read(0, view.shape[0], 0, view.shape[1]))[::step, ::step]
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    rgb = np.repeat(pixels[..., :1], 3, axis=-1) if pixels.shape[2] == 1 else pixels[..., :3]
    return np.ascontiguousarray(rgb.astype(np.uint8))


def write_overlay(path, image, labels, max_side=4096):
    """The image with nucleus outlines (magenta), downscaled so its longer side is at most ``max_side``."""
    from kerasnuc.predict.engine import BlockResult
    from kerasnuc.predict.sources import ArrayView

    view = ArrayView(image)
    writer = OverlayWriter(path, view, max_side)
    block = BlockResult(0, view, box=(0, view.shape[0], 0, view.shape[1]))
    block.labels = np.asarray(labels)
    writer.add(block)
    return writer.close()
