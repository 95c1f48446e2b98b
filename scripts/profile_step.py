"""Profile of one jitted train step (or batch-1 inference) of configs/camvid.py at 384x480 on this machine.

  python scripts/profile_step.py train    # batch 8: the benchmark's train row, op by op
  python scripts/profile_step.py infer    # batch 1, with the matrix-product library autotune chooses

Prints the mean time of three steps (after three warm-up steps), then the XLA ops (fusions) that took
longest in a jax.profiler trace of three steps (time summed over the threads that ran them, so per-step
totals exceed the step time), each with its output shape and the JAX op it came from, then totals by kind.
This is how benchmarks/README.md's "where the time goes" numbers were found. Writes the trace under
/tmp/profile_step_<mode>. For the train step it also prints XLA's cost analysis (FLOPs, bytes accessed) and
the number of fusions.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import numpy as np

from configs import camvid
from fastscnn_jax import autotune, benchmark

cfg = camvid.get_config()
mode = sys.argv[1] if len(sys.argv) > 1 else "train"
r = benchmark.JaxRunner(cfg)
rng = np.random.default_rng(0)
b = 8 if mode == "train" else 1
batch = benchmark._random_batch(rng, b, (384, 480), cfg.num_classes, cfg.ignore_label)
if mode == "train":
    sharded = r.shard_batch(batch)

    def step():
        r.state, m = r.train_step(r.state, sharded)
        return r.state, m
else:
    imgs = jax.device_put(batch["image"])

    def step():
        return r.infer(r.variables, imgs)


for _ in range(3):
    jax.block_until_ready(step())
t = time.perf_counter()
for _ in range(3):
    jax.block_until_ready(step())
print("step ms", (time.perf_counter() - t) / 3 * 1e3)
d = "/tmp/profile_step_" + mode
os.system(f"rm -rf {d}")
with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(3):
        jax.block_until_ready(step())
f = glob.glob(d + "/**/*.trace.json.gz", recursive=True)[0]
ev = json.load(gzip.open(f))["traceEvents"]
tot = collections.Counter()
cnt = collections.Counter()
for e in ev:
    if e.get("ph") == "X" and "dur" in e:
        tot[e["name"]] += e["dur"]
        cnt[e["name"]] += 1
print("top events (us total over 3 steps, summed over threads)")
for k, v in tot.most_common(60):
    print(f"{v / 3 / 1e3:9.2f} ms {cnt[k] // 3:4d}x  {k[:110]}")
if mode == "train":
    compiled = r.train_step.lower(r.state, sharded).compile()
    txt = compiled.as_text()
    # What XLA counts in the step: compares two versions of the code by their arithmetic and memory traffic,
    # which, unlike their times, this machine's drift does not move.
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"cost: {cost['flops'] / 1e9:.3f} GFLOP, {cost['bytes accessed'] / 1e9:.3f} GB accessed, ", end="")
    print(f"{txt.count(' fusion(')} fusions")
else:
    tuned = r.tuned_infer(imgs.shape)  # the library `autotune` chose for it at the first call
    options = autotune.COMPILER_OPTIONS[tuned.library]
    txt = tuned.lower(r.variables, imgs).compile(compiler_options=options).as_text()
lines = {}
for line in txt.split("\n"):
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ", line)
    if m:
        lines.setdefault(m.group(1), line)
print("\n=== details of top fusions")
for k, v in tot.most_common(60):
    if k in lines:
        hlo_line = lines[k]
        shape = hlo_line.split(" = ")[1].split(" ")[0]
        opn = re.search(r'op_name="([^"]+)"', hlo_line)
        print(f"{v / 3 / 1e3:8.2f} {k:32s} {shape[:60]:60s} {(opn.group(1) if opn else '')[-120:]}")
cats = collections.Counter()
for k, v in tot.items():
    if k.startswith("$") or "Execute" in k or "Pjit" in k or "Thread" in k:
        continue
    c = re.sub(r"[._]\d+$", "", k)
    cats[c] += v
print("\n=== by kind (ms per step)")
for k, v in cats.most_common(25):
    print(f"{v / 3 / 1e3:8.2f} {k}")
print("\n=== ynn by op")
yc = collections.Counter()
ycn = collections.Counter()
for k, v in tot.items():
    if k.startswith("ynn_fusion") and k in lines:
        hlo_line = lines[k]
        opn = re.search(r'op_name="([^"]+)"', hlo_line)
        op = opn.group(1).split("/")[-1] if opn else "none"
        bwd = "bwd" if (opn and "transpose(" in opn.group(1)) else "fwd"
        yc[(op, bwd)] += v
        ycn[(op, bwd)] += 1
for k, v in yc.most_common(20):
    print(f"{v / 3 / 1e3:8.2f} {ycn[k]:4d} {k}")
