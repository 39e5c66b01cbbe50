"""Self-describing run directories, written so that a crash never leaves a run that looks complete.

Everything goes to ``<run>.incomplete/`` and the folder is renamed to ``<run>`` only
when the run has finished; JSON files are written through a temporary file.
"""

import os
import shutil

from kerasnuc.runs import read_json, write_json_atomic  # noqa: F401  (the run folder's JSON rules)


class RunDirectory:
    """A run folder under construction; ``finish()`` publishes it."""

    def __init__(self, path, overwrite=False):
        self.final_path = os.path.abspath(path)
        if os.path.exists(self.final_path) and not overwrite:
            raise FileExistsError(f"{self.final_path}: run directory exists; choose another --out "
                                  "or pass --overwrite")
        self.path = self.final_path + ".incomplete"
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.makedirs(self.path)
        self.written = []

    def file(self, name):
        """Path of ``name`` inside the run (recorded for the closing summary)."""
        self.written.append(name)
        return os.path.join(self.path, name)

    def write_json(self, name, data):
        write_json_atomic(self.file(name), data)

    def subfolder(self, name):
        """A run-like view of ``<run>/<name>/`` (one fold of a cross-validation)."""
        return _SubRun(self, name)

    def finish(self):
        if os.path.exists(self.final_path):
            shutil.rmtree(self.final_path)
        os.replace(self.path, self.final_path)
        return self.final_path


class _SubRun:
    """Writes into a folder inside a RunDirectory; published with its parent."""

    def __init__(self, parent, name):
        self.parent, self.name = parent, name
        self.path = os.path.join(parent.path, name)
        os.makedirs(self.path, exist_ok=True)
        self.written = parent.written

    def file(self, name):
        return self.parent.file(os.path.join(self.name, name))

    def write_json(self, name, data):
        write_json_atomic(self.file(name), data)
