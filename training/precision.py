"""Choosing the mixed-precision policy: mixed on GPUs, float32 on CPUs (where mixed is slower)."""

import keras


def gpu_available():
    """True if the active Keras backend sees a GPU."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "torch":
            import torch

            return torch.cuda.is_available()
    except Exception:  # a broken GPU stack means: no GPU
        return False
    return False


def accelerator_name():
    """The GPU the active backend trains on (e.g. 'NVIDIA H200'), or None: recorded in config.json."""
    if not gpu_available():
        return None
    try:
        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            return next(d.device_kind for d in jax.devices() if d.platform == "gpu")
        if backend == "tensorflow":
            import tensorflow as tf

            gpu = tf.config.list_physical_devices("GPU")[0]
            return tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        if backend == "torch":
            import torch

            return torch.cuda.get_device_name(0)
    except Exception:
        return "GPU"
    return "GPU"


def resolve_precision(requested):
    """'auto' -> 'mixed_float16' with a GPU else 'float32'; others pass through."""
    if requested == "auto":
        return "mixed_float16" if gpu_available() else "float32"
    return requested


def apply_precision(requested):
    """Set the global dtype policy and return the policy name used."""
    policy = resolve_precision(requested)
    keras.mixed_precision.set_dtype_policy(policy)
    return policy
