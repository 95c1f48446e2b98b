r"""Measures Fast-SCNN's speed on the devices JAX sees: inference, train steps and the input pipeline.

  python -m fastscnn_jax.benchmark --config=configs/camvid.py
  python -m fastscnn_jax.benchmark --config=configs/camvid.py --sizes=384x480,1024x2048 --compare-torch \
      --output=benchmarks/cpu.json
  python -m fastscnn_jax.benchmark --config=configs/camvid.py --dtype=bfloat16 --output=benchmarks/gpu.json

Every measurement is timed the same way: one first call (for JAX it includes jit compilation and is reported
as `compile_s`), `--warmup` untimed calls, then `--iters` timed calls, each waited for with
`block_until_ready` (or `torch.cuda.synchronize`); rows give the median and 90th percentile of the timed calls
and items (images) per second at the median. With `--rounds=N` each model row is timed N times, JAX and
PyTorch in turn, and the row pools the N * `--iters` timed calls. Modes:

  inference       the jitted forward pass (`train=False`, NHWC logits) at each `--sizes` and `--batch`; on
                  CPU with the faster of XLA:CPU's two matrix-product libraries (`--dot_library`,
                  autotune.py).
  train           `steps.train_step` (forward, loss, backward, the config's optimizer) at each size, batch
                  `--train_batch`, on random images and labels.
  input_pipeline  `input_pipeline.train_dataset` on the real CamVid train split at the config's batch size:
                  whole decoded 360x480 examples (the train step augments them), nothing else running, so one
                  sees whether data or compute bounds training.

The model rows run the layer `--cpu_layer` (default the config's `cpu_layer`) selects, and name it in their
`layer` column. They need neither TensorFlow nor the dataset: with `--skip-input-pipeline` (or
`--modes=inference,train`) the benchmark runs where TensorFlow is not installed.

`--compare-torch` adds rows of a plain PyTorch Fast-SCNN of the same architecture (`torch_reference`), with
as many threads as XLA uses, and the JAX/PyTorch throughput ratio. See benchmarks/README.md. By default that
is one eager NCHW model computing in the JAX rows' dtype; `--torch-modes` and `--torch-dtypes` (either implies
`--compare-torch`) time others, a row for each mode and dtype:

  eager           NCHW tensors, eager execution.
  channels_last   NHWC memory (`torch.channels_last`), which cuDNN's and oneDNN's fast convolutions take.
  compile         channels_last under `torch.compile` (static shapes: one compilation per input shape and
                  train/eval mode, its time in the row's `compile_s`).
  float32 / bfloat16  the dtype, bfloat16 as autocast (parameters stay float32, as in the Flax model).

A PyTorch row that fails (torch.compile without a C++ compiler, say) carries the `error` instead of timings,
and the rest still run. JAX rows get `ratio_vs_torch` against the fastest PyTorch row of the same shape and
dtype (`ratio_vs_torch_mode` names its mode); each PyTorch row gets `jax_over_torch`, JAX's throughput over
its own.
"""

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from fastscnn_jax import autotune, cli, steps

FLAGS = flags.FLAGS

MODES = ("inference", "train", "input_pipeline")
TORCH_MODES = ("eager", "channels_last", "compile")
DTYPES = ("float32", "bfloat16")
TORCH_INSTALL_HINT = "pip install torch==2.13.0"


def parse_sizes(values: list[str]) -> list[tuple[int, int]]:
    """['360x480', ...] -> [(360, 480), ...]; raises ValueError naming a malformed entry."""
    sizes = []
    for value in values:
        try:
            height, width = (int(v) for v in value.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes entry {value!r} is not HEIGHTxWIDTH, e.g. 360x480") from None
        if height < 1 or width < 1:
            raise ValueError(f"--sizes entry {value!r} must be positive")
        sizes.append((height, width))
    return sizes


def parse_batches(values: list[str]) -> list[int]:
    """['1', '8'] -> [1, 8]; raises ValueError naming a bad entry."""
    try:
        batches = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--batch must be positive integers, got {','.join(values)}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch must be positive integers, got {','.join(values)}")
    return batches


def cpu_threads() -> int:
    """CPUs this process may run on: the size of XLA:CPU's thread pool, and what PyTorch gets too."""
    # XLA sizes its pool from the affinity mask, which is smaller than os.cpu_count() under taskset/cgroups.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def time_calls(call, sync, warmup: int, iters: int) -> tuple[float, list[float]]:
    """Seconds of the first call, then of each of `iters` timed calls after `warmup` untimed ones.

    Args:
      call: runs one step and returns what `sync` waits for.
      sync: blocks until the work `call` dispatched has finished (asynchronous dispatch would otherwise be
        timed instead of the work).
      warmup: untimed calls after the first.
      iters: timed calls.

    Returns:
      (first call seconds, list of timed call seconds).
    """
    start = time.perf_counter()
    sync(call())
    first = time.perf_counter() - start
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    return first, times


def summarize(times: list[float], items: int) -> dict:
    """Median and p90 latency in ms, and items per second at the median."""
    median = float(np.median(times))
    return {
        "median_ms": round(median * 1e3, 3),
        "p90_ms": round(float(np.percentile(times, 90)) * 1e3, 3),
        "items_per_s": round(items / median, 3),
    }


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def jax_peak_memory() -> tuple[int, str]:
    """(bytes, source): the device allocator's peak where the backend has one, else the process max RSS."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without allocator statistics (CPU) raise or return None
        stats = {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return max_rss_bytes(), "process max RSS"


# CPU features that decide which kernels XLA:CPU and PyTorch run: machines sold under one CPU name differ
# here (with or without AVX-512), and the JAX/PyTorch ratios with them.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The first CPU's `processor` name, `cpu_family_model` ("family/model") and which of CPU_FEATURES it
    has, from `cpuinfo` (Linux); elsewhere `platform.processor()` and None for the rest."""
    fields = {}
    if os.path.exists(cpuinfo):  # platform.processor() is often empty or just 'x86_64' on Linux
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block only
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    family, model = fields.get("cpu family"), fields.get("model")
    return {
        "processor": fields.get("model name") or platform.processor(),
        "cpu_family_model": f"{family}/{model}" if family and model else None,
        "cpu_features": [f for f in CPU_FEATURES if f in flags] if flags else None,
    }


def machine_info() -> dict:
    """Devices, CPU, platform and package versions, to say what a result file was measured on."""
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "tensorflow", "tensorflow-cpu", "torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "platform": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "cpu_threads": cpu_threads(),
        **cpu_info(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        # The user's malloc settings (see fastscnn_jax/cpu): both frameworks run under them.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        # False with `--jax_cpu_enable_async_dispatch=false`: CPU computations on the calling thread.
        "jax_cpu_async_dispatch": bool(jax.config.values["jax_cpu_enable_async_dispatch"]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _row(framework, mode, shape, dtype, compile_s, times, peak, **extra) -> dict:
    """One result row with the keys every row has; `shape` is the input's (batch, height, width, ...)."""
    batch = shape[0]
    return {
        "framework": framework,
        "mode": mode,
        "height": shape[1],
        "width": shape[2],
        "batch": batch,
        "dtype": dtype,
        "compile_s": None if compile_s is None else round(compile_s, 3),
        **summarize(times, batch),
        "peak_memory_bytes": peak[0],
        "peak_memory_source": peak[1],
        "rounds": 1,
        "times_ms": [round(t * 1e3, 4) for t in times],
        **extra,
    }


def error_row(framework, mode, shape, dtype, error: str, **extra) -> dict:
    """A row for a measurement that failed: the keys of `_row`, no timings, and the `error`."""
    return {
        "framework": framework,
        "mode": mode,
        "height": shape[1],
        "width": shape[2],
        "batch": shape[0],
        "dtype": dtype,
        "compile_s": None,
        "median_ms": None,
        "p90_ms": None,
        "items_per_s": None,
        "peak_memory_bytes": None,
        "peak_memory_source": None,
        "rounds": 1,
        "times_ms": [],
        "error": error,
        **extra,
    }


def describe_error(error: BaseException) -> str:
    """One line for a row's `error`: the exception's type and the first line of its message, shortened."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:300]}"


def random_batch(rng, batch: int, size: tuple[int, int], num_classes: int, ignore_label: int) -> dict:
    """Random 0..255 NHWC images and labels with about 10% void pixels, as numpy arrays."""
    image = rng.uniform(0, 255, (batch, *size, 3)).astype(np.float32)
    label = rng.integers(0, num_classes, (batch, *size)).astype(np.int32)
    label[rng.random((batch, *size)) < 0.1] = ignore_label
    return {"image": image, "label": label}


_random_batch = random_batch  # the name scripts/dot_library.py and scripts/profile_step.py use


class JaxRunner:
    """The JAX model, its train state and jitted inference and train steps, built once for every size."""

    def __init__(self, config, dot_library: str = "auto"):
        """Initialises parameters and jits the steps (compilation happens per input shape, when first run).

        The model and steps are built with the layer `config.cpu_layer` selects (`steps.select_layer`);
        `dot_library` chooses XLA:CPU's matrix-product library for inference (`autotune.TunedJit`).
        """
        self.config = config
        self.mesh = steps.create_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.layer = steps.select_layer(config.cpu_layer)
        model = steps.create_model(config, self.layer)
        optimizer = steps.create_optimizer(config, steps.create_learning_rate_fn(config, 1000))
        init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
        state = steps.create_train_state(config, model, init_rng, optimizer, self.layer)
        self.num_params_without_aux = sum(
            x.size for k, v in state.params.items() if k != "aux_head" for x in jax.tree.leaves(v)
        )
        # Inference keeps its own copy: the train step donates the state's buffers.
        self.variables = jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats})
        self.state = jax.device_put(state, self.replicated)
        self._apply = functools.partial(model.apply, train=False)
        self.dot_library = dot_library
        self._tuned = {}
        # Uniform class weights cost what the config's real ones cost without reading the dataset.
        weights = None if config.class_weighting == "none" else jnp.ones(config.num_classes, jnp.float32)
        self.train_step = steps.make_train_step(config, weights, dropout_rng, self.mesh, self.layer)
        self.shard_batch = functools.partial(steps.shard_batch, mesh=self.mesh)

    def tuned_infer(self, shape: tuple):
        """The jitted forward pass for images of `shape`, an `autotune.TunedJit` with `dot_library`: on CPU,
        'auto' compiles it with YNNPACK's and with Eigen's matrix products at its first call and keeps the
        faster (that call, `compile_s`, includes both compiles and the timing)."""
        shape = tuple(shape)
        if shape not in self._tuned:
            self._tuned[shape] = autotune.TunedJit(self._apply, self.dot_library)
        return self._tuned[shape]

    def infer(self, variables, images):
        """Logits [B, H, W, K] of `images`, by `tuned_infer`."""
        return self.tuned_infer(images.shape)(variables, images)

    def inference_row(self, batch: dict, warmup: int, iters: int) -> dict:
        """Times the forward pass on `batch['image']`."""
        images = batch["image"]
        n = jax.device_count()
        if len(images) % n == 0:
            variables = jax.device_put(self.variables, self.replicated)
            images = self.shard_batch({"image": images})["image"]
        else:  # a batch the devices cannot split (e.g. 1 on 8 GPUs) runs on one device
            n = 1
            variables = jax.device_put(self.variables, jax.devices()[0])
            images = jax.device_put(images, jax.devices()[0])
        infer = self.tuned_infer(images.shape)
        first, times = time_calls(lambda: infer(variables, images), jax.block_until_ready, warmup, iters)
        extra = {"layer": self.layer.name, "devices": n, "dot_library": infer.library}
        return _row(
            "jax",
            "inference",
            images.shape,
            self.config.model.dtype,
            first,
            times,
            jax_peak_memory(),
            **extra,
        )

    def train_row(self, batch: dict, warmup: int, iters: int) -> dict:
        """Times `steps.train_step` on `batch`, carrying the state from step to step."""
        if len(batch["image"]) % jax.device_count():
            raise ValueError(
                f"--train_batch={len(batch['image'])} must be a multiple of the {jax.device_count()} devices"
            )
        sharded = self.shard_batch(batch)

        def step():
            """One train step; the donated state is replaced by the new one."""
            self.state, step_metrics = self.train_step(self.state, sharded)
            return self.state, step_metrics

        first, times = time_calls(step, jax.block_until_ready, warmup, iters)
        extra = {"layer": self.layer.name, "devices": jax.device_count()}
        shape, dtype = batch["image"].shape, self.config.model.dtype
        return _row("jax", "train", shape, dtype, first, times, jax_peak_memory(), **extra)


def import_torch():
    """Imports torch, an optional dependency, or exits with the command that installs it."""
    try:  # torch is optional: imported only by --compare-torch
        import torch
    except ImportError as e:
        raise SystemExit(f"--compare-torch needs PyTorch ({e}): {TORCH_INSTALL_HINT}") from None
    return torch


class TorchRunner:
    """`torch_reference.FastSCNN` timed like the JAX model, on the GPU when JAX uses one, else the CPU.

    `mode` is one of TORCH_MODES and `dtype` one of DTYPES (default the config's `model.dtype`), as the module
    docstring describes. A row that raises (or every row, when `torch.compile` itself fails) is an
    `error_row` naming the error, so that one failing mode does not end the benchmark.
    """

    def __init__(self, config, jax_num_params: int, mode: str = "eager", dtype: str | None = None):
        """Builds model and optimizer; asserts the parameter count equals the JAX model's (aux excluded)."""
        torch = import_torch()

        from fastscnn_jax import torch_reference  # imports torch

        if mode not in TORCH_MODES:
            raise ValueError(f"PyTorch mode must be one of {', '.join(TORCH_MODES)}, got {mode!r}")
        self.torch = torch
        self.config = config
        self.mode = mode
        self.dtype_name = dtype or config.model.dtype
        if self.dtype_name not in DTYPES:
            raise ValueError(f"PyTorch dtype must be one of {', '.join(DTYPES)}, got {self.dtype_name!r}")
        self.threads = cpu_threads()
        torch.set_num_threads(self.threads)
        use_cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if use_cuda:
            torch.backends.cudnn.benchmark = True  # autotuned kernels, as XLA autotunes its convolutions
        self.dtype = torch.bfloat16 if self.dtype_name == "bfloat16" else None
        self.model = torch_reference.FastSCNN(
            config.num_classes, config.model.width, config.model.dropout_rate, config.model.aux_head
        ).to(self.device)
        self.memory_format = torch.contiguous_format if mode == "eager" else torch.channels_last
        self.model = self.model.to(memory_format=self.memory_format)
        torch_params = torch_reference.count_parameters(self.model)
        assert torch_params == jax_num_params, (
            f"PyTorch reference has {torch_params} parameters, the JAX model {jax_num_params}: "
            "the architectures differ, so the comparison would be meaningless"
        )
        self.num_params = torch_params
        # AdamW with the config's hyperparameters, weight decay on kernels only, as steps.create_optimizer.
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim > 1]}, {"params": [p for p in params if p.ndim <= 1]}],
            lr=config.learning_rate,
            betas=(config.adam_b1, config.adam_b2),
            weight_decay=config.weight_decay,
        )
        self.optimizer.param_groups[1]["weight_decay"] = 0.0
        weighted = config.class_weighting != "none"
        self.loss = torch.nn.CrossEntropyLoss(
            weight=torch.ones(config.num_classes, device=self.device) if weighted else None,
            ignore_index=config.ignore_label,
        )
        # What runs the network; `self.model` stays the module whose train/eval mode and parameters it uses.
        self.forward = self.model
        self.error = None
        if mode == "compile":
            try:  # compilation itself happens at each first call (per shape and mode), inside a row
                # Every runner's model shares one `forward`, compiled once per shape, train/eval mode and
                # dtype: more than dynamo's default limit of 8, past which it would silently run eagerly.
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                self.forward = torch.compile(self.model, dynamic=False)
            except Exception as e:  # unsupported Python or platform: every row says so
                self.error = describe_error(e)

    def _autocast(self):
        """bfloat16 autocast when benchmarking bfloat16 (the analogue of the Flax model's compute dtype)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.dtype)

    def _sync(self, _):
        """Waits for queued CUDA work; CPU ops have finished when they return."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _peak_memory(self) -> tuple[int, str]:
        """(bytes, source) of this row: CUDA allocator peak since the row began, else the process max RSS."""
        if self.device.type == "cuda":
            return int(self.torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
        return max_rss_bytes(), "process max RSS"

    def _images(self, images):
        """NHWC numpy images as an NCHW tensor on the device, in the mode's memory format."""
        nchw = self.torch.from_numpy(images).permute(0, 3, 1, 2)
        return nchw.contiguous(memory_format=self.memory_format).to(self.device)

    def inference_row(self, batch: dict, warmup: int, iters: int) -> dict:
        """Times the forward pass under `torch.inference_mode` in eval mode."""
        return self._guarded("inference", batch, lambda: self._inference(batch, warmup, iters))

    def train_row(self, batch: dict, warmup: int, iters: int) -> dict:
        """Times forward, cross-entropy (ignore_index, aux loss as configured), backward, clipping, AdamW,
        and the step's confusion matrix (as `steps.train_step` returns one in its metrics)."""
        return self._guarded("train", batch, lambda: self._train(batch, warmup, iters))

    def _guarded(self, mode: str, batch: dict, measure) -> dict:
        """`measure()`'s row, or an `error_row` if this runner cannot run or `measure` raises."""
        error = self.error
        if error is None:
            try:
                return measure()
            except Exception as e:  # compiler and runtime errors of one mode; the others still run
                error = describe_error(e)
        shape, extra = batch["image"].shape, {"torch_mode": self.mode, "device": str(self.device)}
        return error_row("torch", mode, shape, self.dtype_name, error, **extra)

    def _inference(self, batch: dict, warmup: int, iters: int) -> dict:
        """The timed forward passes of `inference_row`."""
        torch = self.torch
        images = self._images(batch["image"])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.model.eval()

        def call():
            """One forward pass."""
            with torch.inference_mode(), self._autocast():
                return self.forward(images)

        first, times = time_calls(call, self._sync, warmup, iters)
        return self._row("inference", batch, first, times)

    def _train(self, batch: dict, warmup: int, iters: int) -> dict:
        """The timed optimizer steps of `train_row`."""
        torch = self.torch
        config = self.config
        images = self._images(batch["image"])
        labels = torch.from_numpy(batch["label"]).long().to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.model.train()

        def step():
            """One optimizer step."""
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                out = self.forward(images)
                logits = out[0] if isinstance(out, tuple) else out
                loss = self.loss(logits, labels)
                if isinstance(out, tuple):
                    loss = loss + config.aux_loss_weight * self.loss(out[1], labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip_norm)
            self.optimizer.step()
            with torch.no_grad():  # the step's metrics: confusion matrix of the non-void pixels
                k = config.num_classes
                valid = labels != config.ignore_label
                pairs = labels[valid] * k + logits.argmax(1)[valid]
                confusion = torch.bincount(pairs, minlength=k * k).reshape(k, k)
            return loss, confusion

        first, times = time_calls(step, self._sync, warmup, iters)
        return self._row("train", batch, first, times)

    def _row(self, mode: str, batch: dict, first: float, times: list[float]) -> dict:
        """A torch result row; `compile_s` is the first call's time under torch.compile, else None."""
        extra = {
            "threads": self.torch.get_num_threads(),
            "device": str(self.device),
            "torch_mode": self.mode,
        }
        compile_s = first if self.mode == "compile" else None
        shape = batch["image"].shape
        return _row("torch", mode, shape, self.dtype_name, compile_s, times, self._peak_memory(), **extra)


def input_pipeline_row(config, warmup: int, iters: int) -> dict:
    """Times `input_pipeline.train_dataset` batches of real CamVid on their own (no model running); the row's
    height and width are the batches' (the canvas's), not the crop's.

    `compile_s` is the time to the first batch (tracing the tf.data functions and filling buffers); as
    prefetching makes single batches arrive in bursts, `items_per_s` is total images over total time of the
    timed batches rather than the median's rate.
    """
    # The only TensorFlow user here (tf.data, TFDS), imported only when this row is asked for.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from fastscnn_jax import camvid, input_pipeline

    tf.config.set_visible_devices([], "GPU")  # tf.data only: TensorFlow must not take GPU memory
    builder = camvid.get_builder(config.dataset_dir, config.tfds_data_dir or None, config.download_url)
    split = input_pipeline.read_split(builder, "train", config.ignore_label)
    dataset = input_pipeline.train_dataset(split, config, local_batch_size=config.batch_size)
    iterator = None

    def next_batch():
        """The next batch; the first call also starts the pipeline, so `compile_s` covers its start-up."""
        nonlocal iterator
        iterator = iterator or dataset.as_numpy_iterator()
        return next(iterator)

    first, times = time_calls(next_batch, lambda _: None, warmup, iters)
    shape = (config.batch_size, *split.images.shape[1:3])
    peak = (max_rss_bytes(), "process max RSS")
    row = _row("jax", "input_pipeline", shape, "float32", first, times, peak, layer=None)
    row["items_per_s"] = round(config.batch_size * len(times) / sum(times), 3)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Sets `ratio_vs_torch` (JAX items/s over PyTorch items/s; > 1: JAX faster) on JAX rows with a peer of
    the same mode, size, batch and dtype: the fastest such PyTorch row, whose `torch_mode` (if any) goes in
    `ratio_vs_torch_mode`. Each PyTorch row with a JAX peer gets `jax_over_torch`, the same ratio against it.
    Rows without timings (`error`) take no part."""
    key = lambda r: (r["mode"], r["height"], r["width"], r["batch"], r["dtype"])
    timed = [r for r in rows if r.get("items_per_s")]
    jax_rows = {key(r): r for r in timed if r["framework"] == "jax"}
    fastest = {}
    for row in timed:
        peer = jax_rows.get(key(row))
        if row["framework"] == "torch" and peer:
            row["jax_over_torch"] = round(peer["items_per_s"] / row["items_per_s"], 3)
            best = fastest.get(key(row))
            if best is None or row["items_per_s"] > best["items_per_s"]:
                fastest[key(row)] = row
    for k, peer in fastest.items():
        jax_rows[k]["ratio_vs_torch"] = peer["jax_over_torch"]
        if "torch_mode" in peer:
            jax_rows[k]["ratio_vs_torch_mode"] = peer["torch_mode"]


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of the rows; a PyTorch row's `torch_mode` in the layer column, its ratio the
    JAX row's throughput over its own."""
    header = (
        f"{'framework':<9} {'mode':<14} {'size':>9} {'batch':>5} {'dtype':<8} {'layer':<13} {'dots':<7} "
        f"{'compile_s':>9} {'median_ms':>10} {'p90_ms':>10} {'items/s':>9} {'peak_MiB':>9} {'jax/torch':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        impls = f"{r.get('layer') or r.get('torch_mode') or '-':<13} {r.get('dot_library') or '-':<7}"
        start = (
            f"{r['framework']:<9} {r['mode']:<14} {r['height']:>4}x{r['width']:<4} {r['batch']:>5} "
            f"{r['dtype']:<8} {impls}"
        )
        if r.get("error"):
            lines.append(f"{start} error: {r['error']}")
            continue
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        ratio = r.get("ratio_vs_torch", r.get("jax_over_torch"))
        ratio = "-" if ratio is None else f"{ratio:.2f}x"
        peak = f"{r['peak_memory_bytes'] / 2**20:.0f}"
        lines.append(
            f"{start} {compile_s:>9} {r['median_ms']:>10.2f} "
            f"{r['p90_ms']:>10.2f} {r['items_per_s']:>9.2f} {peak:>9} {ratio:>9}"
        )
    sources = sorted({r["peak_memory_source"] for r in rows if r.get("peak_memory_source")})
    lines.append(
        f"peak memory: {', '.join(sources)} (process-wide so far for RSS); jax/torch > 1: JAX faster"
    )
    return "\n".join(lines)


def pool_rounds(rows: list[dict]) -> dict:
    """One row from the rows of the same measurement's rounds: their timed calls pooled (median, p90 and
    items/s of all of them), the first round's `compile_s` (later first calls compile nothing), the largest
    peak memory. If a round failed, its error row stands for them all."""
    failed = [row for row in rows if row.get("error")]
    if failed:
        return {**failed[0], "rounds": len(rows)}
    first = rows[0]
    times_ms = [t for row in rows for t in row["times_ms"]]
    pooled = {**first, **summarize([t / 1e3 for t in times_ms], first["batch"])}
    pooled.update(
        rounds=len(rows),
        times_ms=times_ms,
        peak_memory_bytes=max(row["peak_memory_bytes"] for row in rows),
    )
    return pooled


def measure_rounds(runners: list, method: str, batch: dict, warmup: int, iters: int, rounds: int) -> list:
    """`runner.<method>(batch, warmup, iters)` for each runner, `rounds` times in turn (JAX, PyTorch, JAX,
    PyTorch, ...), each runner's rounds pooled into one row: both frameworks then sample the same stretches of
    a machine whose speed drifts (a shared VM's does), where one block each would give each its own
    stretch. Each round starts with its own untimed calls, so neither framework is timed
    on caches the other has just filled."""
    per_runner = [[] for _ in runners]
    for _ in range(rounds):
        for rows, runner in zip(per_runner, runners, strict=True):
            rows.append(getattr(runner, method)(batch, warmup, iters))
    return [pool_rounds(rows) for rows in per_runner]


def run_benchmark(
    config,
    *,
    sizes: list[tuple[int, int]],
    batches: list[int],
    train_batch: int,
    warmup: int,
    iters: int,
    modes: tuple[str, ...] = MODES,
    compare_torch: bool = False,
    rounds: int = 1,
    dot_library: str = "auto",
    torch_modes: tuple[str, ...] = ("eager",),
    torch_dtypes: tuple[str, ...] | None = None,
) -> dict:
    """Runs every measurement and returns the report.

    Args:
      config: the configuration (model, optimizer, loss and data keys; `model.dtype` and `cpu_layer` as
        they should be benchmarked).
      sizes: (height, width) input sizes for inference and train rows.
      batches: inference batch sizes.
      train_batch: train-step batch size (a multiple of the device count).
      warmup: untimed calls after the first.
      iters: timed calls per row.
      modes: which of `MODES` to measure ('input_pipeline' needs the CamVid dataset).
      compare_torch: also time `torch_reference.FastSCNN` (needs torch).
      rounds: times each model row `rounds` times, alternating between the frameworks (`measure_rounds`);
        a row then pools `rounds * iters` timed calls.
      dot_library: XLA:CPU's matrix-product library for JAX inference, one of `autotune.DOT_LIBRARIES`
        ('auto': the faster of the two, timed at each inference row's first call).
      torch_modes: with `compare_torch`, the PyTorch modes (TORCH_MODES) to time, each in every
        `torch_dtypes`.
      torch_dtypes: the PyTorch dtypes (DTYPES); None: the config's `model.dtype`, as the JAX rows.

    Returns:
      {"machine": `machine_info()`, "rows": [row, ...]}, rows with `framework`, `mode`, `height`, `width`,
      `batch`, `dtype`, `compile_s`, `median_ms`, `p90_ms`, `items_per_s`, peak memory, `rounds`,
      `times_ms` (every timed call), and for JAX rows `layer` (the layer's name), for JAX inference rows
      `dot_library` (None off CPU), and, where a PyTorch row matches, `ratio_vs_torch`; PyTorch rows have
      `torch_mode`, and `error` instead of timings where they failed (`add_ratios`, `TorchRunner`).
    """
    if warmup < 0 or iters < 1 or rounds < 1:
        raise ValueError(
            f"need --warmup >= 0, --iters >= 1 and --rounds >= 1, got {warmup}, {iters} and {rounds}"
        )
    if not set(modes) <= set(MODES):
        raise ValueError(f"modes must be among {MODES}, got {modes}")
    autotune.check_library(dot_library, "--dot_library")
    torch_dtypes = tuple(torch_dtypes or (config.model.dtype,))
    if not (set(torch_modes) <= set(TORCH_MODES) and set(torch_dtypes) <= set(DTYPES)):
        raise ValueError(
            f"torch modes must be among {TORCH_MODES} and dtypes among {DTYPES}, got {torch_modes} and "
            f"{torch_dtypes}"
        )
    # The model is built (and parameters initialised) only when a model mode is asked for.
    jax_runner = JaxRunner(config, dot_library) if {"inference", "train"} & set(modes) else None
    torch_runners = [
        TorchRunner(config, jax_runner.num_params_without_aux, mode, dtype)
        for mode in (torch_modes if compare_torch and jax_runner else ())
        for dtype in torch_dtypes
    ]
    runners = [r for r in (jax_runner, *torch_runners) if r]
    rng = np.random.default_rng(config.seed)
    rows = []
    print("\n".join(format_table([]).splitlines()[:2]), flush=True)
    for size in sizes if runners else []:
        for batch_size in batches if "inference" in modes else []:
            batch = random_batch(rng, batch_size, size, config.num_classes, config.ignore_label)
            for row in measure_rounds(runners, "inference_row", batch, warmup, iters, rounds):
                rows.append(row)
                print(format_table([row]).splitlines()[2], flush=True)
        batch = random_batch(rng, train_batch, size, config.num_classes, config.ignore_label)
        for row in (
            measure_rounds(runners, "train_row", batch, warmup, iters, rounds) if "train" in modes else []
        ):
            rows.append(row)
            print(format_table([row]).splitlines()[2], flush=True)
    if "input_pipeline" in modes:
        rows.append(input_pipeline_row(config, warmup, iters))
    add_ratios(rows)
    machine = machine_info()
    if torch_runners:
        torch_runner = torch_runners[0]
        machine["torch_threads"] = torch_runner.threads
        machine["torch_device"] = str(torch_runner.device)
        machine["num_params_without_aux"] = torch_runner.num_params
    return {"machine": machine, "rows": rows}


def main(argv):
    """Runs the benchmark, prints the table and writes the JSON report."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    try:
        sizes = parse_sizes(FLAGS.sizes)
        batches = parse_batches(FLAGS.batch)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    modes = tuple(m for m in FLAGS.modes if not (FLAGS.skip_input_pipeline and m == "input_pipeline"))
    if not set(modes) <= set(MODES):
        raise app.UsageError(f"--modes must be among {','.join(MODES)}, got {','.join(FLAGS.modes)}")
    # Asking for PyTorch modes or dtypes asks for the comparison.
    compare_torch = FLAGS.compare_torch or FLAGS["torch_modes"].present or FLAGS["torch_dtypes"].present
    if not set(FLAGS.torch_modes) <= set(TORCH_MODES):
        raise app.UsageError(f"--torch-modes must be among {','.join(TORCH_MODES)}, got {FLAGS.torch_modes}")
    if not set(FLAGS.torch_dtypes or ()) <= set(DTYPES):
        raise app.UsageError(f"--torch-dtypes must be among {','.join(DTYPES)}, got {FLAGS.torch_dtypes}")
    if compare_torch:
        import_torch()  # fail before minutes of JAX measurements, not after
        # JAX would otherwise take 75% of GPU memory at start, leaving PyTorch too little.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    config = FLAGS.config.copy_and_resolve_references()
    if FLAGS.dtype:
        config.model.dtype = FLAGS.dtype
    if FLAGS.cpu_layer:
        config.cpu_layer = FLAGS.cpu_layer
    report = run_benchmark(
        config,
        sizes=sizes,
        batches=batches,
        train_batch=FLAGS.train_batch,
        warmup=FLAGS.warmup,
        iters=FLAGS.iters,
        modes=modes,
        compare_torch=compare_torch,
        rounds=FLAGS.rounds,
        dot_library=FLAGS.dot_library,
        torch_modes=tuple(FLAGS.torch_modes),
        torch_dtypes=tuple(FLAGS.torch_dtypes or ()),
    )
    machine = report["machine"]
    devices = f"{machine['device_kind']} x{len(machine['devices'])} ({machine['platform']})"
    features = " ".join(machine["cpu_features"] or [])
    print(f"\n{devices}, {machine['processor']} (family/model {machine['cpu_family_model']}; {features})")
    print(format_table(report["rows"]))
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {FLAGS.output}")


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so the module stays importable)."""
    default_config = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "camvid.py"
    )
    config_flags.DEFINE_config_file("config", default_config, "Configuration file.", lock_config=True)
    flags.DEFINE_list(
        "sizes", ["360x480", "720x960", "1024x2048"], "Input sizes HEIGHTxWIDTH, comma-separated."
    )
    flags.DEFINE_list("batch", ["1", "8"], "Inference batch sizes, comma-separated.")
    flags.DEFINE_integer("train_batch", 8, "Train-step batch size (a multiple of the device count).")
    flags.DEFINE_integer("iters", 20, "Timed calls per row.")
    flags.DEFINE_integer("warmup", 3, "Untimed calls after the first (compiling) call.")
    flags.DEFINE_integer(
        "rounds", 1, "Time each model row this many times, alternating JAX and PyTorch; rows pool them."
    )
    flags.DEFINE_enum(
        "dtype", None, ["float32", "bfloat16"], "Compute dtype; default the config's model.dtype."
    )
    flags.DEFINE_enum(
        "cpu_layer",
        None,
        list(steps.CPU_LAYER_CHOICES),
        "The CPU layer (fastscnn_jax/cpu): auto = on a CPU backend; default the config's cpu_layer.",
    )
    flags.DEFINE_enum(
        "dot_library",
        "auto",
        list(autotune.DOT_LIBRARIES),
        "XLA:CPU's matrix-product library for inference; 'auto' times both (fastscnn_jax/autotune.py).",
    )
    flags.DEFINE_list("modes", list(MODES), f"What to measure, comma-separated, among {','.join(MODES)}.")
    flags.DEFINE_boolean("skip_input_pipeline", False, "Leave out the input-pipeline measurement.")
    flags.DEFINE_boolean("compare_torch", False, f"Also time a PyTorch Fast-SCNN ({TORCH_INSTALL_HINT}).")
    flags.DEFINE_list(
        "torch_modes",
        ["eager"],
        f"PyTorch modes to time, among {','.join(TORCH_MODES)}; implies --compare-torch.",
    )
    flags.DEFINE_list(
        "torch_dtypes",
        None,
        f"PyTorch dtypes, among {','.join(DTYPES)} (bfloat16: autocast); default the JAX rows' dtype; "
        "implies --compare-torch.",
    )
    flags.DEFINE_string("output", None, "Write the JSON report here.")
    # The README spells these with hyphens; absl aliases accept both spellings.
    names = ("train_batch", "skip_input_pipeline", "compare_torch", "dot_library", "cpu_layer")
    for name in (*names, "torch_modes", "torch_dtypes"):
        flags.DEFINE_alias(name.replace("_", "-"), name)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
