"""Atomic file writes: a crash or an error never leaves half a file under the final name.

Every writer in kerasnuc goes through :func:`atomic_path`: the data is written to a
temporary name beside the target and renamed into place only when complete. The
temporary name keeps the file's full suffix (``model.tmp123.keras``,
``epoch-0001.tmp123.weights.h5``, ``x.tmp123.ome.tif``) because Keras, tifffile and
OpenCV choose the format from it.
"""

import contextlib
import os

__all__ = ["atomic_path", "made_folders", "temporary_name", "write_text_atomic"]


def temporary_name(path):
    """``folder/stem.tmp<pid><suffixes>`` for ``folder/stem<suffixes>``."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    stem, dot, suffixes = name.partition(".")
    return os.path.join(folder, f"{stem}.tmp{os.getpid()}{dot}{suffixes}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any
    error it is removed and the previous ``path`` (if any) is left untouched."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text, newline=None):
    """Write ``text`` (str, or an iterable of lines) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline=newline, encoding="utf-8") as handle:
            if isinstance(text, str):
                handle.write(text)
            else:
                handle.writelines(text)


@contextlib.contextmanager
def made_folders(folder):
    """``os.makedirs(folder)``; if the block then fails, the folders this call created are
    removed again (innermost first) where still empty, so a failed export leaves no trace."""
    created, parent = [], os.path.abspath(folder)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for path in created:
            try:
                os.rmdir(path)
            except OSError:  # not empty (another job wrote there meanwhile) or already gone
                pass
        raise
