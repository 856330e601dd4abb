"""track.mlflow and track.tensorboard with their local stores (no Ray, no server)."""

import socket
import struct

import pytest

import raydistill
from raydistill import config
from raydistill.errors import ConfigError
from raydistill.track import check_tracking, log_run, mlflow_uri

HISTORIES = {"teacher": [{"stage": "teacher", "epoch": 0, "loss": 1.5, "val_acc": 0.5},
                         {"stage": "teacher", "epoch": 1, "loss": 0.9, "val_acc": 0.7}],
             "student_kd": [{"stage": "student_kd", "epoch": 0, "loss": 2.0, "val_acc": 0.4, "ratio": 0.0}]}


def _report(cfg):
    return {"models": {"teacher": {"accuracy": 0.75, "macs": 1000, "scheme": "x"},
                       "student_kd": {"accuracy": 0.6, "macs": 100}},
            "gains": {"kd_accuracy_gain_vs_baseline": 0.02}, "config": cfg.to_dict()}


def test_mlflow_gets_params_nested_stage_runs_per_epoch_metrics_and_the_report(tmp_path):
    from mlflow import MlflowClient

    cfg = config.load(None, {"track.mlflow": True, "track.tensorboard": True})
    check_tracking(cfg, tmp_path)
    for name in ("report.md", "report.json", "report.png"):
        (tmp_path / name).write_text(name)
    log_run(cfg, tmp_path, _report(cfg), HISTORIES)

    uri = mlflow_uri(cfg, tmp_path)
    assert uri.startswith("sqlite:///") and (tmp_path / "mlflow" / "mlflow.db").is_file()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("raydistill")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"teacher", "student_kd"} and parent.info.run_name == tmp_path.name
    assert parent.data.params["distill.alpha"] == "0.5" and parent.data.params["track.mlflow"] == "True"
    assert parent.data.metrics["student_kd.accuracy"] == 0.6 and parent.data.metrics["teacher.macs"] == 1000
    history = client.get_metric_history(children["teacher"].info.run_id, "val_acc")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.5), (1, 0.7)]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"report.md", "report.json", "report.png"}
    assert str(tmp_path / "mlflow" / "artifacts") in parent.info.artifact_uri  # in the run folder, not ./mlruns
    assert all(r.info.status == "FINISHED" for r in runs)

    # TensorBoard: one folder of event files per stage, the per-epoch scalars in them
    files = sorted((tmp_path / "tensorboard" / "teacher").glob("events.out.tfevents.*"))
    assert files and _scalars(files[0]) == {("loss", 0): 1.5, ("loss", 1): 0.9, ("val_acc", 0): 0.5,
                                            ("val_acc", 1): 0.7}
    assert ("ratio", 0) in _scalars(next((tmp_path / "tensorboard" / "student_kd").glob("events.*")))


def _scalars(path):
    """The scalar summaries of a TensorBoard event file (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    data, found, i = path.read_bytes(), {}, 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        for v in event.summary.value:
            found[(v.tag, event.step)] = pytest.approx(v.simple_value)
        i += 12 + n + 4
    return found


def test_an_unreachable_tracking_server_fails_before_anything_runs(tmp_path):
    # a port bound here and never listened on refuses every connection; held for the whole test, so no other process
    # (the other pytest worker's Ray picks random ports) can start listening on it meanwhile
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises(ConfigError, match=f"track.mlflow_uri {url} is unreachable"):
            raydistill.run(None, tmp_path / "run", quiet=True, track={"mlflow": True, "mlflow_uri": url})
    assert not (tmp_path / "run").exists()  # nothing written, no Ray started, no training


def test_a_file_store_is_refused_in_one_line(tmp_path):
    cfg = config.load(None, {"track.mlflow": True, "track.mlflow_uri": (tmp_path / "mlruns").as_uri()})
    with pytest.raises(ConfigError, match="cannot be used") as err:
        check_tracking(cfg, tmp_path)
    assert "\n" not in str(err.value)
