r"""Fast-SCNN on your own images and masks: configs/camvid.py's recipe on a dataset folder.

Run:
  python -m fastscnn_jax.main --config=configs/folder.py --config.dataset_dir=DIR --workdir=W

DIR holds `classes.json` and `train/`, `val/` (and optionally `test/`) folders of `images/` and `masks/`
(README, "Your own data"). The number of classes and the void label come from `classes.json`; the class
names and colours go into W's checkpoints, so `evaluate --workdir=W`, `predict --checkpoint=W` and `export
--checkpoint=W` need no other flag. The recipe is CamVid's (360x480 crops, 0.5-2.0x scale jitter, 500
epochs): set `crop_size` to about your images' size and `num_epochs` to your data's, e.g.
`--config.crop_size="(512,512)" --config.num_epochs=200`.
"""

from configs import camvid


def get_config():
    """Returns the configuration for a dataset folder, derived from the CamVid recipe."""
    config = camvid.get_config()
    config.dataset = "folder"
    config.dataset_dir = ""  # required: the dataset folder
    config.num_classes = 0  # 0: the number of names in classes.json
    config.ignore_label = -1  # -1: classes.json's ignore_label
    return config
