r"""Checks Fast-SCNN on a GPU in one run: what the machine is, whether the model is right there, how fast.

  bash scripts/gpu_check.sh                                # writes to $OUT, else runs/gpu_check/
  python -m fastscnn_jax.gpu_check --output=DIR --images='frames/*.png'
  python -m fastscnn_jax.gpu_check --output=DIR --torch_modes=channels_last   # without torch.compile
  python -m fastscnn_jax.gpu_check --output=DIR --quick --allow_cpu           # a dry run on a CPU

It writes, each file as soon as its part is done:

  environment.json  devices, package versions (jax, jaxlib, flax, optax, torch, the CUDA wheels), the CUDA
                    and cuDNN versions JAX and PyTorch report, `nvidia-smi`.
  checks.json       each check's measurements and whether it passed; the exit status is 1 if any failed:
    accelerator             JAX's default backend is not the CPU (`--allow_cpu` lets a CPU pass).
    float32_matches_cpu     the shipped weights' float32 logits on `--images` (four CamVid val frames by
                            default, synthetic street-like images where there are none) on the default device
                            match XLA:CPU's in the same process, at the default matmul precision (which lets
                            GPUs use TF32) and at 'highest': logits to a fraction of the largest, classes on
                            99% of pixels or more.
    bfloat16_argmax         bfloat16 compute gives the float32 class on at least 99% of those pixels (on
                            synthetic images, whose flat colours leave many pixels near a tie, of the pixels
                            whose two best float32 logits are at least 0.5 apart).
    train_step_lowers_loss  20 steps of configs/tiny.py's `steps.make_train_step` on one fixed, learnable
                            synthetic batch take the loss below 75% of the first step's.
    benchmark_jax_rows      every JAX benchmark row below ran.
  benchmark.json    `benchmark`'s rows for configs/camvid.py's model: inference at batch 1 on 1024x2048
  benchmark.md      and 360x480 and batch 32 on 360x480, and the train step on 360x480 at batch 16, each for
                    JAX in float32 and bfloat16 and for `torch_reference.FastSCNN` on the same device in
                    every `--torch_modes` (default channels_last, eager, and compile, under torch.compile)
                    and `--torch_dtypes` (float32, bfloat16 autocast); the markdown has JAX/PyTorch ratios.

torch.compile compiles once per shape, mode and dtype, which takes minutes in all: its rows run last, and no
row starts after `--budget_s` seconds (the rest are recorded as skipped), so that the run fits a time limit;
the default leaves room for a long last row within ten minutes. A PyTorch row that fails records its error;
the others still run. `--quick` runs
configs/tiny.py's model on 64x96 inputs, two images at half size and few calls, and leaves torch.compile out
unless `--torch_modes` names it; it times inference only (the train check still trains).

Needs neither TensorFlow nor the dataset, but ml_collections and clu (small pure-Python wheels that GPU images
often lack; scripts/gpu_check.sh says how to carry them). Run it from the repository root (it reads configs/).
"""

import contextlib
import functools
import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

# steps and benchmark import ml_collections and metrics imports clu: small pure-Python packages that GPU
# images lack. Say which to install rather than fail deep inside an import.
try:
    from configs import camvid, tiny
    from fastscnn_jax import benchmark, checkpointing, cli, predict, steps
except ModuleNotFoundError as e:
    if e.name not in ("ml_collections", "clu", "configs"):
        raise
    if e.name == "configs":
        raise SystemExit("fastscnn_jax.gpu_check reads configs/: run it from the repository root") from None
    raise SystemExit(
        f"fastscnn_jax.gpu_check needs {e.name}: pip install {e.name} (where no registry can be reached, "
        "carry its wheel: scripts/gpu_check.sh)"
    ) from None

FLAGS = flags.FLAGS

# (benchmark mode, batch, (height, width)) of each benchmark measurement, in the order they run.
MEASUREMENTS = (
    ("inference", 1, (360, 480)),
    ("train", 16, (360, 480)),
    ("inference", 32, (360, 480)),
    ("inference", 1, (1024, 2048)),
)
# A dry run's: the train rows' compilations would take minutes on a small CPU.
QUICK_MEASUREMENTS = (("inference", 1, (64, 96)),)

# Pass thresholds. Logit differences are relative to the largest reference logit's magnitude. At the
# default precision XLA may multiply float32 in TF32 on GPUs (10-bit mantissas), at 'highest' it does not.
FLOAT32_TOLERANCE = {"highest": (1e-3, 0.999), "default": (5e-2, 0.99)}  # (max relative diff, argmax)
BFLOAT16_MIN_AGREEMENT = 0.99
# Pixels whose two best reference logits are this far apart have a clear class (`compare_logits`).
CLEAR_MARGIN = 0.5
TRAIN_STEPS = 20
TRAIN_MAX_LOSS_RATIO = 0.75


def default_images() -> str:
    """A glob of CamVid's val frames: in $CAMVID_DIR, else ../shared/camvid beside the checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.environ.get("CAMVID_DIR", ""), os.path.join(os.path.dirname(repo), "shared", "camvid")):
        if root and glob.glob(os.path.join(root, "val", "*.png")):
            return os.path.join(root, "val", "*.png")
    return ""


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Street-like uint8 RGB images [count, H, W, 3]: sky over road, coloured boxes, sensor noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    rows = np.arange(height)[:, None, None]
    images = []
    for _ in range(count):
        horizon = int(height * rng.uniform(0.35, 0.55))
        image = np.where(rows < horizon, [135.0, 175.0, 225.0], [95.0, 90.0, 90.0]) * np.ones((1, width, 1))
        for _ in range(8):  # buildings, cars, signs
            top, left = rng.integers(0, height * 3 // 4), rng.integers(0, width * 7 // 8)
            box_h, box_w = rng.integers(height // 16, height // 3), rng.integers(width // 16, width // 4)
            image[top : top + box_h, left : left + box_w] = rng.uniform(20, 235, 3)
        image += rng.normal(0.0, 6.0, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def load_images(pattern: str, count: int, size: tuple[int, int] | None) -> tuple[np.ndarray, list[str]]:
    """`count` images spread evenly over the sorted matches of `pattern`, at `size` (default the first's),
    as uint8 [N, H, W, 3], and their paths; synthetic 360x480 images (paths ['synthetic']) if none match."""
    paths = sorted(glob.glob(pattern)) if pattern else []
    if not paths:
        return synthetic_images(count, size or (360, 480)), ["synthetic"]
    paths = [paths[i] for i in sorted(set(np.linspace(0, len(paths) - 1, count).astype(int)))]
    images = [predict.load_rgb(p) for p in paths]
    height, width = size or images[0].shape[:2]
    images = [
        np.asarray(Image.fromarray(im).resize((width, height), Image.BILINEAR))
        if im.shape[:2] != (height, width)
        else im
        for im in images
    ]
    return np.stack(images), paths


def package_versions() -> dict:
    """Versions of the packages that decide what runs: JAX and its CUDA plugins, Flax, optax, PyTorch, the
    NVIDIA library wheels."""
    prefixes = (
        "jax",
        "flax",
        "optax",
        "orbax",
        "torch",
        "triton",
        "nvidia-",
        "numpy",
        "ml-collections",
        "clu",
    )
    versions = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(prefixes):
            versions[name] = dist.version
    return dict(sorted(versions.items()))


def jax_cuda_versions() -> dict:
    """The CUDA library versions jaxlib's CUDA plugin reports, or {} without one. jaxlib has no public API
    for these; its private `cuda_versions` module (what JAX's own version check calls) is read if present."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return {}
    if cuda_versions is None:
        return {}
    versions = {}
    for name in sorted(dir(cuda_versions)):
        if name.endswith("_get_version") and callable(getattr(cuda_versions, name)):
            try:
                versions[name.removesuffix("_get_version")] = getattr(cuda_versions, name)()
            except Exception as e:  # a library the plugin cannot load
                versions[name.removesuffix("_get_version")] = benchmark.describe_error(e)
    return versions


def torch_info() -> dict:
    """PyTorch's version, CUDA and cuDNN versions and GPU, or why it is unavailable."""
    try:
        import torch
    except ImportError as e:
        return {"error": benchmark.describe_error(e)}
    cuda = torch.cuda.is_available()
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
    }


def nvidia_smi() -> str | None:
    """`nvidia-smi`'s report, or None where there is none."""
    try:
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout + result.stderr


def environment() -> dict:
    """What this run ran on: `benchmark.machine_info()` plus every device, packages, CUDA and `nvidia-smi`."""
    devices = [
        {
            "id": d.id,
            "platform": d.platform,
            "device_kind": d.device_kind,
            **{k: getattr(d, k) for k in ("compute_capability", "core_count") if hasattr(d, k)},
        }
        for d in jax.devices()
    ]
    return {
        **benchmark.machine_info(),
        "default_backend": jax.default_backend(),
        "device_details": devices,
        "packages": package_versions(),
        "jax_cuda_versions": jax_cuda_versions(),
        "torch": torch_info(),
        "jax_environment": jax.print_environment_info(return_string=True),
        "nvidia_smi": nvidia_smi(),
    }


def compare_logits(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Differences of logits [N, H, W, K] from reference ones: absolute, relative to the largest reference
    logit's magnitude (at least 1), and the fraction of pixels whose class (argmax) agrees, of all pixels and
    of those with a clear reference class (`clear_fraction` of them: top two logits CLEAR_MARGIN apart)."""
    diff = np.abs(logits.astype(np.float64) - reference)
    scale = max(1.0, float(np.abs(reference).max()))
    agree = logits.argmax(-1) == reference.argmax(-1)
    top_two = np.sort(reference, axis=-1)[..., -2:]
    clear = top_two[..., 1] - top_two[..., 0] >= CLEAR_MARGIN
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": scale,
        "max_relative_diff": float(diff.max() / scale),
        "argmax_agreement": float(agree.mean()),
        "argmax_agreement_clear": float(agree[clear].mean()) if clear.any() else 1.0,
        "clear_fraction": float(clear.mean()),
    }


def check_float32(
    model, variables, images: np.ndarray, device, cpu, synthetic: bool = False
) -> tuple[bool, dict, np.ndarray]:
    """float32 logits on `device` against XLA:CPU's at both matmul precisions (FLOAT32_TOLERANCE; the class
    agreement of all pixels, or of the clear pixels of `synthetic` images, as in `check_bfloat16`).

    Returns:
      (passed, details, the CPU reference logits).
    """
    forward = jax.jit(functools.partial(model.apply, train=False))

    def logits_on(target, precision: str) -> np.ndarray:
        """Logits of `images` computed on `target` (inputs committed there, so jit runs there)."""
        inputs = jax.device_put((variables, images), target)
        with contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision):
            return np.asarray(forward(*inputs))

    reference = logits_on(cpu, "highest")
    details, passed = {"reference_device": str(cpu), "device": str(device)}, True
    agreement = "argmax_agreement_clear" if synthetic else "argmax_agreement"
    for precision, (max_relative, min_agreement) in FLOAT32_TOLERANCE.items():
        result = compare_logits(logits_on(device, precision), reference)
        result["passed"] = result["max_relative_diff"] <= max_relative and result[agreement] >= min_agreement
        result["limits"] = {"max_relative_diff": max_relative, agreement: min_agreement}
        details[precision] = result
        passed = passed and result["passed"]
    return passed, details, reference


def check_bfloat16(
    model, variables, images: np.ndarray, device, reference: np.ndarray, synthetic: bool = False
) -> tuple[bool, dict]:
    """Classes from bfloat16 compute on `device` against the float32 reference's: BFLOAT16_MIN_AGREEMENT of
    all pixels of photos, or of the clear pixels of `synthetic` images."""
    forward = jax.jit(functools.partial(model.clone(dtype=jnp.bfloat16).apply, train=False))
    logits = np.asarray(forward(*jax.device_put((variables, images), device)))
    result = compare_logits(logits, reference)
    key = "argmax_agreement_clear" if synthetic else "argmax_agreement"
    result["limits"] = {key: BFLOAT16_MIN_AGREEMENT}
    return result[key] >= BFLOAT16_MIN_AGREEMENT, result


def learnable_batch(config, block: int = 32, seed: int = 0) -> dict:
    """A synthetic batch a model can fit in a few steps: `block`-pixel squares of random classes, each class
    one random colour (plus noise), about 5% void. Squares much smaller than the network's 1/32 resolution
    branch sees make the fit slower (8-pixel squares take 20 steps to about 80% of the first loss)."""
    rng = np.random.default_rng(seed)
    height, width = config.crop_size
    shape = (config.batch_size, -(-height // block), -(-width // block))
    blocks = rng.integers(0, config.num_classes, shape)
    label = np.repeat(np.repeat(blocks, block, axis=1), block, axis=2)[:, :height, :width].astype(np.int32)
    palette = rng.uniform(0, 255, (config.num_classes, 3))
    image = palette[label] + rng.normal(0, 8, (*label.shape, 3))
    label[rng.random(label.shape) < 0.05] = config.ignore_label
    return {"image": np.clip(image, 0, 255).astype(np.float32), "label": label}


def check_train_step(num_steps: int = TRAIN_STEPS) -> tuple[bool, dict]:
    """`num_steps` jitted train steps of configs/tiny.py on one batch, with the backend's layer."""
    config = tiny.get_config()
    layer = steps.select_layer("auto")
    model = steps.create_model(config, layer)
    optimizer = steps.create_optimizer(config, steps.create_learning_rate_fn(config, num_steps))
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    mesh = steps.create_mesh()
    state = steps.create_train_state(config, model, init_rng, optimizer, layer)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    train_step = steps.make_train_step(config, None, dropout_rng, mesh, layer)
    batch = steps.shard_batch(learnable_batch(config), mesh)
    losses = []
    for _ in range(num_steps):
        state, step_metrics = train_step(state, batch)
        losses.append(float(step_metrics.compute()["loss"]))
    passed = bool(np.all(np.isfinite(losses))) and losses[-1] < TRAIN_MAX_LOSS_RATIO * losses[0]
    details = {
        "layer": layer.name,
        "batch": [config.batch_size, *config.crop_size],
        "losses": [round(x, 5) for x in losses],
        "last_over_first": round(losses[-1] / losses[0], 4),
        "limit": TRAIN_MAX_LOSS_RATIO,
    }
    return passed, details


class Report:
    """The run's output folder: writes each JSON file whole, prints what it records."""

    def __init__(self, output: str):
        """Creates `output`."""
        self.output = output
        os.makedirs(output, exist_ok=True)
        self.checks = {}

    def write(self, name: str, content) -> None:
        """Writes `content` (JSON-able, or text for .md) to `output/name`."""
        with open(os.path.join(self.output, name), "w") as f:
            if name.endswith(".json"):
                json.dump(content, f, indent=2, default=str)
            else:
                f.write(content)

    def check(self, name: str, run) -> bool:
        """Runs `run()` -> (passed, details), records it (an exception fails the check, with its
        traceback) and rewrites checks.json."""
        start = time.perf_counter()
        try:
            passed, details = run()
        except Exception as e:  # one broken check must not hide the others' results
            passed, details = (
                False,
                {"error": benchmark.describe_error(e), "traceback": traceback.format_exc()},
            )
        self.checks[name] = {
            "passed": bool(passed),
            "seconds": round(time.perf_counter() - start, 2),
            **details,
        }
        summary = {k: v for k, v in details.items() if k not in ("traceback", "losses")}
        print(f"check {name}: {'PASS' if passed else 'FAIL'} {json.dumps(summary, default=str)}", flush=True)
        self.write("checks.json", {"passed": self.passed, "checks": self.checks})
        return bool(passed)

    @property
    def passed(self) -> bool:
        """Whether every check so far passed."""
        return all(c["passed"] for c in self.checks.values())


def run_checks(report: Report, images: np.ndarray, paths: list[str], allow_cpu: bool) -> None:
    """The checks, in order; the model checks only where the accelerator check passed."""
    backend = jax.default_backend()
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    note = "a CPU, allowed by --allow_cpu: the device-vs-CPU comparison is CPU against CPU"
    if not report.check(
        "accelerator",
        lambda: (
            backend != "cpu" or allow_cpu,
            {"backend": backend, "note": note if backend == "cpu" else ""},
        ),
    ):
        return
    model, variables, _ = checkpointing.load_model(checkpointing.DEFAULT_WEIGHTS, layer="off")
    images_info = {"images": paths, "shape": list(images.shape)}
    synthetic = paths == ["synthetic"]
    reference = {}

    def float32():
        """Runs `check_float32` and keeps its reference for the bfloat16 check."""
        passed, details, reference["logits"] = check_float32(model, variables, images, device, cpu, synthetic)
        return passed, {**images_info, **details}

    report.check("float32_matches_cpu", float32)
    report.check(
        "bfloat16_argmax",
        lambda: check_bfloat16(model, variables, images, device, reference["logits"], synthetic),
    )
    report.check("train_step_lowers_loss", check_train_step)


def skipped_row(framework: str, mode: str, batch: int, size, dtype: str, why: str, **extra) -> dict:
    """A row not measured, with why."""
    return benchmark.error_row(framework, mode, (batch, *size), dtype, f"skipped: {why}", **extra)


def run_benchmark(
    config,
    measurements,
    *,
    torch_modes,
    torch_dtypes,
    warmup: int,
    iters: int,
    deadline: float,
    on_row,
    dot_library: str = "auto",
) -> list[dict]:
    """Times each measurement with `benchmark`'s runners: JAX in float32 and bfloat16, then PyTorch's modes
    and dtypes, torch.compile's last; rows that would start after `deadline` (time.monotonic()) are skipped.

    Args:
      config: the model and optimizer configuration (its `model.dtype` is set per JAX runner).
      measurements: (mode, batch, (height, width)) tuples, in order of importance.
      torch_modes: `benchmark.TORCH_MODES` to time; empty: no PyTorch rows.
      torch_dtypes: `benchmark.DTYPES` for PyTorch.
      warmup: untimed calls after each row's first.
      iters: timed calls per row.
      deadline: no row starts after this time.
      on_row: called with the rows so far after each row.
      dot_library: XLA:CPU's matrix-product library for JAX inference (`autotune`; nothing off the CPU).

    Returns:
      The rows, with `benchmark.add_ratios`' ratios.
    """
    jax_runners = []
    for dtype in benchmark.DTYPES:
        jax_config = config.copy_and_resolve_references()
        jax_config.model.dtype = dtype
        jax_runners.append(benchmark.JaxRunner(jax_config, dot_library))
    torch_runners = []
    for mode in torch_modes:
        for dtype in torch_dtypes:
            try:
                runner = benchmark.TorchRunner(config, jax_runners[0].num_params_without_aux, mode, dtype)
            except Exception as e:  # no usable CUDA for PyTorch, say: its rows say so, JAX's still run
                runner = (mode, dtype, benchmark.describe_error(e))
            torch_runners.append(runner)
    # torch.compile's compilations are the slow part: its rows come after every other row.
    phases = [
        jax_runners + [r for r in torch_runners if not isinstance(r, tuple) and r.mode != "compile"],
        [r for r in torch_runners if isinstance(r, tuple) or r.mode == "compile"],
    ]
    rng = np.random.default_rng(config.seed)
    batches = [
        benchmark.random_batch(rng, batch, size, config.num_classes, config.ignore_label)
        for _, batch, size in measurements
    ]
    rows = []
    for runners in phases:
        for (mode, batch_size, size), batch in zip(measurements, batches, strict=True):
            for runner in runners:
                rows.append(_measure(runner, mode, batch_size, size, batch, warmup, iters, deadline))
                print(benchmark.format_table(rows[-1:]).splitlines()[2], flush=True)
                on_row(rows)
    benchmark.add_ratios(rows)
    return rows


def _measure(runner, mode, batch_size, size, batch, warmup, iters, deadline) -> dict:
    """One row of `runner` (a PyTorch runner that could not be built is (mode, dtype, error)); JAX errors
    are recorded in the row, as TorchRunner records its own."""
    if isinstance(runner, tuple):
        torch_mode, dtype, error = runner
        return skipped_row("torch", mode, batch_size, size, dtype, error, torch_mode=torch_mode)
    framework = "jax" if isinstance(runner, benchmark.JaxRunner) else "torch"
    dtype = runner.config.model.dtype if framework == "jax" else runner.dtype_name
    extra = {"torch_mode": runner.mode} if framework == "torch" else {"layer": runner.layer.name}
    if time.monotonic() > deadline:
        return skipped_row(framework, mode, batch_size, size, dtype, "past --budget_s", **extra)
    try:
        return getattr(runner, f"{mode}_row")(batch, warmup, iters)
    except Exception as e:  # an out-of-memory batch, say: the other rows still run
        traceback.print_exc()
        return benchmark.error_row(
            framework, mode, (batch_size, *size), dtype, benchmark.describe_error(e), **extra
        )


def markdown(rows: list[dict], machine: dict) -> str:
    """benchmark.md: a summary (JAX against the fastest PyTorch row per dtype) and every row."""
    device = f"{machine['device_kind']} ({machine['platform']})"
    lines = [
        f"# Fast-SCNN, JAX and PyTorch on {device}",
        "",
        "items/s at the median call; JAX/PyTorch > 1: JAX faster. PyTorch modes: channels_last (eager, NHWC "
        "memory), compile (channels_last under torch.compile), eager (NCHW); bfloat16 is autocast.",
        "",
        "| measurement | dtype | JAX items/s | fastest PyTorch items/s (mode) | JAX/PyTorch |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    name = lambda r: f"{r['mode']} {r['batch']}x{r['height']}x{r['width']}"
    for row in rows:
        if row["framework"] != "jax" or not row.get("items_per_s"):
            continue
        peers = [
            r
            for r in rows
            if r["framework"] == "torch"
            and r.get("items_per_s")
            and (r["mode"], r["batch"], r["height"], r["width"], r["dtype"])
            == (row["mode"], row["batch"], row["height"], row["width"], row["dtype"])
        ]
        best = max(peers, key=lambda r: r["items_per_s"], default=None)
        torch_cell = f"{best['items_per_s']:.1f} ({best['torch_mode']})" if best else "-"
        ratio = f"{row['ratio_vs_torch']:.2f}x" if "ratio_vs_torch" in row else "-"
        lines.append(f"| {name(row)} | {row['dtype']} | {row['items_per_s']:.1f} | {torch_cell} | {ratio} |")
    lines += [
        "",
        "| measurement | framework | form | dtype | median ms | p90 ms | items/s | compile s | JAX/this |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        form = r.get("layer") or r.get("torch_mode") or "-"
        start = f"| {name(r)} | {r['framework']} | {form} | {r['dtype']} |"
        if r.get("error"):
            lines.append(f"{start} {r['error']} | | | | |")
            continue
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        ratio = f"{r['jax_over_torch']:.2f}x" if "jax_over_torch" in r else "-"
        lines.append(
            f"{start} {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['items_per_s']:.1f} | {compile_s} | "
            f"{ratio} |"
        )
    return "\n".join(lines) + "\n"


def benchmark_section(report: Report, quick: bool, torch_modes: list[str], deadline: float) -> None:
    """Runs `run_benchmark` on configs/camvid.py's model (tiny.py's when `quick`), writing benchmark.json
    and benchmark.md after every row, then the `benchmark_jax_rows` check."""
    config = (tiny if quick else camvid).get_config()
    warmup, iters = (1, 2) if quick else (FLAGS.warmup, FLAGS.iters)
    if torch_modes and importlib.util.find_spec("torch") is None:
        print("warning: torch is not installed; no PyTorch rows", flush=True)
        torch_modes = []
    settings = {
        "torch_modes": torch_modes,
        "torch_dtypes": FLAGS.torch_dtypes,
        "warmup": warmup,
        "iters": iters,
        "budget_s": FLAGS.budget_s,
        "quick": quick,
        "model_width": config.model.width,
    }
    machine = benchmark.machine_info()

    def save(rows):
        """Writes benchmark.json and benchmark.md with the rows so far."""
        benchmark.add_ratios(rows)
        report.write("benchmark.json", {"machine": machine, "settings": settings, "rows": rows})
        report.write("benchmark.md", markdown(rows, machine))

    rows = run_benchmark(
        config,
        QUICK_MEASUREMENTS if quick else MEASUREMENTS,
        torch_modes=torch_modes,
        torch_dtypes=FLAGS.torch_dtypes,
        warmup=warmup,
        iters=iters,
        deadline=deadline,
        on_row=save,
        # A dry run compiles each inference row once, not with both of XLA:CPU's libraries.
        dot_library="ynnpack" if quick else "auto",
    )
    save(rows)
    print(f"{benchmark.format_table(rows)}\n\n{markdown(rows, machine)}", flush=True)
    errors = [r["error"] for r in rows if r["framework"] == "jax" and r.get("error")]
    report.check("benchmark_jax_rows", lambda: (not errors, {"errors": errors}))


def main(argv):
    """Writes the environment, runs the checks and the benchmark, exits 1 if a check failed."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    if not FLAGS.output:
        raise app.UsageError("--output is required")
    torch_modes = FLAGS.torch_modes
    if FLAGS.quick and not FLAGS["torch_modes"].present:
        torch_modes = [m for m in torch_modes if m != "compile"]  # minutes of C++ compiles on a CPU
    if not set(torch_modes) <= set(benchmark.TORCH_MODES):
        raise app.UsageError(f"--torch_modes must be among {','.join(benchmark.TORCH_MODES)}")
    if not set(FLAGS.torch_dtypes) <= set(benchmark.DTYPES):
        raise app.UsageError(f"--torch_dtypes must be among {','.join(benchmark.DTYPES)}")
    start = time.monotonic()
    # JAX would otherwise take 75% of GPU memory at start, leaving PyTorch too little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    report = Report(FLAGS.output)
    env = environment()
    report.write("environment.json", env)
    devices = ", ".join(f"{d['device_kind']} ({d['platform']})" for d in env["device_details"])
    print(f"devices: {devices}\npackages: {json.dumps(env['packages'])}\ntorch: {json.dumps(env['torch'])}")
    print(env["nvidia_smi"] or "no nvidia-smi", flush=True)

    pattern = FLAGS.images if FLAGS.images is not None else default_images()
    count, size = (2, (180, 240)) if FLAGS.quick else (FLAGS.num_images, None)
    images, paths = load_images(pattern, count, size)
    if paths == ["synthetic"]:
        print(f"warning: no image matches --images={pattern!r}; checking on synthetic images", flush=True)
    run_checks(report, images, paths, FLAGS.allow_cpu)
    if report.checks["accelerator"]["passed"]:
        benchmark_section(report, FLAGS.quick, torch_modes, deadline=start + FLAGS.budget_s)

    failed = [name for name, c in report.checks.items() if not c["passed"]]
    outcome = f"FAILED: {', '.join(failed)}" if failed else "all checks passed"
    print(f"wrote {FLAGS.output} in {time.monotonic() - start:.0f} s; {outcome}")
    sys.exit(1 if failed else 0)


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so the module stays importable)."""
    flags.DEFINE_string("output", None, "Folder for environment.json, checks.json, benchmark.json/.md.")
    flags.DEFINE_string(
        "images", None, "Glob of the images the numerical checks use; default CamVid's val frames, if found."
    )
    flags.DEFINE_integer("num_images", 4, "How many of the --images matches (spread over them) to use.")
    flags.DEFINE_boolean(
        "quick", False, "Tiny model, small inputs, few calls, no torch.compile: a CPU dry run."
    )
    flags.DEFINE_boolean("allow_cpu", False, "Let the accelerator check pass on a CPU (for a dry run).")
    flags.DEFINE_list(
        "torch_modes",
        ["channels_last", "compile"],
        f"PyTorch modes to benchmark, among {','.join(benchmark.TORCH_MODES)}; empty for none.",
    )
    flags.DEFINE_list("torch_dtypes", list(benchmark.DTYPES), "PyTorch dtypes (bfloat16: autocast).")
    flags.DEFINE_integer("iters", 30, "Timed calls per benchmark row.")
    flags.DEFINE_integer("warmup", 5, "Untimed calls after each row's first.")
    flags.DEFINE_float("budget_s", 330.0, "No benchmark row starts this many seconds after the run began.")
    for name in ("num_images", "allow_cpu", "torch_modes", "torch_dtypes", "budget_s"):
        flags.DEFINE_alias(name.replace("_", "-"), name)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
