"""`raydistill run` on samples that are not square images, with a declared test file (issue 13): a 1-D signal
set (C, L) with the user's own 1-D CNN, a tabular (F,) set with the built-in MLP, a non-square image set
(3, 24, 40) with the built-in CNN, as flat features, as PNG images streamed and decoded where they are read, and
as uint8 lists (read as the 8-bit images they are).
The signals are stored as nested lists, one level per dimension (``x.tolist()``, HF datasets' Array2D), the others
as flat rows. Local mode, one epoch per stage."""

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from smoke import SMOKE

from raydistill import config
from raydistill.pipeline import run

pytestmark = pytest.mark.ray

CONV1D = '''
import torch.nn as nn


def conv1d(num_classes, input_shape, width=8):
    """A 1-D CNN for (C, L) signals."""
    channels, length = input_shape
    return nn.Sequential(nn.Conv1d(channels, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Conv1d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.Linear(2 * width, num_classes))
'''


def _files(folder, shape, rows=(240, 60), classes=4, seed=0, encoded=False, nested=False, pixels=False):
    """A learnable set: each class its own mean per channel (per feature for (F,)) plus noise; train ids 0..,
    test ids 10000... ``encoded``: the (3, H, W) samples as PNG images (8 bits a channel) in a column ``png``;
    ``nested``: each sample as nested lists of its shape instead of one flat list; ``pixels``: the PNGs' 8-bit
    pixels as one flat list of uint8 a row."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, shape[0], *[1] * (len(shape) - 1)))
    means = np.broadcast_to(means, (classes, *shape)).reshape(classes, -1).astype(np.float32)
    paths = []
    for name, n, first in (("train", rows[0], 0), ("test", rows[1], 10_000)):
        y = np.arange(n) % classes
        x = means[y] + 0.5 * rng.standard_normal((n, means.shape[1])).astype(np.float32)
        columns = {"id": np.arange(first, first + n), "label": y, "features": list(x)}
        if nested:
            columns["features"] = pa.array(x.reshape(n, *shape).tolist(), pa.list_(pa.list_(pa.float32())))
        if pixels:
            columns["features"] = pa.array(list(np.clip(128 + 40 * x, 0, 255).astype(np.uint8)), pa.list_(pa.uint8()))
        if encoded:
            columns.pop("features")
            columns["png"] = [_png(np.clip(128 + 40 * row.reshape(shape), 0, 255).astype(np.uint8)) for row in x]
        path = folder / f"{name}.parquet"
        pq.write_table(pa.table(columns), path)
        paths.append(str(path))
    return paths


def _png(chw: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(chw.transpose(1, 2, 0)).save(out, format="PNG")
    return out.getvalue()


CASES = {
    "signal": ((2, 30), {"student.model": "shape_models:conv1d", "student.kwargs": {"width": 8},
                         "teacher.model": "shape_models:conv1d", "teacher.kwargs": {"width": 32},
                         "distill.teacher_mode": "inprocess"}),  # streamed (auto: the files have ids)
    "tabular": ((12,), {"student.model": "mlp", "student.kwargs": {"hidden": [16]},
                        "teacher.model": "mlp", "teacher.kwargs": {"hidden": [128]}, "data.stream": False}),
    "wide_image": ((3, 24, 40), {"student.model": "cnn", "student.kwargs": {"widths": [4, 8], "hidden": 16},
                                 "teacher.model": "cnn", "teacher.kwargs": {"widths": [8, 16], "hidden": 32},
                                 "data.stream": False}),
    # the same images as PNG bytes (how image sets are shipped as Parquet): streamed, decoded where they are read
    "encoded_image": ((3, 24, 40), {"student.model": "cnn", "student.kwargs": {"widths": [4, 8], "hidden": 16},
                                    "teacher.model": "cnn", "teacher.kwargs": {"widths": [8, 16], "hidden": 32},
                                    "data.image_column": "png", "data.image_size": [24, 40]}),
    # the same 8-bit pixels as uint8 lists (numpy images written as they are): streamed, read as images
    "pixel_lists": ((3, 24, 40), {"student.model": "cnn", "student.kwargs": {"widths": [4, 8], "hidden": 16},
                                  "teacher.model": "cnn", "teacher.kwargs": {"widths": [8, 16], "hidden": 32}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_on_any_sample_shape_with_a_declared_test_file(case, ray_local, tmp_path, monkeypatch):
    shape, overrides = CASES[case]
    (tmp_path / "shape_models.py").write_text(CONV1D)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("shape_models", None)
    train, test = _files(tmp_path, shape, encoded=case == "encoded_image", nested=case == "signal",
                         pixels=case == "pixel_lists")
    cfg = config.load(None, {**SMOKE, "data.limit": None, "data.source": "parquet", "data.train": train,
                             "data.test": test, "data.shape": list(shape), "prune.ratio": 0.25,
                             "deploy.min_accuracy": 0.0, **overrides})
    out = tmp_path / "run"
    report = run(cfg, out, quiet=True)

    data = report["data"]
    assert data["sample_shape"] == list(shape)
    assert data["splits"]["test"] == {"from": f"declared: data.test={test}", "size": 60}
    assert data["streamed"] is (case in ("signal", "encoded_image", "pixel_lists"))
    # 8-bit images (PNGs, uint8 lists) are scaled and standardized per channel, and the report and the exported
    # artifact say how; float features are taken as stored
    eight_bit = case in ("encoded_image", "pixel_lists")
    assert (data["normalization"] is not None) is eight_bit
    if eight_bit:
        assert data["normalization"]["scale"] == 1 / 255 and len(data["normalization"]["mean"]) == 3
    assert data["splits"]["val"]["from"].startswith("carved") and 10 < data["splits"]["val"]["size"] < 40
    # the test split is the declared file, row for row: its ids are what every model was scored on
    from raydistill.pipeline import load_data

    np.testing.assert_array_equal(load_data(cfg).test.ids, np.arange(10_000, 10_060))
    models = report["models"]
    assert set(models) >= {"teacher", "student_baseline", "student_kd", "student_pruned", "student_int8"}
    assert models["student_pruned"]["macs"] < models["student_kd"]["macs"]  # pruned on the true shape
    assert models["teacher"]["accuracy"] > 0.5  # 4 classes: it learned from samples of this shape
    artifact = json.loads((out / "deploy" / "artifact.json").read_text())
    assert artifact["input_shape"] == list(shape)  # the exported program takes one sample of this shape
    assert artifact["input_normalization"] == data["normalization"]
