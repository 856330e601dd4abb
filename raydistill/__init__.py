"""raydistill: knowledge distillation, pruning and quantization orchestrated with Ray.

The Python API (``raydistill.run``, ``raydistill.tune``, ``raydistill.load_student``) is in ``raydistill.api``;
importing the package loads neither torch nor Ray (they are imported when a function is called).
"""

__version__ = "0.1.0"

from raydistill.api import RunResult, TuneResult, load_config, load_student, run, tune  # noqa: E402

__all__ = ["RunResult", "TuneResult", "__version__", "load_config", "load_student", "run", "tune"]
