"""Class names, colours and void label of a dataset, apart from the TFDS data modules so that inference, the
metrics and the exports can use them where TensorFlow is not installed.

A `Classes` travels with the weights: training writes `to_json()` into the checkpoint metadata
(`meta["classes"]`) and every entry point reads it back with `from_meta`. Weights without it (the shipped
CamVid weights, imported PyTorch weights) are CamVid's.
"""

from __future__ import annotations

import dataclasses
import json
import os

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


class ClassesError(ValueError):
    """A `classes.json` (or class metadata) that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Classes:
    """The classes of a dataset: `names[i]` and `colors[i]` are class i's; `ignore_label` marks void pixels,
    drawn in `ignore_color` (a mask colour, when masks are RGB)."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_label: int
    ignore_color: tuple[int, int, int] = (0, 0, 0)

    @property
    def num_classes(self) -> int:
        """Number of real classes."""
        return len(self.names)

    @property
    def palette(self) -> np.ndarray:
        """uint8 [num_classes, 3] colours, for indexing with a class mask."""
        return np.asarray(self.colors, np.uint8).reshape(-1, 3)

    def to_json(self) -> dict:
        """The `classes.json` form, as checkpoint metadata stores it."""
        return {
            "names": list(self.names),
            "colors": [list(c) for c in self.colors],
            "ignore_label": self.ignore_label,
            "ignore_color": list(self.ignore_color),
        }

    @classmethod
    def from_json(cls, data, where: str = "classes") -> Classes:
        """Parses and checks the `classes.json` form.

        Args:
          data: {"names": [...], "colors": [[r, g, b], ...], "ignore_label": int, optional "ignore_color":
            [r, g, b] (the colour of void pixels in RGB masks; default black)}.
          where: what to name in errors (the file).

        Raises:
          ClassesError: listing every problem: missing keys, names and colours of different lengths,
            repeated names or colours, colours that are not three 0..255 integers, an ignore_label outside
            0..255 or naming a class.
        """
        if not isinstance(data, dict):
            raise ClassesError(f"{where}: expected a JSON object with names, colors and ignore_label")
        problems = [f'missing "{k}"' for k in ("names", "colors", "ignore_label") if k not in data]
        if problems:
            raise ClassesError(f"{where}: {'; '.join(problems)}")
        names, colors, ignore = data["names"], data["colors"], data["ignore_label"]
        ignore_color = data.get("ignore_color", [0, 0, 0])
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            problems.append('"names" must be a non-empty list of non-empty strings')
        elif len(set(names)) != len(names):
            problems.append(f'"names" repeats {sorted({n for n in names if names.count(n) > 1})}')

        def is_color(c) -> bool:
            """Whether `c` is [r, g, b] of 0..255 integers."""
            return (
                isinstance(c, list | tuple)
                and len(c) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
            )

        if not isinstance(colors, list) or not all(is_color(c) for c in colors):
            problems.append('"colors" must be a list of [r, g, b] with values 0..255')
        elif isinstance(names, list) and len(colors) != len(names):
            problems.append(f"{len(names)} names but {len(colors)} colors")
        elif len({tuple(c) for c in colors}) != len(colors):
            problems.append('"colors" repeats a colour: masks in colours could not be read')
        if not is_color(ignore_color):
            problems.append('"ignore_color" must be [r, g, b] with values 0..255')
        elif isinstance(colors, list) and tuple(ignore_color) in {tuple(c) for c in colors if is_color(c)}:
            problems.append(f'"ignore_color" {list(ignore_color)} is also a class colour')
        if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 255:
            problems.append(f'"ignore_label" must be an integer 0..255 (masks are 8-bit), got {ignore!r}')
        elif isinstance(names, list) and ignore < len(names):
            problems.append(f'"ignore_label" {ignore} is the index of class {names[ignore]!r}')
        elif isinstance(names, list) and len(names) > 255:
            problems.append(f"{len(names)} classes: 8-bit masks hold at most 255 besides the void label")
        if problems:
            raise ClassesError(f"{where}: {'; '.join(problems)}")
        return cls(
            names=tuple(names),
            colors=tuple(tuple(c) for c in colors),
            ignore_label=ignore,
            ignore_color=tuple(ignore_color),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> Classes:
        """Reads a `classes.json` file.

        Raises:
          ClassesError: a missing or unreadable file, invalid JSON or content (see `from_json`), naming it.
        """
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ClassesError(
                f'{path}: missing; it lists the classes: {{"names": [...], "colors": [[r, g, b], ...], '
                '"ignore_label": 255}'
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ClassesError(f"{path}: not readable JSON ({e})") from None
        return cls.from_json(data, str(path))


CAMVID = Classes(
    names=CLASS_NAMES,
    colors=tuple(tuple(int(v) for v in c) for c in PALETTE[:NUM_CLASSES]),
    ignore_label=IGNORE_LABEL,
    ignore_color=tuple(int(v) for v in PALETTE[IGNORE_LABEL]),
)

# Cityscapes' 19 evaluation classes (train IDs 0..18) and their official colours (cityscapesScripts'
# labels.py); every other label ID is void, 255.
CITYSCAPES = Classes(
    names=(
        "road",
        "sidewalk",
        "building",
        "wall",
        "fence",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ),
    colors=(
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ),
    ignore_label=255,
)


def numbered(num_classes: int) -> Classes:
    """Classes named by number ('class 0', ...) in distinct colours: for weights that do not say."""
    # Golden-ratio hues: neighbouring classes get far-apart colours, however many there are.
    hues = (np.arange(num_classes) * 0.618034) % 1.0
    rgb = np.abs(((hues[:, None] * 6.0 + np.array([0.0, 4.0, 2.0])) % 6.0) - 3.0) - 1.0
    colors = np.round(np.clip(rgb, 0.0, 1.0) * 200.0 + 30.0).astype(int)
    return Classes(
        names=tuple(f"class {i}" for i in range(num_classes)),
        colors=tuple(tuple(int(v) for v in c) for c in colors),
        ignore_label=255,
    )


def from_meta(meta: dict) -> Classes:
    """The classes checkpoint metadata records (`meta["classes"]`).

    Weights without them are CamVid's when they have CamVid's number of classes (the shipped weights,
    CamVid weights imported from PyTorch), else numbered (`numbered`).

    Raises:
      ClassesError: recorded classes that are malformed, or whose number differs from the model's.
    """
    meta = meta if isinstance(meta, dict) else {}
    num_classes = (meta.get("model") or {}).get("num_classes", NUM_CLASSES)
    data = meta.get("classes")
    if data is None:
        return CAMVID if num_classes == NUM_CLASSES else numbered(num_classes)
    found = Classes.from_json(data, "checkpoint metadata 'classes'")
    if found.num_classes != num_classes:
        raise ClassesError(
            f"checkpoint metadata lists {found.num_classes} classes but the model has {num_classes} outputs"
        )
    return found
