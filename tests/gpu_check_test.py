"""Tests of `python -m fastscnn_jax.gpu_check`: its CPU dry run for real, the full check only on a GPU."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from fastscnn_jax import benchmark, gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = {
    "accelerator",
    "float32_matches_cpu",
    "bfloat16_argmax",
    "train_step_lowers_loss",
    "benchmark_jax_rows",
}
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _run(*args, timeout=600):
    """Runs the module from the repository root; returns the completed process."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "fastscnn_jax.gpu_check", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _json(folder, name):
    """The parsed JSON file `folder/name`."""
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, real_camvid_dir):
    """One `--quick --allow_cpu` run on two real CamVid val frames; returns (process, output folder)."""
    output = tmp_path_factory.mktemp("gpu_check")
    torch_modes = "--torch_modes=channels_last" if HAS_TORCH else "--torch_modes="
    images = f"--images={real_camvid_dir / 'val' / '*.png'}"
    return _run("--quick", "--allow_cpu", torch_modes, images, f"--output={output}"), output


def test_dry_run_passes_every_check_and_writes_every_file(dry_run):
    """On a CPU, with --allow_cpu, the quick run passes its checks (device and reference both the CPU) and
    writes the environment, the checks and the benchmark's JSON and markdown."""
    result, output = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    environment = _json(output, "environment.json")
    assert environment["default_backend"] == "cpu" and environment["device_details"][0]["platform"] == "cpu"
    assert {"jax", "jaxlib", "flax", "optax"} <= set(environment["packages"])
    assert "jax:" in environment["jax_environment"]
    checks = _json(output, "checks.json")
    assert checks["passed"] and set(checks["checks"]) == CHECKS
    assert all(c["passed"] for c in checks["checks"].values())
    float32 = checks["checks"]["float32_matches_cpu"]
    assert len(float32["images"]) == 2 and all(p.endswith(".png") for p in float32["images"])
    assert float32["highest"]["max_abs_diff"] == 0.0  # CPU against CPU: the same program
    assert checks["checks"]["bfloat16_argmax"]["argmax_agreement"] >= 0.99
    losses = checks["checks"]["train_step_lowers_loss"]["losses"]
    assert len(losses) == gpu_check.TRAIN_STEPS and losses[-1] < gpu_check.TRAIN_MAX_LOSS_RATIO * losses[0]
    assert "check train_step_lowers_loss: PASS" in result.stdout and "all checks passed" in result.stdout


def test_dry_run_benchmarks_both_frameworks_in_both_dtypes(dry_run):
    """The quick benchmark has a JAX row per dtype and, with torch, a channels_last row per dtype, each
    timed, with JAX/PyTorch ratios in the JSON and the markdown."""
    _, output = dry_run
    rows = _json(output, "benchmark.json")["rows"]
    jax_rows = [r for r in rows if r["framework"] == "jax"]
    assert sorted(r["dtype"] for r in jax_rows) == ["bfloat16", "float32"]
    assert all(
        r["mode"] == "inference" and (r["height"], r["width"], r["batch"]) == (64, 96, 1) for r in rows
    )
    assert all(not r.get("error") and r["items_per_s"] > 0 for r in rows), rows
    markdown = (output / "benchmark.md").read_text()
    assert "| inference 1x64x96 | float32 |" in markdown
    if HAS_TORCH:
        torch_rows = [r for r in rows if r["framework"] == "torch"]
        assert sorted((r["torch_mode"], r["dtype"]) for r in torch_rows) == [
            ("channels_last", "bfloat16"),
            ("channels_last", "float32"),
        ]
        assert all("ratio_vs_torch" in r for r in jax_rows) and all("jax_over_torch" in r for r in torch_rows)
        assert "(channels_last) |" in markdown


def test_without_a_gpu_the_check_fails_unless_allowed(tmp_path):
    """Without an accelerator or --allow_cpu, the run stops after the accelerator check and exits 1."""
    if jax.default_backend() != "cpu":
        pytest.skip("this machine has an accelerator")
    result = _run(f"--output={tmp_path}", "--torch_modes=")
    assert result.returncode == 1, result.stderr[-3000:]
    checks = _json(tmp_path, "checks.json")
    assert not checks["passed"] and list(checks["checks"]) == ["accelerator"]
    assert (tmp_path / "environment.json").exists() and not (tmp_path / "benchmark.json").exists()
    assert "FAILED: accelerator" in result.stdout


def test_full_check_on_a_gpu(tmp_path):
    """The full check (without torch.compile, for time; on CamVid's val frames where they are found) passes
    and times every measurement."""
    if jax.default_backend() == "cpu":
        pytest.skip("no GPU: JAX's default backend is the CPU (the dry run tests the CPU path)")
    result = _run(f"--output={tmp_path}", "--torch_modes=channels_last", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _json(tmp_path, "checks.json")["passed"]
    rows = _json(tmp_path, "benchmark.json")["rows"]
    timed = {
        (r["mode"], r["batch"], (r["height"], r["width"]), r["dtype"])
        for r in rows
        if r["framework"] == "jax"
    }
    assert timed == {(*m, d) for m in gpu_check.MEASUREMENTS for d in benchmark.DTYPES}


def test_compare_logits_measures_differences_and_class_agreement():
    """Absolute and relative (to the largest reference logit) differences, and the share of equal argmaxes,
    of all pixels and of those whose reference class is clear."""
    reference = np.zeros((1, 1, 3, 3))
    reference[0, 0, 0] = [10.0, 0.0, 0.0]
    reference[0, 0, 1] = [0.0, 1.0, 0.0]
    reference[0, 0, 2] = [0.0, 0.2, 0.0]  # a near tie: not clear
    logits = reference.copy()
    logits[0, 0, 1, 2] = 2.0  # the second pixel's class changes
    result = gpu_check.compare_logits(logits, reference)
    assert result["max_abs_diff"] == 2.0 and result["logit_scale"] == 10.0
    assert result["max_relative_diff"] == pytest.approx(0.2) and result["mean_abs_diff"] == pytest.approx(
        2 / 9
    )
    assert result["argmax_agreement"] == pytest.approx(2 / 3)
    assert result["argmax_agreement_clear"] == 0.5 and result["clear_fraction"] == pytest.approx(2 / 3)


def test_learnable_batch_colours_each_class_alike():
    """Blocks of one class, one colour per class (up to noise), about 5% void, the config's shapes."""
    config = tiny.get_config()
    batch = gpu_check.learnable_batch(config)
    assert batch["image"].shape == (config.batch_size, *config.crop_size, 3)
    assert batch["label"].shape == (config.batch_size, *config.crop_size)
    label = batch["label"]
    assert 0.02 < np.mean(label == config.ignore_label) < 0.08
    for k in np.unique(label[label != config.ignore_label]):
        assert batch["image"][label == k].std(axis=0).max() < 12  # noise only (sigma 8, clipped)


def test_markdown_gives_ratios_and_errors():
    """The summary pairs each JAX row with the fastest PyTorch row of its dtype; failed rows show why."""
    shape = (1, 64, 96, 3)
    rows = [
        benchmark._row("jax", "inference", shape, "float32", 1.0, [0.01], (1, "test"), layer="core"),
        benchmark._row("torch", "inference", shape, "float32", None, [0.04], (1, "test"), torch_mode="eager"),
        benchmark._row(
            "torch", "inference", shape, "float32", None, [0.02], (1, "test"), torch_mode="channels_last"
        ),
        benchmark.error_row("torch", "inference", shape, "float32", "RuntimeError: no", torch_mode="compile"),
    ]
    benchmark.add_ratios(rows)
    assert rows[0]["ratio_vs_torch"] == 2.0 and rows[0]["ratio_vs_torch_mode"] == "channels_last"
    markdown = gpu_check.markdown(rows, {"device_kind": "test", "platform": "cpu"})
    assert "| inference 1x64x96 | float32 | 100.0 | 50.0 (channels_last) | 2.00x |" in markdown
    assert "| inference 1x64x96 | torch | eager | float32 | 40.00 | 40.00 | 25.0 | - | 4.00x |" in markdown
    assert "| inference 1x64x96 | torch | compile | float32 | RuntimeError: no |" in markdown
