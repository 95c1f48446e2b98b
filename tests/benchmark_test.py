"""Tests of `python -m fastscnn_jax.benchmark`: the real command, tiny, on the small CamVid of conftest.py.

No torch needed: the PyTorch rows are tested where it is installed.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastscnn_jax import benchmark
from tests.conftest import SMALL_CAMVID_SIZE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
TINY_FLAGS = ["--sizes=64x96", "--batch=1", "--train-batch=2", "--iters=2", "--warmup=1"]
HAS_TORCH = importlib.util.find_spec("torch") is not None
REQUIRED_KEYS = {
    "framework",
    "mode",
    "height",
    "width",
    "batch",
    "dtype",
    "compile_s",
    "median_ms",
    "p90_ms",
    "items_per_s",
    "layer",
}


def _run(*args, pythonpath=REPO):
    """Runs the benchmark module with the tiny config; returns the completed process."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "fastscnn_jax.benchmark", f"--config={TINY}", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_data_flags):
    """One float32 run of every mode, with one of JAX's options as a flag and, where torch is installed,
    PyTorch in NHWC memory under bfloat16 autocast beside it; returns (completed process, parsed JSON report).
    """
    output = tmp_path_factory.mktemp("benchmark") / "tiny.json"
    flags = [*TINY_FLAGS, "--rounds=2", f"--output={output}", "--jax_cpu_enable_async_dispatch=false"]
    if HAS_TORCH:
        flags += ["--torch-modes=channels_last", "--torch-dtypes=bfloat16"]
    result = _run(*flags, *small_data_flags)
    assert result.returncode == 0, result.stderr[-4000:]
    return result, json.loads(output.read_text())


def test_report_has_a_row_per_mode_with_every_key(tiny_run):
    """Inference, train and input-pipeline rows, each complete, with positive throughput and compile time."""
    _, report = tiny_run
    rows = [r for r in report["rows"] if r["framework"] == "jax"]
    assert {r["mode"] for r in rows} == set(benchmark.MODES)
    for row in rows:
        assert REQUIRED_KEYS <= set(row), row
        assert row["dtype"] == "float32"
        assert row["items_per_s"] > 0 and row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
        assert row["compile_s"] is not None and row["compile_s"] > 0
        assert row["peak_memory_bytes"] > 0
    model_rows = [r for r in rows if r["mode"] != "input_pipeline"]
    assert {(r["height"], r["width"]) for r in model_rows} == {(64, 96)}
    assert {r["batch"] for r in rows if r["mode"] == "train"} == {2}
    assert all(r["layer"] == "cpu" for r in model_rows)  # tiny.py's cpu_layer 'auto', on a CPU
    # --dot_library=auto: the faster of the two for inference, timed at its first call; none for training
    assert all(r["dot_library"] in ("ynnpack", "eigen") for r in model_rows if r["mode"] == "inference")
    assert not any("dot_library" in r for r in model_rows if r["mode"] == "train")
    for row in model_rows:  # two rounds of --iters=2 timed calls, pooled
        assert row["rounds"] == 2 and len(row["times_ms"]) == 4, row
        assert row["median_ms"] == pytest.approx(float(np.median(row["times_ms"])), abs=1e-3)
    pipeline = next(r for r in rows if r["mode"] == "input_pipeline")
    # Whole CamVid frames at tiny.py's batch: the train step crops them.
    assert (pipeline["height"], pipeline["width"], pipeline["batch"]) == (*SMALL_CAMVID_SIZE, 4)
    assert pipeline["layer"] is None
    # The PyTorch rows are bfloat16: none matches a float32 JAX row, so there is no ratio to take.
    assert not any("ratio_vs_torch" in r for r in report["rows"])
    machine = report["machine"]
    assert machine["platform"] == "cpu" and machine["devices"] and machine["cpu_count"] >= 1
    assert {"jax", "jaxlib", "flax", "numpy"} <= set(machine["versions"])
    assert machine["processor"] and set(machine["cpu_features"] or []) <= set(benchmark.CPU_FEATURES)
    # The user's malloc settings, as the process had them (it no longer changes them itself).
    assert machine["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES")
    # JAX's options are the entry points' flags (JAX reads this one from no environment variable).
    assert machine["jax_cpu_async_dispatch"] is False


def test_torch_modes_and_dtypes_add_those_pytorch_rows(tiny_run):
    """`--torch-modes=channels_last --torch-dtypes=bfloat16` (implying --compare-torch) times PyTorch in NHWC
    memory under bfloat16 autocast, beside the float32 JAX rows."""
    if not HAS_TORCH:
        pytest.skip("torch is not installed (pip install -e '.[torch]')")
    torch_rows = [r for r in tiny_run[1]["rows"] if r["framework"] == "torch"]
    assert sorted(r["mode"] for r in torch_rows) == ["inference", "train"]
    for row in torch_rows:
        assert (row["torch_mode"], row["dtype"]) == ("channels_last", "bfloat16"), row
        assert not row.get("error") and row["items_per_s"] > 0 and row["compile_s"] is None
        assert (row["height"], row["width"], row["rounds"]) == (64, 96, 2), row


def test_cpu_info_reads_the_first_cpu_of_proc_cpuinfo(tmp_path):
    """Name, family/model and the listed features of the first CPU block; no file: no family or features."""
    first = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512bw\n"
    )
    second = "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: other\nflags\t\t: amx_tile\n"
    path = tmp_path / "cpuinfo"
    path.write_text(first + "\n" + second)
    assert benchmark.cpu_info(str(path)) == {
        "processor": "AMD EPYC 9B14",
        "cpu_family_model": "25/17",
        "cpu_features": ["avx2", "fma", "avx512f", "avx512_bf16"],
    }
    missing = benchmark.cpu_info(str(tmp_path / "absent"))
    assert missing["cpu_family_model"] is None and missing["cpu_features"] is None


def test_table_names_each_mode(tiny_run):
    """The printed table has a line for each mode."""
    result, _ = tiny_run
    for mode in benchmark.MODES:
        assert any(line.startswith("jax") and f" {mode} " in line for line in result.stdout.splitlines()), (
            mode
        )
    assert "jax/torch" in result.stdout


def test_bfloat16_rows_say_bfloat16(tmp_path):
    """`--dtype=bfloat16` benchmarks the bfloat16 compute dtype and labels its rows so; a pinned
    `--dot_library` is the one the rows used, and `--cpu_layer=off` the plain core."""
    output = tmp_path / "bf16.json"
    flags = ["--dtype=bfloat16", "--modes=inference", "--dot_library=eigen", "--cpu_layer=off"]
    result = _run(*TINY_FLAGS, *flags, f"--output={output}")
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(output.read_text())["rows"]
    assert rows and all(r["dtype"] == "bfloat16" and r["mode"] == "inference" for r in rows)
    assert all(r["dot_library"] == "eigen" and r["layer"] == "core" for r in rows)


def test_compare_torch_without_torch_names_the_install_command(tmp_path):
    """Without torch (a stub that fails to import stands in for it), --compare-torch says what to install."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    result = _run(*TINY_FLAGS, "--compare-torch", pythonpath=f"{stub.parent}{os.pathsep}{REPO}")
    assert result.returncode != 0
    assert benchmark.TORCH_INSTALL_HINT in result.stderr and "Traceback" not in result.stderr


def test_parse_sizes_and_batches():
    """HEIGHTxWIDTH lists parse; malformed entries are named."""
    assert benchmark.parse_sizes(["384x480", "1024X2048"]) == [(384, 480), (1024, 2048)]
    assert benchmark.parse_batches(["1", "8"]) == [1, 8]
    with pytest.raises(ValueError, match="'384'"):
        benchmark.parse_sizes(["384"])
    with pytest.raises(ValueError, match="positive"):
        benchmark.parse_batches(["0"])


def test_ratio_is_jax_over_torch_throughput_on_matching_rows():
    """`ratio_vs_torch` lands on JAX rows with a PyTorch row of the same mode, size, batch and dtype."""
    base = {"mode": "inference", "height": 384, "width": 480, "batch": 1, "dtype": "float32"}
    rows = [
        {**base, "framework": "jax", "items_per_s": 30.0},
        {**base, "framework": "torch", "items_per_s": 20.0},
        {**base, "framework": "jax", "batch": 8, "items_per_s": 50.0},
    ]
    benchmark.add_ratios(rows)
    assert rows[0]["ratio_vs_torch"] == 1.5
    assert "ratio_vs_torch" not in rows[1] and "ratio_vs_torch" not in rows[2]


def test_rounds_alternate_between_the_frameworks_and_pool_their_calls():
    """`measure_rounds` times JAX, PyTorch, JAX, PyTorch, ... and gives one row per runner that pools its
    rounds' calls, with the first round's compile time and the largest peak memory."""
    calls = []

    class Runner:
        """Stands in for JaxRunner / TorchRunner: a row of fixed times per call, the order recorded."""

        def __init__(self, framework, times):
            self.framework, self.times = framework, times

        def inference_row(self, batch, warmup, iters):
            calls.append((self.framework, warmup, iters))
            n = sum(1 for c in calls if c[0] == self.framework)
            times = [t * n for t in self.times]  # later rounds slower, as on a drifting machine
            compile_s = 5.0 / n if self.framework == "jax" else None
            return benchmark._row(
                self.framework,
                "inference",
                batch["image"].shape,
                "float32",
                compile_s,
                times,
                (100 * n, "test"),
            )

    batch = {"image": np.zeros((2, 8, 16, 3), np.float32)}
    runners = [Runner("jax", [0.010, 0.030]), Runner("torch", [0.020, 0.040])]
    jax_row, torch_row = benchmark.measure_rounds(
        runners, "inference_row", batch, warmup=1, iters=2, rounds=3
    )
    assert calls == [("jax", 1, 2), ("torch", 1, 2)] * 3
    assert jax_row["times_ms"] == pytest.approx([10, 30, 20, 60, 30, 90])
    assert jax_row["median_ms"] == pytest.approx(30.0) and jax_row["items_per_s"] == pytest.approx(
        2 / 0.03, abs=1e-3
    )
    assert jax_row["p90_ms"] == pytest.approx(float(np.percentile([10, 30, 20, 60, 30, 90], 90)))
    assert jax_row["rounds"] == 3 and jax_row["compile_s"] == 5.0 and jax_row["peak_memory_bytes"] == 300
    assert torch_row["framework"] == "torch" and torch_row["compile_s"] is None
    assert torch_row["median_ms"] == pytest.approx(50.0)  # of 20, 40, 40, 80, 60, 120
    with pytest.raises(ValueError, match="--rounds"):
        benchmark.run_benchmark(None, sizes=[], batches=[], train_batch=1, warmup=0, iters=1, rounds=0)


def test_timed_inference_returns_the_models_logits():
    """The JAX inference row times the model's forward pass (NHWC logits), built with the config's layer."""
    import functools

    import jax
    import jax.numpy as jnp

    from configs import tiny
    from fastscnn_jax import steps

    config = tiny.get_config()
    runner = benchmark.JaxRunner(config)
    layer = steps.select_layer(config.cpu_layer)
    assert runner.layer is layer
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)), jnp.float32)
    timed = runner.infer(runner.variables, images)
    apply = jax.jit(functools.partial(steps.create_model(config, layer).apply, train=False))
    logits = apply(runner.variables, images)
    assert timed.shape == (2, 64, 96, config.num_classes)
    np.testing.assert_allclose(timed, logits, rtol=1e-5, atol=1e-5)


def test_failed_rows_keep_their_error_and_take_no_ratio():
    """A failed row (torch.compile without a compiler, say) pools, prints and is left out of the ratios."""
    shape = (1, 8, 16, 3)
    timed = benchmark._row("jax", "inference", shape, "float32", 1.0, [0.01], (1, "test"), layer="core")
    failed = benchmark.error_row(
        "torch", "inference", shape, "float32", "BackendCompilerFailed: no compiler", torch_mode="compile"
    )
    pooled = benchmark.pool_rounds([failed, failed])
    assert pooled["rounds"] == 2 and pooled["error"] == failed["error"] and pooled["items_per_s"] is None
    rows = [timed, pooled]
    benchmark.add_ratios(rows)
    assert "ratio_vs_torch" not in timed and "jax_over_torch" not in pooled
    line = benchmark.format_table(rows).splitlines()[3]
    assert (
        line.startswith("torch")
        and " compile " in line
        and line.endswith("error: BackendCompilerFailed: no compiler")
    )
