r"""A tiny, fast variant of configs/camvid.py for tests and smoke runs (about a minute on a laptop CPU).

  python -m fastscnn_jax.main --config=configs/tiny.py --workdir=runs/tiny

Quarter-width network, 64x96 crops, ten steps. It checks that the whole path works; its mIoU means nothing.
"""

from configs import camvid


def get_config():
    """Returns the tiny configuration, derived from the full recipe."""
    config = camvid.get_config()
    config.model.width = 0.25
    config.crop_size = (64, 96)
    config.min_scale = 0.25
    config.max_scale = 0.5
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_train_steps = 10
    config.log_every_steps = 2
    config.eval_every_steps = 10
    config.checkpoint_every_steps = 2
    return config
