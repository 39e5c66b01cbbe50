"""Self-describing run directories, written so that a crash never leaves a run that looks complete
and two jobs never write one run.

Everything goes to ``<run>.incomplete/`` and the folder is renamed to ``<run>`` only when
the run has finished; JSON files are written through a temporary file. While a job
writes a run it holds an exclusive lock on ``<run>.lock`` (``fcntl.flock``: the kernel
drops it when the process dies, even by ``kill -9``), so a second job on the same
``--out`` fails at once and touches nothing. A crashed job's ``<run>.incomplete/`` is
kept, checkpoint included; ``--resume`` continues it and only ``--overwrite`` deletes
anything.
"""

import fcntl
import os
import shutil
import socket
import time

from kerasnuc.runs import read_json, write_json_atomic  # noqa: F401  (the run folder's JSON rules)


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked; the message says why and what to do."""


class RunLock:
    """An exclusive, non-blocking lock on ``<run>.lock`` for the life of this process's job."""

    def __init__(self, final_path):
        self.path = final_path + ".lock"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise RunDirError(f"{final_path}: another job is writing this run ({holder}); "
                              "wait for it or choose another --out") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.handle.flush()

    def release(self):
        if self.handle.closed:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self.handle.close()


class RunDirectory:
    """A run folder under construction; ``finish()`` publishes it.

    ``resume=True`` continues ``<run>.incomplete/`` as a crashed job left it;
    ``overwrite=True`` replaces an existing run or partial run (and nothing else does).
    """

    def __init__(self, path, overwrite=False, resume=False):
        self.final_path = os.path.abspath(path)
        self.path = self.final_path + ".incomplete"
        self.lock = RunLock(self.final_path)
        try:
            self._prepare(overwrite, resume)
        except BaseException:
            self.lock.release()
            raise
        self.resumed = resume
        self.written = []

    def _prepare(self, overwrite, resume):
        finished, partial = os.path.exists(self.final_path), os.path.exists(self.path)
        if resume:
            if finished and not partial:
                raise RunDirError(f"{self.final_path}: a finished run; nothing to resume")
            if not os.path.isfile(os.path.join(self.path, "config.json")):
                raise RunDirError(f"{self.path}: no partial run to resume (config.json missing)")
            return
        if finished and not overwrite:
            raise RunDirError(f"{self.final_path}: run directory exists; choose another --out "
                              "or pass --overwrite")
        if partial:
            if not overwrite:
                raise RunDirError(f"{self.path}: a partial run left by a job that stopped; continue it with "
                                  f"--resume {self.final_path} or replace it with --overwrite")
            shutil.rmtree(self.path)
        os.makedirs(self.path)

    def file(self, name):
        """Path of ``name`` inside the run (recorded for the closing summary)."""
        if name not in self.written:
            self.written.append(name)
        return os.path.join(self.path, name)

    def write_json(self, name, data):
        write_json_atomic(self.file(name), data)

    def subfolder(self, name):
        """A run-like view of ``<run>/<name>/`` (one fold of a cross-validation)."""
        return _SubRun(self, name)

    def finish(self):
        """Publish the run: drop the resume state, replace an old run (only reached with
        --overwrite), rename, unlock."""
        from training.resume import STATE_DIR

        for root, folders, _ in os.walk(self.path):
            if STATE_DIR in folders:
                shutil.rmtree(os.path.join(root, STATE_DIR))
                folders.remove(STATE_DIR)
        if os.path.exists(self.final_path):
            shutil.rmtree(self.final_path)
        os.replace(self.path, self.final_path)
        self.lock.release()
        return self.final_path

    def release(self):
        """Unlock without publishing (the job failed; the partial run stays for --resume)."""
        self.lock.release()


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
