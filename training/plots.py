"""Figures written into run folders: training curves and prediction overlays.

Matplotlib is needed only for the charts (curves, confusion matrix). Where it is not installed (a GPU
training box with a minimal Python), :func:`pyplot` returns None and the chart is skipped with a
note, so training still finishes and writes its model and metrics.
"""

import sys

import cv2
import numpy as np


def pyplot(path=None):
    """matplotlib.pyplot on the Agg backend, or None (with a note naming ``path``) when not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: skipped {path or 'the chart'}", file=sys.stderr, flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history, path):
    """One panel per metric, train and validation curves per epoch."""
    plt = pyplot(path)
    if plt is None:
        return
    names = [k for k in history if not k.startswith("val_") and k not in ("epoch", "learning_rate", "cycle")]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        epochs = np.arange(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def instance_contours(labels):
    """Boolean (H, W) map of the pixels on instance outlines."""
    labels = np.asarray(labels)
    edges = np.zeros(labels.shape, bool)
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    edges[:-1, :] |= labels[1:, :] != labels[:-1, :]
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    return edges & ((labels > 0) | np.roll(labels > 0, 1, 0) | np.roll(labels > 0, 1, 1))


def overlay(image, true_labels, pred_labels):
    """RGB uint8: truth outlines green, predicted outlines magenta, over the image."""
    rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    low, high = np.percentile(rgb, (0.5, 99.5))
    rgb = np.clip((rgb.astype(np.float32) - low) / max(high - low, 1) * 255, 0, 255).astype(np.uint8)
    out = rgb.copy()
    out[instance_contours(true_labels)] = (0, 255, 0)
    out[instance_contours(pred_labels)] = (255, 0, 255)
    return out


def save_overlays(panels, path, titles=None):
    """Stack several overlay panels side by side (padded to one height) into a PNG."""
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 8), (0, 0)), constant_values=255) for p in panels]
    strip = np.concatenate(padded, axis=1)
    if titles:
        header = np.full((24, strip.shape[1], 3), 255, np.uint8)
        x = 0
        for panel, title in zip(padded, titles):
            cv2.putText(header, title[:40], (x + 4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
            x += panel.shape[1]
        strip = np.concatenate([header, strip], axis=0)
    cv2.imwrite(path, cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
