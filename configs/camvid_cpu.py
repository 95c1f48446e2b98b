r"""Fast-SCNN on CamVid: the recipe of the shipped weights, for a 2-core CPU, derived from configs/camvid.py.

Run (then `python scripts/release_weights.py --config=configs/camvid_cpu.py --workdir=runs/camvid_cpu
--checkpoint=last` releases the final state):
  python -m fastscnn_jax.main --config=configs/camvid_cpu.py --workdir=runs/camvid_cpu

Trained as the published CamVid results are: on train+val (468 images) for a fixed schedule, keeping the final
state, with no selection by an evaluation (val is then part of training and its scores measure fit only).
256x320 crops (about 0.45x the pixels of a full frame) from images rescaled 0.75-1.75x, flips and mild colour
jitter, ENet class weights, an auxiliary head, AdamW one-cycle over 20000 steps at batch 8 (342 epochs); the
final weights are released as they are (no moving average). MODEL_CARD.md gives the wall time, the hardware
and the held-out-sequence runs that chose the augmentation: the stronger 0.5-2.0x scaling and 0.4 colour
jitter of the weights released before these scored lower on an unseen street at this schedule.
"""

from configs import camvid


def get_config():
    """Returns the CPU configuration."""
    config = camvid.get_config()
    config.train_split = "train+val"
    config.crop_size = (256, 320)
    config.min_scale = 0.75
    config.max_scale = 1.75
    config.brightness = 0.25
    config.contrast = 0.25
    config.saturation = 0.25
    config.hue = 0.02
    config.ema_decay = 0.0
    config.batch_size = 8
    config.num_train_steps = 20000
    config.learning_rate = 4e-3
    config.warmup_pct = 0.05
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 1000
    return config
