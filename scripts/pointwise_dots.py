"""The 1x1 convolutions of Fast-SCNN at 384x480 batch 1 as plain matrix products: XLA:CPU against PyTorch.

  python scripts/pointwise_dots.py        # needs torch (pip install -e .[torch])

Batch-1 inference spends over half its time in these dots (benchmarks/README.md). Each [pixels, C_in] x
[C_in, C_out] product is timed ten times in a row per call, so that JAX's per-call dispatch is not what is
measured: in one jitted `lax.fori_loop` (each product's input depends on the one before, so none can be
hoisted or skipped; the added scalar costs JAX one extra pass over the input, so its times are if anything
high) and in a Python loop of `torch.mm`, on the same thread count; the median of 30 calls after 3 warm-up
calls, divided by ten. The last column is JAX's time over PyTorch's (> 1: JAX slower). The totals weight
each shape by how often the network uses it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import numpy as np
import torch
from jax import lax

from fastscnn_jax import benchmark

REPEATS = 10

# (pixels, C_in, C_out, uses, where): every 1x1 convolution of the 384x480 forward pass but the four tiny
# pyramid-pooling branches (1 to 36 pixels).
SHAPES = [
    (11520, 32, 48, 1, "learning to downsample, DSConv 1"),
    (2880, 48, 64, 1, "learning to downsample, DSConv 2"),
    (2880, 64, 384, 1, "bottleneck 1 expansion"),
    (720, 64, 384, 3, "bottlenecks 2-4 expansion"),
    (720, 384, 64, 3, "bottlenecks 1-3 projection"),
    (180, 384, 96, 1, "bottleneck 4 projection"),
    (180, 96, 576, 3, "bottlenecks 5-7 expansion"),
    (180, 576, 96, 2, "bottlenecks 5-6 projection"),
    (180, 576, 128, 1, "bottleneck 7 projection"),
    (180, 128, 768, 2, "bottlenecks 8-9 expansion"),
    (180, 768, 128, 2, "bottlenecks 8-9 projection"),
    (180, 256, 128, 1, "pyramid pooling output"),
    (2880, 128, 128, 3, "feature fusion (low branch), classifier DSConvs"),
    (2880, 64, 128, 1, "feature fusion (high branch)"),
    (2880, 128, 11, 1, "classifier output"),
]


def median_ms(call, sync) -> float:
    """Median of 30 timed calls in ms, after three untimed ones (`benchmark.time_calls`)."""
    _, times = benchmark.time_calls(call, sync, warmup=2, iters=30)
    return float(np.median(times)) * 1e3


def main():
    """Prints one row per shape and the weighted totals."""
    torch.set_num_threads(benchmark.cpu_threads())
    rng = np.random.default_rng(0)

    @jax.jit
    def jax_repeats(x, w):
        """REPEATS products; each input is `x` plus a scalar taken from the product before."""

        def body(_, carry):
            shift, _ = carry
            y = (x + shift) @ w
            return y[0, 0] * 1e-30, y

        return lax.fori_loop(0, REPEATS, body, (x[0, 0] * 0, jax.numpy.zeros((x.shape[0], w.shape[1]))))[1]

    def torch_repeats(x, w):
        """REPEATS products in a Python loop."""
        y = None
        for _ in range(REPEATS):
            y = torch.mm(x, w)
        return y

    total_jax = total_torch = 0.0
    header = f"{'pixels x C_in x C_out':>22} {'uses':>4} {'jax ms':>8} {'torch ms':>8} {'jax/torch':>9}"
    print(header + "  layer (jax/torch: time ratio)")
    for pixels, c_in, c_out, uses, where in SHAPES:
        x = rng.standard_normal((pixels, c_in), np.float32)
        w = rng.standard_normal((c_in, c_out), np.float32)
        jx, jw = jax.device_put(x), jax.device_put(w)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        t_jax = median_ms(lambda jx=jx, jw=jw: jax_repeats(jx, jw), jax.block_until_ready) / REPEATS
        t_torch = median_ms(lambda tx=tx, tw=tw: torch_repeats(tx, tw), lambda _: None) / REPEATS
        total_jax += uses * t_jax
        total_torch += uses * t_torch
        shape = f"{pixels} x {c_in} x {c_out}"
        print(f"{shape:>22} {uses:>4} {t_jax:8.3f} {t_torch:8.3f} {t_jax / t_torch:8.2f}x  {where}")
    ratio = total_jax / total_torch
    print(f"{'weighted total':>22} {'':>4} {total_jax:8.2f} {total_torch:8.2f} {ratio:8.2f}x")
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")


if __name__ == "__main__":
    main()
