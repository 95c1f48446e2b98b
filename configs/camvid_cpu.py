r"""Fast-SCNN on CamVid: the recipe sized for a 2-core CPU, derived from configs/camvid.py.

Run:
  python -m fastscnn_jax.main --config=configs/camvid_cpu.py --workdir=runs/camvid_cpu

256x320 crops (about 0.45x the pixels of a full frame) from images rescaled by 0.75-1.75x, flips and colour
jitter, ENet class weights, an auxiliary head, AdamW one-cycle over 8000 steps at batch 8 (174 epochs).
The shipped weights came from it: 103 minutes on a 2-core AMD EPYC VM, the best of 16 val evaluations
(step 6500), val mIoU 0.6086 and test mIoU 0.474 (MODEL_CARD.md; val shares a sequence with train and
flatters the model). That run augmented in tf.data; with the augmentation in the train step a step takes
3-6% less, so about 100 minutes (benchmarks/README.md).
"""

from configs import camvid


def get_config():
    """Returns the CPU configuration."""
    config = camvid.get_config()
    config.crop_size = (256, 320)
    config.min_scale = 0.75
    config.max_scale = 1.75
    config.batch_size = 8
    config.num_train_steps = 8000
    config.learning_rate = 4e-3
    config.warmup_pct = 0.05
    config.log_every_steps = 100
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 250
    return config
