"""Summary statistics of a dataset: images, nuclei, classes, image sizes, channels.

``nuclei`` counts the distinct non-zero ids of each label image (instances) or, for
datasets with points only (CRCHistoPhenotypes), the detection points. Run it as
``python -m kerasnuc.data stats SPEC [SPEC...]``.
"""

import importlib
from collections import Counter

import numpy as np

from kerasnuc.data.spec import FORMATS, parse_spec


def count_instances(labels):
    """Number of distinct non-zero ids of a label image."""
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return 0
    top = int(flat.max())
    if top <= 0:
        return 0
    if top <= 4 * flat.size:
        return int(np.count_nonzero(np.bincount(flat, minlength=top + 1)[1:]))
    return int(np.count_nonzero(np.unique(flat)))


def _size_key(text):
    height, width = text.split("x")
    return int(height), int(width)


class StatsAccumulator:
    """Collects the statistics record by record (so a dataset need not be held in memory)."""

    def __init__(self):
        self.images = 0
        self.instances = 0
        self.points = 0
        self.with_labels = 0
        self.with_points = 0
        self.per_image = []
        self.classes = Counter()
        self.class_names = ()
        self.classified = 0
        self.sizes = Counter()
        self.channels = Counter()
        self.xml_files = 0
        self.xml_regions = 0
        self.tissues = Counter()

    def add(self, record):
        self.images += 1
        height, width = record.image.shape[:2]
        self.sizes[f"{height}x{width}"] += 1
        self.channels[str(record.image.shape[2] if record.image.ndim == 3 else 1)] += 1
        nuclei = None
        if record.labels is not None:
            self.with_labels += 1
            nuclei = count_instances(record.labels)
            self.instances += nuclei
        if record.points is not None:
            self.with_points += 1
            self.points += len(record.points)
            if nuclei is None:
                nuclei = len(record.points)
        self.per_image.append(nuclei or 0)
        if record.classes is not None:
            if record.class_names:
                self.class_names = tuple(record.class_names)
            counts = np.bincount(np.asarray(record.classes, dtype=np.int64), minlength=len(self.class_names))
            for index, count in enumerate(counts):
                self.classes[index] += int(count)
            self.classified += len(record.classes)
        extra = record.extra or {}
        if extra.get("xml_path"):
            self.xml_files += 1
            self.xml_regions += int(extra.get("xml_regions") or 0)
        if extra.get("tissue") is not None:
            self.tissues[str(extra["tissue"])] += 1

    def result(self):
        nuclei = self.instances if self.with_labels else self.points
        out = {
            "images": self.images,
            "nuclei": nuclei,
            "nuclei_from": "instances" if self.with_labels else ("points" if self.with_points else "none"),
        }
        if self.per_image:
            values = np.asarray(self.per_image)
            out["nuclei_per_image"] = {"min": int(values.min()), "median": float(np.median(values)),
                                       "max": int(values.max())}
        if self.with_labels and self.with_points:
            out["points"] = self.points
        if self.classified or self.class_names:
            names = self.class_names or tuple(str(i) for i in sorted(self.classes))
            out["classified"] = self.classified
            out["classes"] = {name: self.classes.get(i, 0) for i, name in enumerate(names)}
            for index in sorted(set(self.classes) - set(range(len(names)))):
                out["classes"][str(index)] = self.classes[index]
        out["image_sizes"] = {key: self.sizes[key] for key in sorted(self.sizes, key=_size_key)}
        out["channels"] = {key: self.channels[key] for key in sorted(self.channels, key=int)}
        if self.xml_files:
            out["xml_files"] = self.xml_files
            out["xml_regions"] = self.xml_regions
        if self.tissues:
            out["tissues"] = dict(sorted(self.tissues.items()))
        return out


def dataset_stats(records):
    """Statistics (a JSON-ready dict) of an iterable of NucleiImage."""
    accumulator = StatsAccumulator()
    for record in records:
        accumulator.add(record)
    return accumulator.result()


def spec_stats(spec, **options):
    """Statistics of the dataset named by ``spec`` (``FORMAT:PATH`` or ``sample``)."""
    fmt, path = parse_spec(spec)
    module = importlib.import_module(FORMATS[fmt][0])
    reader = getattr(module, "iter_read", None) or module.read
    result = {"spec": spec, "format": fmt}
    result.update(dataset_stats(reader(path, **options)))
    return result
