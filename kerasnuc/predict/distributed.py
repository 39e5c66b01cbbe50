"""Prediction over many images or slides on a Dask cluster (``dask.distributed``).

    python -m kerasnuc.predict MODEL INPUT... --out DIR --dask [--dask-workers N]
    python -m kerasnuc.predict MODEL INPUT... --out DIR --scheduler tcp://10.0.0.5:8786

One Dask task is one block of one view (a small image is one block). The client plans each
view as the serial engine does (:meth:`Predictor.plan_view`: blocks, intensity ranges, glass)
and sends each block's plan, a few numbers, with the view's *opener* (a picklable callable,
e.g. ``functools.partial(open_view, path, ...)``): the worker opens the source itself, by
path, runs the network and post-processing on the block (:meth:`Predictor.predict_block`,
:meth:`Predictor.block_instances`) and returns the block's nuclei with block-local labels.
The client numbers them in block order (:func:`kerasnuc.predict.engine.number_block`), so
ids, labels and tables are those of the serial run. Each worker process loads the model
once (:data:`_PREDICTORS`) and keeps its last few views open (:data:`_VIEWS`).

Model and inputs must be at the same paths on the client and every worker (a shared file
system); relative paths are made absolute on the client. A TF-Serving target works too:
every worker sends its requests to it. Monte-Carlo passes draw on each worker's random
state, so a stochastic model's maps are not bit-equal to a serial run's. A script that starts
a local cluster needs an ``if __name__ == "__main__":`` guard (workers are spawned processes
that import it). Importing this module needs no Dask, TensorFlow, Keras or JAX.
"""

import collections
import functools
import os
import threading

import numpy as np

from kerasnuc.predict.engine import BlockResult, number_block

VIEWS_PER_WORKER = 4  # views a worker keeps open: the blocks of one view mostly run in a row
_PREDICTORS = {}  # per worker process: model key -> (Predictor, lock around its runtimes)
_VIEWS = collections.OrderedDict()  # per worker process: opener key -> view (most recent last)
_LOCK = threading.Lock()
STATS = collections.Counter()  # per worker process: "loads" (models loaded), "blocks" (blocks done)


def connect(scheduler=None, workers=None):
    """(Client, LocalCluster or None): join the scheduler at ``scheduler``, or start a local
    cluster of ``workers`` processes (one thread each; default one per two cores)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("prediction on a Dask cluster needs dask.distributed: "
                         "pip install 'kerasnuc[dask]'") from None
    if scheduler:
        if workers:
            raise ValueError(f"{scheduler}: the number of workers is the cluster's own; "
                             "a worker count is only for a local cluster")
        try:
            return Client(scheduler), None
        except (OSError, ValueError, TypeError) as error:
            raise OSError(f"{scheduler}: cannot reach the Dask scheduler ({error})") from None
    workers = max(1, (os.cpu_count() or 2) // 2) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"a local Dask cluster needs at least 1 worker, got {workers}")
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    except Exception as error:  # e.g. workers that cannot start (memory, a script without a main guard)
        raise OSError(f"cannot start a local Dask cluster of {workers} workers ({error})") from None
    return Client(cluster), cluster


def dask_loader(scheduler=None, workers=None):
    """A drop-in for :func:`kerasnuc.predict.load` that gives a :class:`DaskPredictor`."""
    return functools.partial(DaskPredictor, scheduler=scheduler, workers=workers)


class DaskPredictor:
    """A :class:`Predictor` whose :meth:`stream` runs every block on a Dask cluster.

    ``source`` and ``options`` are those of :func:`kerasnuc.predict.load`; the client loads
    the model too (for its metadata: block grid, writers). Everything else (``meta``,
    ``classifier``, ``stochastic``, ...) is the wrapped predictor's. ``client``: an existing
    ``distributed.Client`` (not closed by :meth:`close`).
    """

    def __init__(self, source, scheduler=None, workers=None, client=None, **options):
        from kerasnuc.predict.engine import load

        options = {k: _absolute(v) if k == "classifier" else v for k, v in options.items()}
        self.predictor = load(_absolute(source), **options)
        # workers take this process's metadata instead of deriving it again (receptive-field probe)
        self.spec = (_absolute(source), {**options, "meta": self.predictor.runtime.meta})
        self.client, self.cluster, self._owned = client, None, client is None
        if client is None:
            self.client, self.cluster = connect(scheduler, workers)

    def __getattr__(self, name):
        if name == "predictor":
            raise AttributeError(name)
        if name.startswith(("predict", "run_")) or name == "classify":  # these would run here, not on the cluster
            raise AttributeError(f"DaskPredictor runs on the cluster through stream(paths); "
                                 f"its .predictor.{name} runs on this machine")
        return getattr(self.predictor, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the client and the local cluster this predictor started."""
        if self._owned:
            self.client.close()
            if self.cluster is not None:
                import logging

                # workers that imported TensorFlow take seconds to exit and are then killed, with a
                # warning per worker that asks nothing of the user
                nanny = logging.getLogger("distributed.nanny")
                level = nanny.level
                nanny.setLevel(logging.ERROR)
                try:
                    self.cluster.close()
                finally:
                    nanny.setLevel(level)
            self._owned = False

    def stream(self, views, tile=None, margin=None, samples=None, skip_glass=True, outlines=False, window=None):
        """:class:`BlockResult` for every block of every view, in order, as
        :meth:`Predictor.stream` gives them (same ids, labels and tables).

        ``views``: file paths or picklable callables that open a view on any machine. Up to
        ``window`` blocks (default twice the cluster's threads, at least 8) are in flight;
        results are handed on in block order. A view whose opening or a block fails gives one
        result with ``error`` set and no further blocks; the others go on.
        """
        self.predictor.require_segmentation()
        openers = [_opener(view) for view in views]
        if window is None:
            window = max(8, 2 * sum(self.client.nthreads().values()))
        planned = self._planned(openers, skip_glass)
        pending, broken, next_id = collections.deque(), set(), {}
        in_flight = 0
        try:
            while True:
                while in_flight < window and len(pending) < 4 * window:  # glass blocks queue too
                    item = next(planned, None)
                    if item is None:
                        break
                    future = None
                    if item.error is None and not item.glass and item.index not in broken:
                        future = self.client.submit(run_block, self.spec, openers[item.index], _plan_of(item),
                                                    tile, margin, samples, outlines, pure=False)
                        in_flight += 1
                    pending.append((item, future))
                if not pending:
                    return
                item, future = pending.popleft()
                if future is not None:
                    in_flight -= 1
                if item.index in broken:
                    if future is not None:
                        future.cancel()
                    continue
                if future is not None:
                    try:
                        item.labels, item.table, item.rings, item.oversized = future.result()
                    except Exception as error:  # reported for this view; the others go on
                        item.error = error
                    del future
                    if item.error is None:
                        first = next_id.get(item.index, 1)
                        number_block(item, first)
                        next_id[item.index] = first + len(item.table["id"])
                if item.error is not None:
                    broken.add(item.index)
                yield item
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()

    def _planned(self, openers, skip_glass):
        """Planned blocks of each view in turn (opened here, on the client, as they are reached)."""
        for index, opener in enumerate(openers):
            try:
                blocks = self.predictor.plan_view(index, opener, skip_glass)
            except Exception as error:  # reported with the view's index; the others go on
                yield BlockResult(index, None, error=error)
                continue
            yield from blocks


def _plan_of(item):
    """What a worker needs to redo a planned block: where it is and the view's intensity ranges."""
    return {"index": item.index, "core": item.core, "box": item.box, "done": item.done, "total": item.total,
            "value_range": item.value_range, "classifier_range": item.classifier_range}


def run_block(spec, opener, plan, tile=None, margin=None, samples=None, outlines=False):
    """On a worker: (block-local labels, table with ``label``, outlines or None, objects too
    wide for the block context) of one planned block, with this process's copy of the model and of the view."""
    predictor, lock = _predictor(spec)
    view = _view(opener)
    result = BlockResult(plan["index"], view, core=plan["core"], box=plan["box"], done=plan["done"],
                         total=plan["total"])
    result.value_range, result.classifier_range = plan["value_range"], plan["classifier_range"]
    with lock:  # one network call at a time per process (LiteRT interpreters are not thread-safe)
        predictor.predict_block(result, tile, margin, samples)
    if predictor.classifier is not None:
        with lock:  # the classifier runs inside post-processing
            predictor.block_instances(result, outlines)
    else:
        predictor.block_instances(result, outlines)
    with _LOCK:
        STATS["blocks"] += 1
    labels = result.labels
    compact = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    return labels.astype(compact), result.table, result.rings, result.oversized


def worker_stats():
    """This worker process's counts: models loaded, blocks done, models and views held
    (``client.run(worker_stats)`` asks every worker)."""
    with _LOCK:
        return {**STATS, "models": len(_PREDICTORS), "views": len(_VIEWS)}


def _predictor(spec):
    """This worker process's (Predictor, lock) for ``spec``, loaded on first use."""
    source, options = spec
    key = (source, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _LOCK:
        entry = _PREDICTORS.get(key)
        if entry is None:
            from kerasnuc.predict.engine import load

            entry = _PREDICTORS[key] = (load(source, **options), threading.Lock())
            STATS["loads"] += 1
            STATS["measured"] += int(getattr(entry[0].runtime, "measured", False))
    return entry


def _view(opener):
    """This worker process's view of ``opener``, opened on first use; the last
    :data:`VIEWS_PER_WORKER` stay open."""
    from kerasnuc.predict.engine import as_view

    key = _opener_key(opener)
    with _LOCK:
        if key is not None and key in _VIEWS:
            _VIEWS.move_to_end(key)
            return _VIEWS[key]
    view = as_view(opener())
    if key is not None:
        with _LOCK:
            _VIEWS[key] = view
            while len(_VIEWS) > VIEWS_PER_WORKER:
                _VIEWS.popitem(last=False)
    return view


def _opener_key(opener):
    """A hashable key naming what ``opener`` opens (a partial: its function and arguments), or None."""
    if not isinstance(opener, functools.partial):
        return None
    key = (opener.func.__module__, opener.func.__qualname__, opener.args, tuple(sorted(opener.keywords.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _opener(view):
    """A picklable callable that opens ``view`` on any machine: a path becomes
    ``open_view(absolute path)``; a partial of a function whose first argument is an existing
    path gets the absolute path. Arrays are refused: workers read pixels themselves."""
    if isinstance(view, (str, os.PathLike)):
        from kerasnuc.predict.sources import open_view

        return functools.partial(open_view, _absolute(view))
    if isinstance(view, functools.partial) and view.args and isinstance(view.args[0], (str, os.PathLike)):
        return functools.partial(view.func, _absolute(view.args[0]), *view.args[1:], **view.keywords)
    if callable(view):
        return view
    raise ValueError("prediction on a Dask cluster opens every input on the workers: give file paths "
                     f"(or callables that open them), not {type(view).__name__}")


def _absolute(path):
    """An existing path made absolute (workers may run elsewhere); anything else unchanged."""
    if isinstance(path, (str, os.PathLike)) and os.path.exists(path):
        return os.path.abspath(path)
    return path
