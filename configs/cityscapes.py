r"""Fast-SCNN on Cityscapes (fine annotations, 19 classes): the paper's recipe, meant for a GPU or TPU.

Run:
  python -m fastscnn_jax.main --config=configs/cityscapes.py --config.dataset_dir=DIR \
    --workdir=runs/cityscapes

DIR holds `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` as downloaded (README, "Your own
data"). The recipe of Poudel et al. 2019: 1024x2048 images rescaled by 0.5-2.0x, cropped (1024x1024, which the
paper does not state) and flipped, with colour jitter; SGD with momentum 0.9, learning rate 0.045 on a poly
schedule (power 0.9), batch 12, 1000 epochs (247k steps); weight decay 4e-5 (on every kernel: the paper
exempts depthwise ones); an auxiliary loss at weight 0.4 (the paper has two). Evaluation on val is at full
1024x2048. Not run; an estimate from the paper's 123.5 frames/s of inference at 1024x2048 on a Titan Xp: a
step (12 half-frame crops, forward and backward) takes about 0.15 s on such a GPU, so the run takes about 10
hours, less on a current GPU. The train split is decoded once into host memory (2975 x 1024 x 2048 x 4 bytes,
about 25 GB), and the augmentation runs in the train step, so the host needs that much RAM but little CPU.
The paper reports 68.0% mIoU on the Cityscapes test set.
"""

from configs import camvid


def get_config():
    """Returns the Cityscapes configuration, derived from the CamVid recipe."""
    config = camvid.get_config()
    config.dataset = "cityscapes"
    config.dataset_dir = ""  # required: the folder holding the two archives
    config.num_classes = 19
    config.ignore_label = 255
    config.crop_size = (1024, 1024)
    config.min_scale = 0.5
    config.max_scale = 2.0

    config.class_weighting = "none"
    config.aux_loss_weight = 0.4

    config.optimizer = "sgd"
    config.lr_schedule = "poly"
    config.learning_rate = 0.045
    config.momentum = 0.9
    config.poly_power = 0.9
    config.weight_decay = 4e-5
    config.grad_clip_norm = 10.0  # a guard against rare spikes; the paper does not clip
    config.batch_size = 12
    config.eval_batch_size = 4
    config.num_epochs = 1000

    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 1000
    return config
