"""Measuring a model the way every report row is measured: on the held-out test split, one thread.

One owner for the evaluation that the pipeline's report and the sweep's trials both use, so their
figures are comparable.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from raydistill.config import Config
from raydistill.core.metrics import LATENCY_BUDGET_S, accuracy_over, latency_ms, model_costs, weight_sparsity
from raydistill.errors import ConfigError

LATENCY_THREADS = 1  # latency measured single-threaded: comparable across machines and runs


def test_example(data) -> torch.Tensor:
    """One test sample (1, *shape): the example input that sizes MACs, latency and export."""
    return torch.from_numpy(data.head("test", 1)[0])


def test_accuracy(model: torch.nn.Module, data) -> float:
    """Top-1 accuracy on the test split, read batch by batch (``data``: in-memory Splits or a streamed run's
    StreamData)."""
    return accuracy_over(model, ((x, y) for x, y, _ in data.batches("test")))


@contextlib.contextmanager
def latency_threads():
    """torch on ``LATENCY_THREADS`` threads for the measurement, the caller's setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def latencies(model, shape: tuple[int, ...], budget_s: float = LATENCY_BUDGET_S) -> tuple[float, float]:
    """Latency (ms) at batch 1 and at batch 64, measured as for every report row: ``LATENCY_THREADS`` threads,
    up to ``budget_s`` (``report.latency_budget_s``) of timed runs each."""
    with latency_threads():
        return (latency_ms(model, shape, batch_size=1, budget_s=budget_s),
                latency_ms(model, shape, batch_size=64, budget_s=budget_s))


def evaluate_on_test(model: torch.nn.Module, data, latency_budget_s: float = LATENCY_BUDGET_S) -> dict:
    """Accuracy, params, MACs, latency at batch 1 and 64 (``core.metrics.model_costs``: the same measurement as
    ``latencies``, within ``latency_budget_s``), size and sparsity of ``model`` on the test split."""
    model = model.cpu().eval()
    with latency_threads():
        return {"accuracy": test_accuracy(model, data),
                **model_costs(model, test_example(data), latency_budget_s=latency_budget_s)}


def val_accuracy(model: torch.nn.Module, data) -> float:
    """Accuracy on the validation split, read batch by batch: what every choice between models is made on (the
    test split only reports)."""
    return accuracy_over(model.cpu().eval(), ((x, y) for x, y, _ in data.batches("val")))


def quantize_student(cfg: Config, final: torch.nn.Module, final_name: str, final_row: dict, spec: dict,
                     data, out: Path) -> dict:
    """Post-training int8 of the final student (torchao, ``quantize.scheme``); its report row, measured on the
    int8 model as saved: ``student_int8.pt`` (a state dict, reloaded here through ``core.quantize.load_quantized``)
    or, for ``pt2e_x86``, a ``torch.export`` program in ``int8/``. ``final_row`` is the fp32 student's row
    (``evaluate_on_test``): params and MACs are the fp32 model's. ``quantize.scheme: auto`` is resolved here
    (``core.quantize.choose_scheme``); the row records the scheme used (``scheme``), the one asked for
    (``scheme_requested``) and why (``scheme_reason``)."""
    from raydistill.checkpoints import atomic_write_bytes
    from raydistill.core.quantize import choose_scheme, load_quantized, quantize_int8

    scheme, reason = choose_scheme(final, cfg.quantize.scheme)
    example = test_example(data)
    shape = tuple(example.shape[1:])
    calib = torch.from_numpy(data.head("val", cfg.quantize.calibration_samples)[0])
    try:
        q = quantize_int8(final.eval(), scheme, calibration_data=calib)
    except ValueError as e:  # core's checks and torchao's pattern matching: this scheme does not fit this student
        raise ConfigError(f"quantize.scheme={scheme} cannot quantize the student ({str(e).splitlines()[0][:160]}); "
                          "set quantize.scheme to another scheme or none") from e
    info = None
    if scheme == "pt2e_x86":  # an exported graph: saved as a torch.export program
        from raydistill.export import export_model

        info = export_model(q, example, out / "int8")
        size = (out / "int8" / "student.pt2").stat().st_size if (out / "int8" / "student.pt2").exists() else 0
        sparsity = final_row["sparsity"]
    else:
        buf = io.BytesIO()
        torch.save({"spec": spec, "scheme": scheme, "state_dict": q.state_dict()}, buf)
        atomic_write_bytes(out / "student_int8.pt", buf.getvalue())
        size = len(buf.getvalue())
        saved = torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
        q = load_quantized(saved["state_dict"], final, scheme)  # measure what was written, not what is in memory
        sparsity = weight_sparsity(q)
    b1, b64 = latencies(q, shape, cfg.report.latency_budget_s)
    with latency_threads():
        return {"accuracy": test_accuracy(q, data), "params": final_row["params"], "macs": final_row["macs"],
                "latency_ms_b1": b1, "latency_ms_b64": b64, "size_bytes": size, "sparsity": sparsity, "scheme": scheme,
                "scheme_requested": cfg.quantize.scheme, "scheme_reason": reason, "from": final_name, "export": info}
