"""The core without TensorFlow: the reader and the augmenting train step, predict, the benchmark's model rows
and the StableHLO export.

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

# A few train steps of configs/tiny.py on a fake CamVid folder (argv[1]) as training runs them: whole examples
# from the numpy reader, augmented inside the train step.
TRAIN_STEPS = ASSERT_BLOCKED + textwrap.dedent(
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs import tiny
    from fastscnn_jax import reader, steps

    config = tiny.get_config()
    config.min_scale, config.max_scale = 0.75, 1.5  # the fake images are crop-sized
    steps.validate_config(config)
    split = reader.InMemorySplit.from_folder(sys.argv[1], "train", config.ignore_label)
    layer = steps.select_layer(config.cpu_layer)
    model = steps.create_model(config, layer)
    optimizer = steps.create_optimizer(config, steps.create_learning_rate_fn(config, config.num_train_steps))
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    mesh = steps.create_mesh()
    state = steps.create_train_state(config, model, init_rng, optimizer, layer)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    train_step = steps.make_train_step(config, None, dropout_rng, mesh, layer, augment=True)
    batches = reader.train_batches(split, config, local_batch_size=config.batch_size)
    first = next(batches)
    assert first["image"].shape == (config.batch_size, 64, 96, 3), first["image"].shape
    losses = []
    for batch in [first] * 4 + [next(batches)]:
        state, step_metrics = train_step(state, steps.shard_batch(batch, mesh))
        losses.append(float(step_metrics.compute()["loss"]))
    print("layer", layer.name, "losses", losses)
    assert np.all(np.isfinite(losses)), losses
    assert losses[3] < losses[0], losses  # the same examples, augmented alike: the loss goes down
    assert bool(steps.all_finite(state.params))
    assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
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


def test_train_steps_run_from_the_reader(env, tmp_path):
    """configs/tiny.py trains a few steps on a CamVid folder with `reader` and `steps` alone (the backend's
    layer, the augmentation in the step); the loss is finite and falls on repeated examples."""
    folder = make_fake_camvid(tmp_path / "camvid", splits=("train",), n=6, size=(64, 96))
    result = _python(env, "-c", TRAIN_STEPS, str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "losses" in result.stdout


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
