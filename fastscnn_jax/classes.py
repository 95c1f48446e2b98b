"""CamVid's class names, colours and void label, apart from the TFDS data module so that inference and the
metrics can use them where TensorFlow is not installed."""

import numpy as np

CLASS_NAMES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 11  # 'Unlabelled' (void): ignored in loss and metrics.
PALETTE = np.array(
    [
        [128, 128, 128],  # Sky
        [128, 0, 0],  # Building
        [192, 192, 128],  # Pole
        [128, 64, 128],  # Road
        [60, 40, 222],  # Pavement
        [128, 128, 0],  # Tree
        [192, 128, 128],  # SignSymbol
        [64, 64, 128],  # Fence
        [64, 0, 128],  # Car
        [64, 64, 0],  # Pedestrian
        [0, 128, 192],  # Bicyclist
        [0, 0, 0],  # Unlabelled
    ],
    dtype=np.uint8,
)
