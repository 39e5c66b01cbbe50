"""Python source that, run first in a subprocess, makes importing the packages named in the
``KERASNUC_BLOCKED`` environment variable (comma-separated) fail, as on a device where they
are not installed; ``LEAK_CHECK`` asserts at the end that none of them was imported."""

PREAMBLE = r'''
import os
import sys

BLOCKED = set(os.environ["KERASNUC_BLOCKED"].split(","))


class BlockImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named '{name}' (blocked by the test)")
        return None


sys.meta_path.insert(0, BlockImports())
'''

LEAK_CHECK = r'''
leaked = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
assert not leaked, f"imported {leaked}"
'''

FRAMEWORKS = ("tensorflow", "keras", "jax", "tf_keras")


def environment(blocked=FRAMEWORKS):
    import os

    return {**os.environ, "KERASNUC_BLOCKED": ",".join(blocked)}
