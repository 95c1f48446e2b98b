"""Batch-1 inference and the batch-8 train step with XLA:CPU's dots in YNNPACK (the default) or in Eigen.

  python scripts/dot_library.py            # 384x480, 30 rounds of inference, 8 of the train step
  python scripts/dot_library.py 20 0       # 20 inference rounds, no train step

The same lowered program is compiled twice in one process, once with the default options and once with
`xla_cpu_experimental_ynn_fusion_type` lacking `individual_dot` (products then run as plain XLA dots, in
Eigen), and the two executables are timed in alternating blocks (8 inference calls, or 3 train steps, each),
so that the VM's slow and fast phases fall on both alike. Prints each one's median, 10th and 90th percentile
and the largest difference between their outputs. Which library is faster depends on the CPU
(benchmarks/README.md); `fastscnn_jax.autotune` makes that choice by timing. The model is built with the
config's `cpu_layer`, as the benchmark builds it.
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import jax.numpy as jnp
import numpy as np

from configs import camvid
from fastscnn_jax import autotune, benchmark

VARIANTS = {"ynnpack dots (default)": {}, "eigen dots": autotune.COMPILER_OPTIONS["eigen"]}


def compile_variants(lowered) -> dict:
    """One executable per entry of VARIANTS."""
    return {name: lowered.compile(compiler_options=options) for name, options in VARIANTS.items()}


def report(times: dict, what: str) -> None:
    """Median, p10 and p90 in ms per variant."""
    for name, seconds in times.items():
        ms = np.array(seconds) * 1e3
        print(
            f"{what:>10} {name:>24}: median {np.median(ms):8.2f} ms  "
            f"p10 {np.percentile(ms, 10):8.2f}  p90 {np.percentile(ms, 90):8.2f}  ({len(ms)} calls)"
        )


def main():
    """Times inference, then the train step, for every variant."""
    infer_rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    train_rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    config = camvid.get_config()
    runner = benchmark.JaxRunner(config)
    rng = np.random.default_rng(0)
    variables = runner.variables
    images = jnp.asarray(rng.random((1, 384, 480, 3), np.float32))
    executables = compile_variants(runner.tuned_infer(images.shape).lower(variables, images))
    outputs = {name: np.asarray(e(variables, images)) for name, e in executables.items()}
    first = next(iter(outputs.values()))
    print(
        "inference logits, largest |difference| between variants:",
        max(float(np.abs(o - first).max()) for o in outputs.values()),
        "(largest |logit|",
        float(np.abs(first).max()),
        ")",
    )
    times = {name: [] for name in executables}
    for _ in range(infer_rounds):
        for name, e in executables.items():
            call = functools.partial(e, variables, images)
            times[name] += benchmark.time_calls(call, jax.block_until_ready, warmup=0, iters=8)[1]
    report(times, "inference")
    if not train_rounds:
        return
    batch = benchmark._random_batch(rng, 8, (384, 480), config.num_classes, config.ignore_label)
    sharded = runner.shard_batch(batch)
    executables = compile_variants(runner.train_step.lower(runner.state, sharded))
    copy = functools.partial(jax.tree.map, jnp.copy)
    states = {name: copy(runner.state) for name in executables}
    times = {name: [] for name in executables}
    for _ in range(train_rounds):
        for name, e in executables.items():
            for _ in range(3):
                start = time.perf_counter()
                states[name], _ = e(states[name], sharded)
                jax.block_until_ready(states[name])
                times[name].append(time.perf_counter() - start)
    report(times, "train")
    machine = benchmark.machine_info()
    print(f"jax {jax.__version__}, {machine['processor']}, {machine['cpu_threads']} CPU threads")


if __name__ == "__main__":
    main()
