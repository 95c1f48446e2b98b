"""Where the training loop's scalars and progress reports go.

Where TensorFlow imports: clu's default writer (the log, and TensorBoard event files in the workdir, written
asynchronously) and clu's progress reports. clu's writers import TensorFlow, so where it does not import (GPU
images and Colab runtimes without it) the scalars go to the log and to `WORKDIR/scalars.jsonl`, one JSON
object per write, and progress is reported in the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from absl import logging

try:
    from clu import metric_writers, periodic_actions
except ImportError:  # clu's TensorBoard writer needs TensorFlow.
    metric_writers = periodic_actions = None

SCALARS_FILE = "scalars.jsonl"


class JsonLinesWriter:
    """Scalars to the log and, one JSON object per write, to `WORKDIR/scalars.jsonl` (appended, so a resumed
    run adds to it). The methods are those of clu's `MetricWriter` that training uses."""

    def __init__(self, workdir: str):
        """Writes to `workdir/scalars.jsonl`."""
        self.path = os.path.join(workdir, SCALARS_FILE)

    def _append(self, record: dict) -> None:
        """One line, written and closed at once: the file is complete up to the last write if the run dies."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_scalars(self, step: int, scalars: dict) -> None:
        """Logs and appends `{"step": step, "time": unix seconds, **scalars}`."""
        scalars = {k: float(v) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))
        self._append({"step": step, "time": time.time(), **scalars})

    def write_hparams(self, hparams: dict) -> None:
        """Logs and appends `{"hparams": hparams}`."""
        logging.info("[Hyperparameters] %s", hparams)
        self._append({"hparams": hparams})

    def flush(self) -> None:
        """Nothing is buffered."""


class Discard:
    """A writer for the processes of a multi-host job other than process 0, which writes the job's."""

    def write_scalars(self, step: int, scalars: dict) -> None:
        """Discards."""

    def write_hparams(self, hparams: dict) -> None:
        """Discards."""

    def flush(self) -> None:
        """Nothing to flush."""


class Progress:
    """Logs steps/s, progress and ETA about once a minute, and writes `steps_per_sec`, as clu's
    `ReportProgress` does; time spent in `timed` blocks (evaluation) is left out of the rate."""

    def __init__(self, num_train_steps: int, writer, every_secs: float = 60.0):
        """Reports on `writer` every `every_secs` seconds of `__call__`s."""
        self.num_train_steps, self.writer, self.every_secs = num_train_steps, writer, every_secs
        self._last_time, self._last_step, self._excluded = None, None, 0.0

    def __call__(self, step: int) -> None:
        """Called after each step."""
        now = time.monotonic()
        if self._last_time is None:
            self._last_time, self._last_step = now, step
            return
        if now - self._last_time < self.every_secs:
            return
        rate = (step - self._last_step) / max(now - self._last_time - self._excluded, 1e-9)
        eta_min = (self.num_train_steps - step) / rate / 60
        logging.info(
            "%.1f steps/s, %.1f%% (%d/%d), ETA: %.0fm",
            rate,
            100 * step / self.num_train_steps,
            step,
            self.num_train_steps,
            eta_min,
        )
        self.writer.write_scalars(step, {"steps_per_sec": rate})
        self._last_time, self._last_step, self._excluded = now, step, 0.0

    @contextlib.contextmanager
    def timed(self, name: str):
        """A block whose time does not count as training (`name` as clu's `timed` takes it)."""
        del name
        start = time.monotonic()
        try:
            yield
        finally:
            self._excluded += time.monotonic() - start


def create_writer(workdir: str, is_chief: bool):
    """clu's default writer for `workdir` where TensorFlow imports, else a `JsonLinesWriter`; `Discard`
    for processes other than process 0."""
    if not is_chief:
        return Discard()
    if metric_writers is not None:
        return metric_writers.create_default_writer(workdir)
    path = os.path.join(workdir, SCALARS_FILE)
    logging.info("TensorFlow does not import: scalars go to the log and %s", path)
    return JsonLinesWriter(workdir)


def create_progress(num_train_steps: int, writer):
    """clu's `ReportProgress` where clu's writers import, else a `Progress`."""
    if periodic_actions is not None:
        return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer)
    return Progress(num_train_steps, writer)
