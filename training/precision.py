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
