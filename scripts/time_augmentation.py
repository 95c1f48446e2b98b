"""Train-step time of a config with the augmentation inside the step against the tf.data augmentation it
replaced, in one process, in alternating rounds (a shared machine drifts; alternating spreads the drift over
both).

  python scripts/time_augmentation.py [CONFIG] [ROUNDS] [STEPS_PER_ROUND] [OLD_REVISION]
  python scripts/time_augmentation.py configs/camvid_cpu.py 4 10 ae92fd0

`new`: `input_pipeline.train_dataset` (whole decoded examples) into `steps.make_train_step(augment=True)`, as
`train.train_and_evaluate` runs it. `old`: the per-example tf.data augmentation of `OLD_REVISION`'s
input_pipeline.py (read from git) into the step without augmentation. Both with the config's layer, batch
and crop, on the real CamVid train split (`../shared/camvid` or $CAMVID_DIR), each round timing
STEPS_PER_ROUND steps dispatched as the training loop dispatches them (the host fetches the next batch while
the previous step runs) and waited for at the round's end. Prints each round's ms per step and the medians.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fastscnn_jax import camvid_folder, input_pipeline, losses, reader, steps


def old_pipeline(revision: str):
    """`fastscnn_jax/input_pipeline.py` as it was at `revision`, imported as a module."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(
        ["git", "show", f"{revision}:fastscnn_jax/input_pipeline.py"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "old_input_pipeline.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_input_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    """Times both paths and prints the rounds."""
    args = sys.argv[1:]
    config_path = args[0] if args else "configs/camvid_cpu.py"
    rounds = int(args[1]) if len(args) > 1 else 4
    per_round = int(args[2]) if len(args) > 2 else 10
    revision = args[3] if len(args) > 3 else "ae92fd0"
    spec = importlib.util.spec_from_file_location("config", config_path)
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    config = config_module.get_config()

    root = camvid_folder.find_camvid_dir(config.dataset_dir)
    split = reader.InMemorySplit.from_folder(root, "train", config.ignore_label)
    pairs = camvid_folder.list_split(root, "train")
    old = old_pipeline(revision)
    old_split = old.InMemorySplit(
        [image.read_bytes() for image, _ in pairs], [mask.read_bytes() for _, mask in pairs], split.names
    )

    layer = steps.select_layer(config.cpu_layer)
    mesh = steps.create_mesh()
    weights = losses.class_weights(split.class_pixel_counts(config.num_classes), config.class_weighting)
    weights = None if weights is None else jax.numpy.asarray(weights)
    model = steps.create_model(config, layer)
    optimizer = steps.create_optimizer(config, steps.create_learning_rate_fn(config, config.num_train_steps))
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))

    runs = {}
    for name, augment, batches in [
        ("old", False, old.train_dataset(old_split, config, local_batch_size=config.batch_size)),
        ("new", True, input_pipeline.train_dataset(split, config, local_batch_size=config.batch_size)),
    ]:
        state = steps.create_train_state(config, model, init_rng, optimizer, layer)
        runs[name] = {
            "state": jax.device_put(state, NamedSharding(mesh, P())),
            "step": steps.make_train_step(config, weights, dropout_rng, mesh, layer, augment=augment),
            "batches": batches.as_numpy_iterator(),
            "ms": [],
        }

    def run(r, count):
        """`count` steps dispatched back to back; returns seconds until the last is done."""
        start = time.perf_counter()
        for _ in range(count):
            r["state"], metrics = r["step"](r["state"], steps.shard_batch(next(r["batches"]), mesh))
        jax.block_until_ready((r["state"], metrics))
        return time.perf_counter() - start

    for name, r in runs.items():
        print(f"{name}: first step (compile) {run(r, 1):.1f} s, warm-up {run(r, 2):.1f} s", flush=True)
    for i in range(rounds):
        for name, r in runs.items():
            r["ms"].append(1000 * run(r, per_round) / per_round)
            print(f"round {i} {name}: {r['ms'][-1]:.0f} ms/step", flush=True)
    print(
        f"{config_path}: layer {layer.name}, batch {config.batch_size}, crop {tuple(config.crop_size)}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPUs"
    )
    for name, r in runs.items():
        print(f"{name}: median {np.median(r['ms']):.0f} ms/step over {rounds} rounds of {per_round}")


if __name__ == "__main__":
    main()
