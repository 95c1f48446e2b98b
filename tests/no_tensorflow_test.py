"""The core without TensorFlow: training (the loop, reading a CamVid folder), predict, the benchmark's model
rows and the StableHLO export.

Each check runs in a subprocess whose PYTHONPATH starts with a folder holding `tensorflow` and
`tensorflow_datasets` packages that raise ImportError when imported, as if neither were installed. The
subprocess first asserts that both imports really fail there, then runs the check.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_fake_camvid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow", "tensorflow_datasets")

# Run first in every subprocess: the blocked packages must not import.
ASSERT_BLOCKED = textwrap.dedent(
    f"""
    import sys

    for name in {BLOCKED!r}:
        try:
            __import__(name)
        except ImportError as e:
            assert "blocked by test" in str(e), (name, e)
        else:
            raise AssertionError(f"{{name}} imported although blocked")
    """
)

# `python -c RUN_MODULE module args...`: runs `python -m module args...` after ASSERT_BLOCKED.
RUN_MODULE = ASSERT_BLOCKED + textwrap.dedent(
    """
    import runpy

    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of the subprocesses: the blocking packages first on PYTHONPATH, then the repository."""
    blocker = tmp_path_factory.mktemp("no_tensorflow")
    for name in BLOCKED:
        (blocker / name).mkdir()
        (blocker / name / "__init__.py").write_text('raise ImportError("blocked by test")\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), REPO]), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _python(env, *args, cwd=REPO):
    """Runs this interpreter with `args`; returns the completed process."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_blocker_blocks(env):
    """The blocking packages are found first: TensorFlow and TFDS do not import in the subprocesses."""
    result = _python(env, "-c", ASSERT_BLOCKED)
    assert result.returncode == 0, result.stderr[-3000:]


def test_training_runs_from_a_camvid_folder(env, tmp_path):
    """`python -m fastscnn_jax.main` trains configs/tiny.py on train+val of a CamVid folder read by `reader`
    (whole examples, augmented in the step), evaluates val, checkpoints, and writes its scalars to
    scalars.jsonl in place of clu's TensorBoard writer, which needs TensorFlow."""
    folder = make_fake_camvid(tmp_path / "camvid", n=6, size=(64, 96), sequences=("0001TP", "0006R0"))
    workdir = tmp_path / "run"
    args = ["--config=configs/tiny.py", f"--config.dataset_dir={folder}", "--config.train_split=train+val"]
    # One checkpoint, at the end: periodic saves are tests/main_test.py's and tests/faults_test.py's.
    args += ["--config.holdout_sequence=0006R0", "--config.checkpoint_every_steps=10", f"--workdir={workdir}"]
    result = _python(env, "-c", RUN_MODULE, "fastscnn_jax.main", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with PIL (no TensorFlow here)" in result.stderr
    # 12 examples, 6 of sequence 0006R0 held out: 6 train (one epoch of one batch of 4, the rest dropped).
    assert "Train: 6 examples" in result.stderr, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "scalars.jsonl").read_text().splitlines()]
    assert records[0]["hparams"]["train_split"] == "train+val"
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4, 6, 8, 10]
    assert np.all(np.isfinite(losses)) and losses[0] > 0, losses
    for name in ("val", "0006R0"):  # val, and the held-out sequence beside it
        scores = [r for r in records if f"{name}_miou" in r]
        assert [r["step"] for r in scores] == [10] and 0 <= scores[0][f"{name}_miou"] <= 1, scores
    assert json.loads((workdir / "eval_0006R0.json").read_text())["step"] == 10
    assert (workdir / "checkpoints" / "10").is_dir() and (workdir / "best").is_dir()

    # The GPU issue's recipe runner on the finished workdir: nothing left to train; it writes the final
    # state's weights, evaluates them on val and times fed against fixed train steps.
    weights = tmp_path / "out" / "weights.msgpack"
    args[-1:] = [f"--workdir={workdir}", f"--weights={weights}", "--input_steps=2"]
    result = _python(env, "-c", RUN_MODULE, "fastscnn_jax.recipe", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((weights.parent / "recipe.json").read_text())
    assert report["steps"] == 10 and report["train_wall_s"] > 0 and weights.is_file()
    # The weights are the final state's (step 10): val scores as the loop's last evaluation scored it.
    val_at_10 = next(r["val_miou"] for r in records if "val_miou" in r)
    assert report["val"]["miou"] == pytest.approx(val_at_10, abs=1e-6)
    assert len(report["val"]["per_class_iou"]) == 11
    timing = report["input"]
    assert timing["steps"] == 2 and timing["fed_step_s"] > 0 and timing["fixed_step_s"] > 0


def test_predict_segments_a_photo_with_the_shipped_weights(env, tmp_path, real_camvid_dir):
    """`python -m fastscnn_jax.predict` writes the mask of a real val photo, mostly right."""
    name = "0016E5_07959.png"
    args = [f"--input={real_camvid_dir / 'val' / name}", f"--output={tmp_path}"]
    result = _python(env, "-c", RUN_MODULE, "fastscnn_jax.predict", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 image(s) segmented" in result.stdout
    mask = np.asarray(Image.open(tmp_path / name.replace(".png", "_mask.png")))
    truth = np.asarray(Image.open(real_camvid_dir / "valannot" / name))
    assert mask.shape == truth.shape == (360, 480)
    valid = truth != 11
    assert (mask[valid] == truth[valid]).mean() > 0.8


def test_benchmark_model_rows(env, tmp_path):
    """The benchmark's model rows (`--skip-input-pipeline`) run and write their JSON report."""
    output = tmp_path / "benchmark.json"
    args = ["--config=configs/camvid.py", "--sizes=64x96", "--batch=1", "--train-batch=2", "--iters=2"]
    args += ["--skip-input-pipeline", f"--output={output}"]
    result = _python(env, "-c", RUN_MODULE, "fastscnn_jax.benchmark", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert sorted(r["mode"] for r in rows) == ["inference", "train"]
    assert all(r["items_per_s"] > 0 and (r["height"], r["width"]) == (64, 96) for r in rows)


def test_stablehlo_export(env, tmp_path, real_camvid_dir):
    """`--format=stablehlo` exports the shipped weights and verifies them on CamVid val images."""
    size = ["--height=64", "--width=96", "--num_verify=2", f"--dataset_dir={real_camvid_dir}"]
    export = lambda *args: _python(env, "-c", RUN_MODULE, "fastscnn_jax.export", *args, *size)
    output = tmp_path / "fastscnn.stablehlo"
    result = export("--format=stablehlo", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}: stablehlo," in result.stdout and output.stat().st_size > 0
    # A format that needs TensorFlow says so, without a traceback.
    tflite = tmp_path / "fastscnn.tflite"
    result = export("--format=tflite", f"--output={tflite}")
    assert result.returncode != 0 and "needs TensorFlow" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not tflite.exists()
