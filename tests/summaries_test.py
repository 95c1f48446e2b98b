"""Tests of fastscnn_jax.summaries' writer and progress reports for hosts without TensorFlow (the training
loop's use of them: tests/no_tensorflow_test.py)."""

import json

import pytest

from fastscnn_jax import summaries


class _Collect:
    """A writer that keeps what it is given."""

    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, scalars):
        self.scalars.append((step, scalars))


def test_progress_leaves_evaluation_out_of_the_rate(monkeypatch):
    """Steps/s is reported once `every_secs` have passed, over the time not spent in `timed` blocks."""
    clock = [0.0]
    monkeypatch.setattr(summaries.time, "monotonic", lambda: clock[0])
    writer = _Collect()
    progress = summaries.Progress(num_train_steps=100, writer=writer, every_secs=10)
    progress(1)
    clock[0] = 5.0
    progress(5)  # too soon: nothing reported
    with progress.timed("eval"):
        clock[0] = 15.0  # 10 s of evaluation
    clock[0] = 25.0
    progress(21)  # 20 steps in 25 - 10 = 15 s of training
    assert writer.scalars == [(21, {"steps_per_sec": pytest.approx(20 / 15)})]
    clock[0] = 30.0
    progress(30)
    assert len(writer.scalars) == 1  # the next report counts from step 21 at 25 s
    clock[0] = 35.0
    progress(31)
    assert writer.scalars[1] == (31, {"steps_per_sec": pytest.approx(10 / 10)})


def test_json_lines_writer_appends(tmp_path):
    """Each write is one JSON line, floats from any number type; a second writer (a resumed run) appends."""
    summaries.JsonLinesWriter(str(tmp_path)).write_hparams({"batch_size": 8})
    writer = summaries.JsonLinesWriter(str(tmp_path))
    writer.write_scalars(3, {"train_loss": 1.5, "train_miou": 0})
    writer.flush()
    lines = (tmp_path / summaries.SCALARS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0] == {"hparams": {"batch_size": 8}}
    assert records[1]["step"] == 3 and records[1]["train_loss"] == 1.5 and records[1]["train_miou"] == 0.0
    assert records[1]["time"] > 0
