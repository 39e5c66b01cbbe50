"""The one path from a model to nuclei: normalise, pad, tile, average passes, post-process, measure.

A :class:`Predictor` wraps any runtime (:mod:`kerasnuc.predict.runtimes`) and its metadata.
NumPy, SciPy and scikit-image only: with the LiteRT runtime nothing here imports
TensorFlow, Keras or JAX.

Large images go through :meth:`Predictor.predict_instances` in blocks: each block is
predicted with a context of ``block_overlap`` pixels around it (tiles inside it keep a
margin of at least the receptive radius, and normalise with the whole image's intensity
range), and a nucleus is kept by exactly one block: the one whose core holds its centroid,
provided it does not touch the block's context border (where it may be cut). Ids are
global and the full-size float map never exists. With ``multiple_inference`` (NucSeg) each
block is predicted in 7 views whose instances vote (anchored on the original view's nuclei)
before the responsibility rule decides which block keeps a nucleus. An instance model (task
"instance", Mask R-CNN) gives detections instead of maps: each block goes through tiles of its
fixed input size and :mod:`kerasnuc.predict.detections` turns them into the block's nuclei.

Stain normalisation: a run trained on stain-normalised tiles (``meta["stain"]``, its stain.json)
gets the same normaliser here, applied exactly once to the pixels of each image or block
before the network (:meth:`Predictor.model_pixels`; images, blocks, slides, Dask workers,
TTA and multiple inference all pass through it), never to glass blocks. The nucleus table's
mean intensities are measured on the ORIGINAL pixels. Reinhard, Macenko and Vahadane are
NumPy only; a dcgmm normaliser runs its Keras E-step network.
"""

import numpy as np

from kerasnuc.intensity import intensity_range, normalize_with_range
from kerasnuc.predict.postprocess import instances, points_from_maps, uncertainty as uncertainty_map
from kerasnuc.predict.tiling import TilePlan, fitting_margin, pad_to_tile, patches_at


LOCAL_TILE = 1024


class Predictor:
    """A model and its metadata, ready to turn images into maps, points and nuclei."""

    def __init__(self, runtime, meta=None, batch_size=4, block=2048, block_overlap=None, tta=1, tile=None,
                 multiple_inference=False):
        self.runtime = runtime
        self.tta = tta
        # NucSeg's multiple inference (kerasnuc.postprocess.multiple_inference): True, or a list of
        # dihedral views; each view -> instances -> mapped back -> anchored pixel vote, per block
        self.multiple_inference = multiple_inference
        self.inference_views()  # a bad option fails here, not in the first block
        # tiles of a dynamic-shape runtime: large, so the margin recomputed around each tile is
        # a small share (256 + 2 x 48 costs 1.9x the pixels, 1024 + 2 x 48 1.2x); TF-Serving
        # keeps the export's suggested serving_tile (request size)
        self.tile = tile if tile is not None else (None if getattr(runtime, "takes_raw", False) else LOCAL_TILE)
        self.meta = meta if meta is not None else runtime.meta
        self.batch_size = int(batch_size)
        self.block = int(block)
        self.block_overlap = block_overlap
        self.classifier = None
        self._stain = None  # the normaliser of meta["stain"], built on first use

    # -- stain normalisation

    @property
    def stain_normalizer(self):
        """The run's stain normaliser (``meta["stain"]``: method, params, fitted), or None.
        Its files (a dcgmm network) are absolute paths, resolved by whoever read the metadata
        from its folder (:func:`kerasnuc.runs.read_stain`, :func:`kerasnuc.predict.litert.load_metadata`)."""
        stored = self.meta.get("stain")
        if not stored:
            return None
        if self._stain is None or self._stain[0] is not stored:
            from kerasnuc.data.stain import normalizer_from_dict

            self._stain = (stored, normalizer_from_dict(stored))
        return self._stain[1]

    def model_pixels(self, image):
        """The pixels the network sees of an (H, W[, C]) uint8 image or block: stain-normalised
        as in training (:func:`kerasnuc.data.stain.normalize_rgb`: RGB only), else as they are."""
        image = _as_hwc(image)
        normalizer = self.stain_normalizer
        return image if normalizer is None else _as_hwc(_normalize_rgb(normalizer, image))

    def view_range(self, view, single_block):
        """The (min, max) that normalises every block of ``view`` for the network. Without a stain
        normaliser: the view's own (:meth:`value_range`). With one, the range of normalised
        pixels: None when ``single_block`` (the block is the whole image: its own normalised
        range, training's per-image rule), else the range of the normalised thumbnail of a
        slide (or a subsampled copy of an image), so all blocks are scaled alike."""
        if self.stain_normalizer is None or view.shape[2] != 3:
            return view.value_range(self.channels)
        if single_block:
            return None
        thumbnail = getattr(view, "thumbnail", None)
        if thumbnail is not None:
            sample = thumbnail()[0]
        else:
            from kerasnuc.predict.sources import THUMBNAIL_SIDE

            height, width = view.shape[:2]
            step = max(1, -(-max(height, width) // THUMBNAIL_SIDE))
            sample = np.asarray(view.read(0, height, 0, width))[::step, ::step]
        return intensity_range(self.model_pixels(np.ascontiguousarray(sample)), self.channels)

    # -- facts

    @property
    def task(self):
        return self.meta.get("task", "segmentation")

    @property
    def channels(self):
        return int(self.meta["channels"])

    @property
    def multiple(self):
        return max(int(self.meta.get("multiple", 1) or 1), 1)

    @property
    def static_shape(self):
        """(H, W) the runtime takes and no other (LiteRT static exports, instance models), or None.
        An instance model served by TF-Serving says its size in the metadata's ``input_size``."""
        static = getattr(self.runtime, "static_shape", None)
        if static is None and self.task == "instance" and self.meta.get("input_size"):
            static = tuple(int(side) for side in self.meta["input_size"])
        return static

    @property
    def stochastic(self):
        return bool(self.meta.get("stochastic"))

    def default_samples(self):
        return int(self.meta.get("mc_samples", 10)) if self.stochastic else 1

    def attach_classifier(self, predictor):
        """Classify every detected nucleus with ``predictor`` (a classification model)."""
        if predictor.task != "classification":
            raise ValueError(f"{getattr(predictor.runtime, 'path', 'classifier')}: a {predictor.task} model "
                             "cannot classify nuclei")
        self.classifier = predictor
        return self

    # -- maps

    def plan_for(self, height, width, tile=None, margin=None):
        """(TilePlan, pad function) for an image of (height, width); a static runtime tiles in
        exactly its input shape."""
        multiple = self.multiple
        static = self.static_shape
        if static is not None:
            margin = fitting_margin(static, self.meta.get("tile_margin", 32) if margin is None else margin, multiple)
            shape = [max(-(-size // multiple) * multiple, side) for size, side in zip((height, width), static)]
            plan = TilePlan(shape[0], shape[1], static, margin, multiple)
            return plan, lambda image: pad_to_tile(image, multiple, static)
        balance = tile is None and self.tile is not None
        if tile is None:
            tile = self.tile or self.meta.get("serving_tile", 256)
        margin = self.meta.get("tile_margin", 32) if margin is None else margin
        if not tile:
            tile, margin = max(height, width) + multiple, 0
        elif balance:
            tile = tuple(balanced_tile(side, tile, margin, multiple) for side in (height, width))
        plan = TilePlan(height, width, tile, margin, multiple)
        return plan, plan.pad

    def _run_tiles(self, plan, padded, value_range=None, uncertainty=False):
        """Stitched (plan height, plan width, K) map of one pass over the plan's tiles, pasted
        batch by batch (tile outputs with their margins are never all held at once).

        A runtime with ``submit`` (gRPC) gets every batch at once, so requests are in flight
        together; ``uncertainty``: its in-graph Monte-Carlo signature, giving (mean, variance).
        """
        pixels = plan.tile_shape[0] * plan.tile_shape[1]  # large tiles go one by one (memory)
        batches = plan.batches(max(1, min(self.batch_size, LOCAL_TILE * LOCAL_TILE // max(pixels, 1))))
        submit = getattr(self.runtime, "submit", None)
        if submit is not None:
            jobs = [submit(plan.extract(padded, indices), value_range, uncertainty) for indices in batches]
            outputs = (job.result() for job in jobs)
        else:
            outputs = ((self.runtime.run_raw(plan.extract(padded, indices), value_range),)
                       if value_range is not None else (self.runtime.run(plan.extract(padded, indices)),)
                       for indices in batches)
        results = None
        for indices, outs in zip(batches, outputs):
            for position, index in enumerate(indices):
                top, left, (r0, r1), (c0, c1) = plan.tiles[index]
                if results is None:
                    results = [np.zeros(plan.padded_shape + np.asarray(o[position]).shape[2:], np.float32) for o in outs]
                for result, out in zip(results, outs):
                    result[r0:r1, c0:c1] = np.asarray(out[position])[r0 - top:r1 - top, c0 - left:c1 - left]
        results = [r[:plan.height, :plan.width] for r in results]
        return tuple(results) if uncertainty else results[0]

    def run_tiled(self, x, tile=None, margin=None):
        """(H, W, C) normalised float32 image -> (H, W, K) map stitched from tiles."""
        x = np.asarray(x)
        plan, pad = self.plan_for(x.shape[0], x.shape[1], tile, margin)
        return self._run_tiles(plan, pad(x))[:x.shape[0], :x.shape[1]]

    def predict_maps(self, image, tile=None, margin=None, samples=None, value_range=None, tta=None):
        """(H, W, C) uint8 image -> ((H, W, K) mean map, (H, W, K) variance or None).

        ``value_range``: the (min, max) that defines the normalisation (default: this image's;
        a block of a larger image passes the whole image's). ``samples``: Monte-Carlo passes
        (default: the metadata's ``mc_samples`` for stochastic models, else 1). ``tta``:
        dihedral views averaged per pass (1..8 or a list of indices; default ``self.tta``).
        """
        out = self.predict_passes(image, tile, margin, samples, value_range, tta)
        return out["mean"], out["variance"]

    def predict_passes(self, image, tile=None, margin=None, samples=None, value_range=None, tta=None,
                       keep_views=False):
        """The maps of every pass: {"mean", "variance" (None for one pass), "passes" (S, H, W, K)
        or None for one pass, "views" (the mapped-back dihedral views averaged over passes, with
        ``keep_views``) or None}. Each pass averages its ``tta`` views (each mapped back)."""
        if self.task == "instance":
            raise ValueError("an instance model (Mask R-CNN) gives detections, not maps: use predict_instances")
        return self._passes(self.model_pixels(image), tile, margin, samples, value_range, tta, keep_views)

    def _passes(self, image, tile=None, margin=None, samples=None, value_range=None, tta=None, keep_views=False):
        """:meth:`predict_passes` of pixels already through :meth:`model_pixels`."""
        from kerasnuc.predict.tiling import dihedral_transform, inverse_dihedral, transform_indices

        height, width = image.shape[:2]
        value_range = intensity_range(image, self.channels) if value_range is None else tuple(value_range)
        raw = getattr(self.runtime, "takes_raw", False)
        x = image if raw else normalize_with_range(image, self.channels, value_range)
        indices = transform_indices(self.tta if tta is None else tta)
        if (samples is None and self.stochastic and getattr(self.runtime, "mc_in_graph", False)
                and indices == [0] and not keep_views):  # the server's T passes in one request per tile
            plan, pad = self.plan_for(height, width, tile, margin)
            mean, variance = self._run_tiles(plan, pad(x), value_range if raw else None, uncertainty=True)
            return {"mean": mean[:height, :width], "variance": variance[:height, :width], "passes": None,
                    "views": None}
        samples = self.default_samples() if samples is None else max(1, int(samples))
        passes, views = [], None
        for _ in range(samples):
            pass_views = []
            for k in indices:
                view = dihedral_transform(x, k) if k else x
                plan, pad = self.plan_for(view.shape[0], view.shape[1], tile, margin)
                out = self._run_tiles(plan, pad(view), value_range if raw else None)[:view.shape[0], :view.shape[1]]
                pass_views.append(inverse_dihedral(out, k) if k else out)
            if keep_views:
                views = pass_views if views is None else [v + p for v, p in zip(views, pass_views)]
            passes.append(pass_views[0] if len(pass_views) == 1 else np.mean(pass_views, axis=0))
        if views is not None:
            views = [np.ascontiguousarray(v / samples, dtype=np.float32) for v in views]
        if samples == 1:
            return {"mean": np.ascontiguousarray(passes[0], dtype=np.float32), "variance": None,
                    "passes": None, "views": views}
        stack = np.stack(passes).astype(np.float32)
        return {"mean": stack.mean(axis=0), "variance": stack.var(axis=0), "passes": stack, "views": views}

    # -- nuclei

    def classify(self, image, points, batch_size=64, samples=None, value_range=None, tta=None):
        """(K, classes) probabilities for nuclei at (x, y) ``points`` of a uint8 image, averaged
        over Monte-Carlo passes and ``tta`` dihedral views of each patch. Batches are padded to
        ``batch_size`` so the runtime sees one shape."""
        from kerasnuc.predict.tiling import dihedral_transform, transform_indices

        image = self.model_pixels(image)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if len(points) == 0:
            return np.zeros((0, self.meta.get("output_channels", len(self.meta.get("class_names") or [1]))),
                            np.float32)
        value_range = intensity_range(image, self.channels) if value_range is None else tuple(value_range)
        patches = patches_at(image, points, int(self.meta["patch"]))
        raw = getattr(self.runtime, "takes_raw", False)
        if not raw:
            patches = normalize_with_range(patches, self.channels, value_range)
        samples = self.default_samples() if samples is None else max(1, int(samples))
        indices = transform_indices(self.tta if tta is None else tta)
        outs = []
        for start in range(0, len(patches), batch_size):
            chunk = patches[start:start + batch_size]
            count = len(chunk)
            if count < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - count,) + chunk.shape[1:], chunk.dtype)])
            runs = []
            for _ in range(samples):
                for k in indices:
                    view = np.ascontiguousarray(np.moveaxis(dihedral_transform(np.moveaxis(chunk, 0, 2), k), 2, 0))
                    out = self.runtime.run_raw(view, value_range) if raw else self.runtime.run(view)
                    runs.append(np.asarray(out, np.float64)[:count])
            outs.append(np.mean(runs, axis=0))
        return np.concatenate(outs).astype(np.float32)

    def predict_points(self, image, tile=None, margin=None, samples=None):
        """(K, 2) (x, y) nucleus centres: density peaks (detection) or instance centroids."""
        if self.task == "classification":
            raise ValueError("a classification model classifies given points; it does not find them")
        if self.task == "instance":
            from kerasnuc.predict.postprocess import instance_centroids

            return instance_centroids(self.predict_instances(image, tile, margin, samples)[0])
        if self.task == "detection":
            table = self.predict_point_table(image, tile, margin, samples)
            return np.stack([table["centroid_x"], table["centroid_y"]], axis=1).reshape(-1, 2) - 0.5
        maps, _ = self.predict_maps(image, tile, margin, samples)
        return points_from_maps(maps, self.task, self.meta.get("postprocess") or {})

    def predict_point_table(self, image, tile=None, margin=None, samples=None, progress=None):
        """The nucleus centres a detection model finds in an image of any size, block by block
        (bounded memory, glass skipped on slides), as a table: id, centroid_x, centroid_y (level-0
        pixels, counting pixel corners like :meth:`predict_instances`' table), score (the density
        peak), and class / class_probability with an attached classifier."""
        if self.task != "detection":
            raise ValueError(f"predict_point_table needs a detection model; this is a {self.task} model")
        from kerasnuc.predict.measure import concat_tables

        view = as_view(image)
        tables = []
        for result in self.stream([view], tile, margin, samples):
            if result.error is not None:
                raise result.error
            if result.table is not None and len(result.table["id"]):
                tables.append(result.table)
            if progress is not None:
                progress(result.done, result.total)
        return concat_tables(tables) if tables else empty_point_table(self.classifier is not None)

    def predict_instances(self, image, tile=None, margin=None, samples=None, labels_out=None, progress=None,
                          multiple_inference=None):
        """(instance labels (H, W) uint32, nucleus table) of an image of any size.

        ``image``: an (H, W[, C]) array or a view (:mod:`kerasnuc.predict.sources`, e.g. a
        slide). The table is a dict of equal-length columns (:func:`kerasnuc.predict.measure.measure`):
        id, centroid, bounding box, area, perimeter, eccentricity, solidity, mean intensity per
        channel (of the original pixels, not the stain-normalised ones the network saw), and
        class / class probability with an attached classifier, mean uncertainty for Monte-Carlo
        models; positions and sizes in level-0 pixels. ``labels_out``: an
        (H, W) array to write into (a zarr array for slides); ``progress(done, total)`` is
        called after each block. ``multiple_inference``: this call's choice (True, False or a
        list of dihedral views) instead of the predictor's.
        """
        from kerasnuc.predict.measure import concat_tables, empty_table

        if multiple_inference is not None and multiple_inference is not self.multiple_inference:
            return self.with_options(multiple_inference=multiple_inference).predict_instances(
                image, tile, margin, samples, labels_out, progress)
        view = as_view(image)
        labels = labels_out if labels_out is not None else np.zeros(view.shape[:2], np.uint32)
        tables, oversized = [], 0
        for result in self.stream([view], tile, margin, samples):
            if result.error is not None:
                raise result.error
            oversized += result.oversized
            paste_labels(labels, result)
            if result.table is not None and len(result.table["id"]):
                tables.append(result.table)
            if progress is not None:
                progress(result.done, result.total)
        table = concat_tables(tables) if tables else empty_table(view.shape[2], self.classifier is not None,
                                                                 self.stochastic)
        if oversized:
            import warnings

            warnings.warn(oversized_message(oversized, self.overlap()), stacklevel=2)
        return labels, table

    def stream(self, views, tile=None, margin=None, samples=None, skip_glass=True, depth=2, outlines=False):
        """:class:`BlockResult` for every block of every view, in order.

        ``views``: views, arrays, or callables that open one (so files open as they are
        reached, and one that fails gives a result with ``error`` set while the others go on).
        The network runs ``depth`` blocks ahead in a background thread while this thread
        post-processes and measures, so both cores stay busy. Blocks of a slide without tissue
        in its thumbnail are skipped. Ids are global within a view. ``outlines``: also each
        nucleus's polygon (``result.rings``, for GeoJSON).
        """
        self.require_nuclei()
        next_id = {}
        for item in prefetch(self._network_stage(views, tile, margin, samples, skip_glass), depth):
            if item.error is not None or item.maps is None:
                yield item
                continue
            first = next_id.get(item.index, 1)
            try:
                item = self._post_stage(item, first, outlines)
            except Exception as error:  # reported for this view; the others go on
                item.error = error
                yield item
                continue
            next_id[item.index] = first + len(item.table["id"])
            yield item

    def require_segmentation(self):
        """Raise unless this model finds nuclei as instances (segmentation or instance task)."""
        if self.task not in ("segmentation", "instance"):
            raise ValueError(f"predict_instances needs a segmentation model; this is a {self.task} model "
                             "(use predict_points)")

    def require_nuclei(self):
        """Raise unless this model finds nuclei: outlined (segmentation, instance) or as centres (detection)."""
        if self.task not in ("segmentation", "instance", "detection"):
            raise ValueError(f"a {self.task} model finds no nuclei itself: it classifies given ones "
                             "(attach it to a segmentation or detection model as classifier=...)")

    def _network_stage(self, views, tile, margin, samples, skip_glass):
        for index, source in enumerate(views):
            try:
                blocks = self.plan_view(index, source, skip_glass)
            except Exception as error:  # reported with the view's index; the others go on
                yield BlockResult(index, None, error=error)
                continue
            for result in blocks:
                if result.glass:
                    yield result  # glass: no network, no nuclei
                    continue
                try:
                    self.predict_block(result, tile, margin, samples)
                except Exception as error:
                    result.error = error
                    yield result
                    break
                yield result

    def plan_view(self, index, source, skip_glass=True):
        """The blocks of one view (a view, an array, or a callable that opens one), as
        :class:`BlockResult` objects with ``core``, ``box``, the view's intensity ranges and ``glass``
        set: what a block needs to be predicted anywhere (here or on a Dask worker).

        Planned at once (a view that cannot be opened fails here), handed out by an iterator
        that keeps no block it has handed out: a finished block's pixels, labels and outlines
        are freed as soon as its consumer lets go, not held until the view ends (256 blocks of
        a 32k slide)."""
        view = as_view(source() if callable(source) else source)
        height, width = view.shape[:2]
        cores = list(block_grid(height, width, self.block, self.multiple))
        value_range = self.view_range(view, len(cores) == 1)
        # the classifier normalises with the whole view's range too
        classifier_range = self.classifier.view_range(view, len(cores) == 1) if self.classifier is not None else None
        tissue = view.tissue() if skip_glass else None
        overlap = self.overlap()
        blocks = []
        for done, core in enumerate(cores, 1):
            r0, r1, c0, c1 = core
            top = _floor_to(max(r0 - overlap, 0), self.multiple)
            left = _floor_to(max(c0 - overlap, 0), self.multiple)
            bottom, right = min(r1 + overlap, height), min(c1 + overlap, width)
            result = BlockResult(index, view, core=core, box=(top, bottom, left, right), done=done,
                                 total=len(cores))
            result.value_range, result.classifier_range = value_range, classifier_range
            result.glass = tissue is not None and not _has_tissue(tissue, core)
            blocks.append(result)
        return _handed_out(blocks)

    def predict_block(self, result, tile=None, margin=None, samples=None):
        """Read a planned block's pixels (its box) and run the network on them: sets ``crop``,
        ``maps`` and ``variance`` (and with multiple inference ``view_outputs``: the other
        views' outputs, each in its own orientation). ``crop`` keeps the original pixels (the
        table measures them); the network sees them stain-normalised (:meth:`model_pixels`), once."""
        top, bottom, left, right = result.box
        result.crop = np.asarray(result.view.read(top, bottom, left, right))
        pixels = self.model_pixels(result.crop)
        result.maps, result.variance = self._network_output(pixels, tile, margin, samples, result.value_range)
        views = self.inference_views()
        if views is not None:
            result.view_outputs = self._view_outputs(pixels, views[1:], tile, margin, samples, result.value_range)
        return result

    def network_output(self, image, tile=None, margin=None, samples=None, value_range=None):
        """(output, variance or None) of one image or block: maps, or an instance model's tile
        detections (:mod:`kerasnuc.predict.detections`)."""
        return self._network_output(self.model_pixels(image), tile, margin, samples, value_range)

    def _network_output(self, pixels, tile=None, margin=None, samples=None, value_range=None):
        """:meth:`network_output` of pixels already through :meth:`model_pixels`."""
        if self.task == "instance":
            from kerasnuc.predict.detections import detect

            return detect(self, pixels, value_range, margin), None
        out = self._passes(pixels, tile, margin, samples, value_range)
        return out["mean"], out["variance"]

    def view_outputs(self, image, views, tile=None, margin=None, samples=None, value_range=None):
        """[(k, network output of dihedral view k of ``image``, in that view's orientation)],
        every view normalised with ``value_range`` (default: the image's, stain-normalised once
        before the views are made)."""
        return self._view_outputs(self.model_pixels(image), views, tile, margin, samples, value_range)

    def _view_outputs(self, pixels, views, tile=None, margin=None, samples=None, value_range=None):
        from kerasnuc.predict.tiling import dihedral_transform

        value_range = intensity_range(pixels, self.channels) if value_range is None else tuple(value_range)
        return [(k, self._network_output(np.ascontiguousarray(dihedral_transform(pixels, k)), tile, margin,
                                         samples, value_range)[0]) for k in views]

    def inference_views(self):
        """The dihedral views of multiple inference (the original first), or None when it is off."""
        if self.multiple_inference is None or self.multiple_inference is False:
            return None
        from kerasnuc.predict.postprocess import multiple_inference_module

        views = multiple_inference_module().multiple_inference_views(self.multiple_inference)
        if views is not None and self.tta not in (1, None, [0], (0,)):
            raise ValueError("multiple inference chooses its own views; use it with tta=1 (maps are not averaged)")
        return views

    def with_options(self, **options):
        """A shallow copy of this predictor with some attributes changed (same runtime)."""
        import copy

        other = copy.copy(self)
        for name, value in options.items():
            if not hasattr(self, name):
                raise AttributeError(f"Predictor has no option {name!r}")
            setattr(other, name, value)
        other.inference_views()
        return other

    def _post_stage(self, item, first_id, outlines=False):
        """Instances of one block's maps, kept by the responsibility rule, measured, ids from ``first_id``
        (a detection model's centres: :meth:`block_points`)."""
        if self.task == "detection":
            return self.block_points(item, first_id)
        return number_block(self.block_instances(item, outlines), first_id)

    def block_points(self, item, first_id):
        """The nucleus centres of a predicted block that lie in its core (each centre is kept by
        exactly one block), as a point table with ids from ``first_id``, classified with an
        attached classifier; ``labels`` and ``rings`` stay None."""
        top, _, left, _ = item.box
        r0, r1, c0, c1 = item.core
        density = item.maps[..., 0] if item.maps.shape[-1] == 1 else item.maps.max(axis=-1)
        points = points_from_maps(item.maps, "detection", self.meta.get("postprocess") or {}).reshape(-1, 2)
        x, y = points[:, 0] + left, points[:, 1] + top  # view pixel centres
        inside = (y >= r0 - 0.5) & (y < r1 - 0.5) & (x >= c0 - 0.5) & (x < c1 - 0.5)
        points, x, y = points[inside], x[inside], y[inside]
        rows = np.clip(np.rint(points[:, 1]).astype(int), 0, density.shape[0] - 1)
        cols = np.clip(np.rint(points[:, 0]).astype(int), 0, density.shape[1] - 1)
        table = empty_point_table(False)
        table.update(id=np.arange(first_id, first_id + len(x), dtype=np.uint32), centroid_x=x + 0.5,
                     centroid_y=y + 0.5, score=density[rows, cols].astype(np.float64))
        if self.classifier is not None and len(x):
            _add_classes(table, self.classifier, item.crop, (top, left), item.classifier_range)
        elif self.classifier is not None:
            table.update(empty_point_table(True))
        item.table = _to_level0(table, item.view.downsample)
        item.labels = item.rings = None
        item.maps = item.variance = item.view_outputs = None
        return item

    def block_instances(self, item, outlines=False):
        """The nuclei a predicted block keeps (responsibility rule), measured and classified,
        still with block-local labels (``table["label"]``; ids come from :func:`number_block`,
        in block order, so a block can be done anywhere)."""
        from kerasnuc.predict.measure import measure

        height, width = item.view.shape[:2]
        top, bottom, left, right = item.box
        r0, r1, c0, c1 = item.core
        if item.view_outputs is not None:  # multiple inference: the vote comes before the responsibility rule
            from kerasnuc.predict.postprocess import multiple_inference_instances

            local = multiple_inference_instances(item.maps, item.view_outputs, self.instances_of)
        else:
            local = self.instances_of(item.maps)
        keep, item.oversized = responsible_ids(local, (r0 - top, r1 - top, c0 - left, c1 - left),
                                               touches=(top > 0, bottom < height, left > 0, right < width))
        kept = np.zeros(int(local.max(initial=0)) + 1, bool)
        kept[keep] = True
        local = np.where(kept[local], local, 0)
        variance = None if item.variance is None else uncertainty_map(item.variance, self.meta.get("postprocess"))
        measured = measure(local, item.crop, variance=variance, offset=(top, left), outlines=outlines)
        table, rings = measured if outlines else (measured, None)
        if self.classifier is not None and len(table["label"]):
            _add_classes(table, self.classifier, item.crop, (top, left), item.classifier_range)
        item.labels, item.rings = local, rings
        item.table = _to_level0(table, item.view.downsample)
        item.maps = item.variance = item.view_outputs = None
        return item

    def instances_of(self, maps):
        """Block-local instance labels of a block's network output (maps, or an instance
        model's tile detections) with the metadata's post-processing."""
        params = self.meta.get("postprocess") or {}
        if self.task == "instance":
            from kerasnuc.predict.detections import instances_from_tiles

            return instances_from_tiles(maps, params)
        return instances(maps, params)

    def overlap(self):
        """Context around a block: the tile margin (receptive radius) plus room for a whole nucleus."""
        if self.block_overlap is not None:
            return int(self.block_overlap)
        return int(self.meta.get("tile_margin", 32)) + 64


class BlockResult:
    """One block of a view: where it is (``core`` it decides, ``box`` it saw, in view pixels),
    its pixels, and after post-processing ``labels`` (box-sized, global ids of the nuclei it
    kept, 0 elsewhere) and ``table`` (level-0 pixels); ``error`` if it could not be done;
    ``glass`` if the tissue mask found none in it (not predicted)."""

    def __init__(self, index, view, core=None, box=None, done=0, total=0, error=None):
        self.index, self.view, self.core, self.box = index, view, core, box
        self.done, self.total, self.error = done, total, error
        self.crop = self.maps = self.variance = self.labels = self.value_range = None
        self.view_outputs = None  # multiple inference: [(k, output)] of the other views
        self.classifier_range = self.table = self.rings = None
        self.glass = False
        self.oversized = 0  # objects wider than the block context, dropped (see responsible_ids)

    @property
    def skipped(self):
        """True for a block of glass (not predicted)."""
        return self.error is None and self.glass


def number_block(item, first_id):
    """Give a block's kept nuclei their global ids ``first_id, first_id + 1, ...`` (in label
    order): labels, table (``id`` first, ``label`` dropped) and outlines."""
    table = item.table
    remap = np.zeros(int(item.labels.max(initial=0)) + 1, np.uint32)
    remap[table["label"]] = np.arange(first_id, first_id + len(table["label"]), dtype=np.uint32)
    table["id"] = remap[table["label"]]
    del table["label"]
    item.labels = remap[item.labels]
    if item.rings is not None:
        item.rings = {int(remap[label]): ring for label, ring in item.rings.items()}
    item.table = _id_first(table)
    return item


def paste_labels(labels, result):
    """Write a block's kept nuclei into the full label image (a NumPy or zarr array)."""
    if result.labels is None or not result.labels.any():
        return
    top, bottom, left, right = result.box
    target = np.array(labels[top:bottom, left:right])
    mask = (result.labels > 0) & (target == 0)
    target[mask] = result.labels[mask]
    labels[top:bottom, left:right] = target


def as_view(image):
    """A view (anything with ``shape``, ``read`` and ``value_range``) of an array or a view."""
    if hasattr(image, "read") and hasattr(image, "value_range"):
        return image
    from kerasnuc.predict.sources import ArrayView

    return ArrayView(_as_hwc(image))


def prefetch(iterable, depth=2):
    """Iterate ``iterable`` in a background thread, up to ``depth`` items ahead."""
    import queue
    import threading

    items, stop, end = queue.Queue(max(1, depth)), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as error:  # re-raised in the consumer
            put(_Raised(error))
        put(end)

    thread = threading.Thread(target=work, name="kerasnuc-network", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()


def _handed_out(items):
    """Iterate a list, dropping the list's reference to each item as it is handed out."""
    items.reverse()
    while items:
        yield items.pop()


class _Raised:
    def __init__(self, error):
        self.error = error


def _has_tissue(tissue, core):
    mask, step = tissue
    r0, r1, c0, c1 = core
    region = mask[int(r0 // step):int(np.ceil(r1 / step)) + 1, int(c0 // step):int(np.ceil(c1 / step)) + 1]
    return bool(region.any())


def _id_first(table):
    return {"id": table["id"], **{name: column for name, column in table.items() if name != "id"}}


def _to_level0(table, downsample):
    """Positions and sizes of a table in view pixels -> level-0 pixels of a slide."""
    if downsample == 1.0:
        return table
    for name in ("centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "perimeter"):
        if name in table:  # a detection model's point table has centroids only
            table[name] = table[name] * downsample
    if "area" in table:
        table["area"] = table["area"] * downsample ** 2
    return table


def empty_point_table(classes=False):
    """The columns of a detection model's nucleus table (:meth:`Predictor.predict_point_table`)."""
    table = {"id": np.zeros(0, np.uint32), "centroid_x": np.zeros(0), "centroid_y": np.zeros(0),
             "score": np.zeros(0)}
    if classes:
        table["class"] = np.zeros(0, object)
        table["class_probability"] = np.zeros(0)
    return table


def _add_classes(table, classifier, crop, offset, value_range):
    # the table counts pixel corners (centroid + 0.5); points count pixel centres
    points = np.stack([table["centroid_x"] - offset[1] - 0.5, table["centroid_y"] - offset[0] - 0.5], axis=1)
    probabilities = classifier.classify(crop, points, value_range=value_range)
    names = classifier.meta.get("class_names") or [f"class_{i}" for i in range(probabilities.shape[-1])]
    index = probabilities.argmax(axis=-1)
    table["class"] = np.asarray([names[i] for i in index], dtype=object)
    table["class_probability"] = probabilities.max(axis=-1)


def balanced_tile(side, largest, margin, multiple):
    """The smallest tile side (a multiple) that covers ``side`` pixels in as few tiles of at most
    ``largest`` as possible: 2272 pixels with margin 48 take three tiles of 832, not three of
    1024 overlapping by half (2.2x the pixels through the network instead of 1.6x)."""
    m = max(int(multiple), 1)
    margin = -(-int(margin) // m) * m
    padded = -(-int(side) // m) * m
    largest = max(int(largest) // m * m, 2 * margin + m)
    if padded <= largest:
        return largest  # one tile (TilePlan cuts it to the padded image)
    core = largest - 2 * margin
    count = -(-(padded - 2 * margin) // core)
    return int(-(-(-(-(padded - 2 * margin) // count) + 2 * margin) // m) * m)


def block_grid(height, width, block, multiple=1):
    """(r0, r1, c0, c1) cores of blocks of about ``block`` pixels, starting at multiples."""
    block = max(_floor_to(block, multiple), multiple)
    for r0 in range(0, height, block):
        for c0 in range(0, width, block):
            yield r0, min(r0 + block, height), c0, min(c0 + block, width)


def responsible_ids(labels, core, touches):
    """(kept, lost): ids of ``labels`` (a block with context) that this block decides, i.e.
    centroid inside the core and not touching a context border that is inside the image (it
    may be cut there); and how many had their centroid inside the core but touched such a
    border: objects wider than the block context, which no block can keep whole."""
    rows, cols = np.nonzero(labels)
    values = labels[rows, cols]
    if len(values) == 0:
        return np.zeros(0, np.int64), 0
    count = np.bincount(values)
    ids = np.nonzero(count)[0]
    ids = ids[ids > 0]
    cy = np.bincount(values, rows, minlength=ids.max() + 1)[ids] / count[ids]
    cx = np.bincount(values, cols, minlength=ids.max() + 1)[ids] / count[ids]
    r0, r1, c0, c1 = core
    inside = (cy >= r0) & (cy < r1) & (cx >= c0) & (cx < c1)
    cut = np.zeros(ids.max() + 1, bool)
    for side, touching in zip((labels[0], labels[-1], labels[:, 0], labels[:, -1]), touches):
        if touching:
            cut[side[side > 0]] = True
    return ids[inside & ~cut[ids]], int(np.count_nonzero(inside & cut[ids]))


def oversized_message(count, overlap):
    """What to tell a user whose objects are wider than the block context."""
    return (f"{count} objects wider than the block context ({overlap} px) were dropped at block seams; "
            f"raise the block overlap (--block-overlap, Predictor(block_overlap=...)) above the largest "
            "nucleus, or the block size")


def _floor_to(value, multiple):
    return int(value) // int(multiple) * int(multiple)


def _normalize_rgb(normalizer, image):
    from kerasnuc.data.stain.core import normalize_rgb  # NumPy only (a dcgmm normaliser brings Keras)

    return normalize_rgb(normalizer, image)


def _as_hwc(image):
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    return image


PREDICTOR_OPTIONS = ("batch_size", "block", "block_overlap", "tta", "tile", "multiple_inference")


def load(source, model_name=None, classifier=None, **options):
    """A :class:`Predictor` for a run folder, a ``.tflite`` export or a TF-Serving ``host:port``
    (with ``model_name``); ``classifier`` (any of those) classifies every nucleus found."""
    from kerasnuc.predict.runtimes import open_runtime

    predictor = Predictor(open_runtime(source, model_name, **options),
                          **{k: v for k, v in options.items() if k in PREDICTOR_OPTIONS})
    if classifier is not None:
        predictor.attach_classifier(classifier if isinstance(classifier, Predictor) else load(classifier))
    return predictor
