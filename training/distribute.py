"""Data-parallel training across devices and machines, chosen by ``--distribute``.

* ``data_parallel`` (KERAS_BACKEND=jax): ``keras.distribution.DataParallel`` over
  ``keras.distribution.list_devices()``; every batch is one global array split along its
  first axis over the devices, variables are replicated. Several machines: set
  ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (the coordinator's host:port), ``_NUM_PROCESSES`` and
  ``_PROCESS_ID`` on each; ``keras.distribution.initialize()`` joins them first, and each
  process feeds its slice of every batch (:func:`local_batches`).
* ``mirrored`` (tensorflow): ``tf.distribute.MirroredStrategy`` over the machine's GPUs
  (its logical CPUs when it has none).
* ``multi_worker`` (tensorflow): ``tf.distribute.MultiWorkerMirroredStrategy``, one
  process per machine, each reading its cluster and its own index from ``TF_CONFIG``.
  Keras 3.15's fit cannot train across workers (MULTI_WORKER_BROKEN below), so a TF_CONFIG
  listing more than one worker is refused with that reason.
* ``auto``: data_parallel on JAX and mirrored on TensorFlow when there is more than one
  accelerator, else none.

``batch_size`` stays the global batch in every mode: each of N replicas gets
``batch_size / N`` crops, so one step sees the same crops as on one device (the batch must
be divisible by N). The model is built, compiled, trained and evaluated inside the
returned scope (training.fit does that in one place).
"""

import contextlib
import functools
import json
import os

CHOICES = ("none", "auto", "data_parallel", "mirrored", "multi_worker")
BACKEND_OF = {"data_parallel": "jax", "mirrored": "tensorflow", "multi_worker": "tensorflow"}
JAX_CLUSTER_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                         "KERAS_DISTRIBUTION_PROCESS_ID")


# Checked with two local workers (Keras 3.15.1, TensorFlow 2.21): Keras 3's fit cannot train
# across workers. Its symbolic build reduces a PerReplica data batch across workers ("Attempt to
# convert a value (PerReplica...) to a Tensor"); past that, its metric reduction fails ("Invalid
# reduction dimension 0 for input with 0 dimensions"): keras-team/keras#20585,
# tensorflow/tensorflow#72388. A single worker trains (checked on a toy model).
MULTI_WORKER_BROKEN = ("distribute multi_worker: TF_CONFIG lists {workers} workers, but Keras {keras}'s fit "
                       "cannot train with MultiWorkerMirroredStrategy across workers (keras-team/keras#20585); "
                       "use --distribute mirrored on one machine, or KERAS_BACKEND=jax --distribute data_parallel on several")


def _keras_version():
    import keras

    return keras.__version__


def check_choice(choice, backend=None):
    """ValueError (one line) when ``choice`` is unknown or needs another Keras backend."""
    if choice not in CHOICES:
        raise ValueError(f"distribute must be one of {CHOICES}, got '{choice}'")
    needed = BACKEND_OF.get(choice)
    if needed is None:
        return
    if backend is None:
        import keras

        backend = keras.backend.backend()
    if backend != needed:
        raise ValueError(f"distribute '{choice}' needs KERAS_BACKEND={needed}, but Keras runs on {backend}"
                         + ("; use mirrored or multi_worker there" if needed == "jax" else
                            "; use data_parallel there"))


def _accelerators(backend):
    """How many GPUs/TPUs the backend sees (for 'auto')."""
    if backend == "jax":
        import jax

        return sum(d.platform != "cpu" for d in jax.devices())
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    return 0


def resolve_choice(choice, backend=None):
    """'auto' -> data_parallel (JAX) / mirrored (TensorFlow) with 2+ accelerators, else 'none'."""
    import keras

    backend = backend or keras.backend.backend()
    check_choice(choice, backend)
    if choice != "auto":
        return choice
    if backend in ("jax", "tensorflow") and _accelerators(backend) > 1:
        return "data_parallel" if backend == "jax" else "mirrored"
    return "none"


def _check_batch(batch_size, replicas, what):
    if batch_size % replicas:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {replicas} replicas of {what} "
                         "(it is the global batch, split evenly)")


def _jax_scope(batch_size, log):
    """DataParallel over every device of the cluster (joined first when its variables are set)."""
    import keras

    given = [name for name in JAX_CLUSTER_VARIABLES if os.environ.get(name)]
    if given:
        if len(given) < len(JAX_CLUSTER_VARIABLES):
            missing = sorted(set(JAX_CLUSTER_VARIABLES) - set(given))
            raise ValueError(f"data_parallel on several machines needs {', '.join(JAX_CLUSTER_VARIABLES)}; "
                             f"missing {', '.join(missing)}")
        keras.distribution.initialize()
    import jax

    devices = keras.distribution.list_devices()
    _check_batch(batch_size, len(devices), "data_parallel")
    processes = jax.process_count()
    # Several processes: each feeds its own slice of every batch (local_batches), so Keras
    # must not try to shard the PyDataset itself (it only can for tf.data).
    distribution = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=processes == 1)
    where = f", process {jax.process_index()} of {processes}" if processes > 1 else ""
    log(f"distribute: data_parallel over {len(devices)} devices{where} ({', '.join(map(str, devices))}), "
        f"{batch_size // len(devices)} crops per device")
    return distribution.scope()


def _tf_strategy(choice):
    """The tf.distribute strategy of ``choice`` (created before TensorFlow runs anything)."""
    import tensorflow as tf

    if choice == "multi_worker":
        text = os.environ.get("TF_CONFIG", "")
        try:
            cluster = json.loads(text) if text else None
        except json.JSONDecodeError as error:
            raise ValueError(f"TF_CONFIG is not valid JSON ({error})") from None
        if not isinstance(cluster, dict) or "cluster" not in cluster or "task" not in cluster:
            raise ValueError("distribute multi_worker needs TF_CONFIG with 'cluster' and 'task' "
                             "(see README, Scale-out)")
        workers = sum(len(v) for k, v in cluster["cluster"].items() if k in ("chief", "worker"))
        if workers > 1:
            raise ValueError(MULTI_WORKER_BROKEN.format(workers=workers, keras=_keras_version()))
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices)


def distribution_scope(choice, batch_size, log=print):
    """Set up ``choice`` and return the context manager to build, compile and fit the model in.

    Called before TensorFlow or JAX run anything (multi-worker TensorFlow must configure its
    collectives first). Raises ValueError (one line) for a
    choice that does not fit the backend, a missing cluster description or a global batch
    that does not split evenly.
    """
    import keras

    choice = resolve_choice(choice)
    if choice == "none":
        return contextlib.nullcontext()
    if keras.backend.backend() == "jax":
        return _jax_scope(batch_size, log)
    strategy = _tf_strategy(choice)
    replicas = strategy.num_replicas_in_sync
    _check_batch(batch_size, replicas, choice)
    log(f"distribute: {choice}, {replicas} replicas ({type(strategy).__name__}), "
        f"{batch_size // replicas} crops per replica")
    return strategy.scope()


def local_batches(dataset):
    """What this process feeds to ``fit`` under a JAX ``keras.distribution`` over N devices in
    P processes: each batch cut to a multiple of N samples, then this process's 1/P of it
    (process p: rows p*B/P to (p+1)*B/P). Why: JAX cannot split a batch of 3 over 2 devices
    (IndivisibleError; only an evaluation dataset's last batch is ever short, e.g.
    ClassificationDataset(evaluation=True), so at most N-1 of its samples are left out of
    the validation metrics), and with several processes Keras joins the processes' batches
    into one global batch. Every process draws the same global batch (same seed), so the
    result is what one process training on the whole batch gives. Otherwise ``dataset``."""
    import keras

    if dataset is None or keras.backend.backend() != "jax" or keras.distribution.distribution() is None:
        return dataset
    import jax

    devices = len(keras.distribution.distribution().device_mesh.devices.flatten())
    if devices == 1:
        return dataset
    return _local_batches_class()(dataset, devices, jax.process_index(), jax.process_count())


@functools.cache
def _local_batches_class():
    """The PyDataset class below, made on first use (this module imports no Keras at load)."""
    import keras

    class LocalBatches(keras.utils.PyDataset):
        """Batches of ``dataset`` cut to a multiple of ``multiple`` samples (a last batch shorter
        than that is left out), then slice ``process`` of ``processes`` equal slices."""

        def __init__(self, dataset, multiple, process=0, processes=1):
            super().__init__(workers=dataset.workers, use_multiprocessing=dataset.use_multiprocessing,
                             max_queue_size=dataset.max_queue_size)
            self.dataset, self.multiple = dataset, int(multiple)
            self.process, self.processes = int(process), int(processes)
            last = len(dataset) - 1
            self.length = len(dataset) - (1 if last >= 0 and len(dataset[last][0]) < self.multiple else 0)

        def __len__(self):
            return self.length

        def __getitem__(self, index):
            batch = self.dataset[index]
            share = len(batch[0]) // self.multiple * self.multiple // self.processes
            rows = slice(self.process * share, (self.process + 1) * share)
            return tuple(part[rows] for part in batch)

        def on_epoch_end(self):
            self.dataset.on_epoch_end()

    return LocalBatches
