"""The core is plain torch: importing it must not need (or pull in) Ray."""

import subprocess
import sys

CODE = """
import sys
sys.modules["ray"] = None  # any `import ray` now raises ImportError
import raydistill.core.losses, raydistill.core.pruning, raydistill.core.metrics, raydistill.core.surgery
import raydistill.augment  # not core, but the cache actors and the worker share it: plain torch too
assert not any(m == "ray" or m.startswith("ray.")
               for m in sys.modules if sys.modules[m] is not None), "ray got imported"
print("ok")
"""


def test_core_imports_without_ray():
    # A fresh interpreter: this test process may already have Ray loaded by other tests.
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
