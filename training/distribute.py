"""Data-parallel training across devices and machines, chosen by ``--distribute``.

* ``data_parallel`` (KERAS_BACKEND=jax): ``keras.distribution.DataParallel`` over
  ``keras.distribution.list_devices()``; every batch is one global array split along its
  first axis over the devices, variables are replicated. One machine only so far: with
  ``KERAS_DISTRIBUTION_*`` set (several machines, ``keras.distribution.initialize()``) it
  stops with an error saying why (MULTI_HOST_TODO below).
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
                       "train on one machine's GPUs with --distribute mirrored")


# Checked with two local JAX processes (keras.distribution.initialize, DataParallel): training
# works and equals one process when each process feeds its own slice of the global batch
# (auto_shard_dataset=False; Keras refuses a PyDataset otherwise), but training.fit does not slice
# its PyDatasets per process yet, and its held-out evaluation (predict_on_batch inside the
# distribution) cannot fetch arrays that span other hosts.
MULTI_HOST_TODO = ("distribute data_parallel: {given} set, but training.fit trains on one machine's devices "
                   "only so far (its batches are not yet split per process and its evaluation cannot read "
                   "arrays spanning other hosts; see README, Scale-out); unset them")


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
    """DataParallel over this machine's devices."""
    import keras

    given = [name for name in JAX_CLUSTER_VARIABLES if os.environ.get(name)]
    if given:
        raise ValueError(MULTI_HOST_TODO.format(given=", ".join(given)))
    devices = keras.distribution.list_devices()
    _check_batch(batch_size, len(devices), "data_parallel")
    log(f"distribute: data_parallel over {len(devices)} devices ({', '.join(map(str, devices))}), "
        f"{batch_size // len(devices)} crops per device")
    return keras.distribution.DataParallel(devices=devices).scope()


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


def whole_batches(dataset):
    """``dataset``, or under a JAX ``keras.distribution`` over N devices a view of it whose
    batches are cut to a multiple of N samples. Why: JAX cannot split a batch of 3 over 2
    devices (IndivisibleError in fit's validation); only an evaluation dataset's last batch is
    ever short (ClassificationDataset(evaluation=True)), so at most N-1 of its samples are left
    out of the validation metrics. tf.distribute splits uneven batches itself."""
    import keras

    if dataset is None or keras.backend.backend() != "jax" or keras.distribution.distribution() is None:
        return dataset
    devices = len(keras.distribution.distribution().device_mesh.devices.flatten())
    return dataset if devices == 1 else _even_batches_class()(dataset, devices)


@functools.cache
def _even_batches_class():
    """The PyDataset class below, made on first use (this module imports no Keras at load)."""
    import keras

    class EvenBatches(keras.utils.PyDataset):
        """Batches of ``dataset`` cut to a multiple of ``multiple`` samples (a last batch
        shorter than that is left out)."""

        def __init__(self, dataset, multiple):
            super().__init__()
            self.dataset, self.multiple = dataset, int(multiple)
            last = len(dataset) - 1
            self.length = len(dataset) - (1 if last >= 0 and len(dataset[last][0]) < self.multiple else 0)

        def __len__(self):
            return self.length

        def __getitem__(self, index):
            batch = self.dataset[index]
            keep = len(batch[0]) // self.multiple * self.multiple
            return tuple(part[:keep] for part in batch)

        def on_epoch_end(self):
            self.dataset.on_epoch_end()

    return EvenBatches
