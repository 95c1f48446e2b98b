"""Your own data (fastscnn_jax.folder): synthetic dataset folders trained, evaluated, predicted and exported
end to end with their own classes, and bad folders refused with every bad file named."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import camvid as camvid_config
from configs import folder as folder_config
from fastscnn_jax import (
    camvid,
    checkpointing,
    classes,
    datasets,
    evaluate,
    export,
    folder,
    input_pipeline,
    predict,
    steps,
    train,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER_CONFIG = os.path.join(REPO, "configs", "folder.py")
# Small, fast training: a quarter-width model without the auxiliary head (less to compile), 2 steps, crops of
# the smallest image size.
TINY_OVERRIDES = {
    "model.width": 0.25,
    "model.aux_head": False,
    "crop_size": (32, 48),
    "min_scale": 0.5,
    "max_scale": 1.0,
    "batch_size": 2,
    "eval_batch_size": 2,
    "num_train_steps": 2,
    "log_every_steps": 1,
    "eval_every_steps": 2,
    "checkpoint_every_steps": 2,
}


def _colors(n: int) -> list[list[int]]:
    """`n` distinct colours, none black (black is the default void colour) and none CamVid's."""
    return [[(37 * i + 20) % 256, (91 * i + 50) % 256, (53 * i + 200) % 256] for i in range(n)]


def make_folder_dataset(
    root: pathlib.Path,
    num_classes: int,
    ignore_label: int,
    *,
    color_masks: bool,
    sizes: dict[str, list[tuple[int, int]]],
    seed: int = 0,
) -> pathlib.Path:
    """Writes a dataset folder: `classes.json`, and for each split of `sizes` one image per size (odd ones as
    JPEG) with a mask of class blocks and a void stripe, as RGB colours or as indices.

    Returns:
      `root`.
    """
    rng = np.random.default_rng(seed)
    root = root.resolve()  # As the builder names files in its messages.
    names = [f"thing{i}" for i in range(num_classes)]
    colors = _colors(num_classes)
    root.mkdir(parents=True)
    (root / "classes.json").write_text(
        json.dumps({"names": names, "colors": colors, "ignore_label": ignore_label})
    )
    palette = np.asarray([*colors, [0, 0, 0]], np.uint8)
    for split, split_sizes in sizes.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i, (h, w) in enumerate(split_sizes):
            rows, cols = np.mgrid[:h, :w]
            mask = ((rows // 4) * 7 + (cols // 4) * 3 + i) % num_classes
            mask[:, :2] = ignore_label
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            name = f"{split}_{i:03d}"
            suffix = ".jpg" if i % 2 else ".png"
            Image.fromarray(image).save(root / split / "images" / f"{name}{suffix}")
            if color_masks:
                stored = palette[np.where(mask == ignore_label, num_classes, mask)]
            else:
                stored = mask.astype(np.uint8)
            Image.fromarray(stored).save(root / split / "masks" / f"{name}.png")
    return root


def _non_void_pixels(root: pathlib.Path, split: str, class_info: classes.Classes) -> int:
    """Pixels of a split's masks that are not void, read with PIL."""
    total = 0
    for path in sorted((root / split / "masks").glob("*.png")):
        with Image.open(path) as m:
            mask = folder.mask_indices(np.asarray(m), m.mode, class_info, path)
        total += int((mask != class_info.ignore_label).sum())
    return total


def _env() -> dict:
    """Environment of the entry points: the repository importable, the session's compilation cache."""
    return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m fastscnn_jax.<module> args...`, which must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", f"fastscnn_jax.{module}", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _format(value) -> str:
    """A config override value as the command line spells it."""
    return f"({value[0]},{value[1]})" if isinstance(value, tuple) else str(value)


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    """(dataset folder, workdir, classes) of a 3-class dataset with RGB masks and images of mixed sizes,
    trained with `python -m fastscnn_jax.main --config=configs/folder.py --config.dataset_dir=DIR`."""
    base = tmp_path_factory.mktemp("three_class")
    root = make_folder_dataset(
        base / "data",
        3,
        255,
        color_masks=True,
        sizes={"train": [(32, 48), (40, 56), (36, 36)], "val": [(32, 48), (40, 56), (32, 48)]},
    )
    workdir = base / "run"
    overrides = [f"--config.{k}={_format(v)}" for k, v in TINY_OVERRIDES.items()]
    _run(
        "main",
        f"--config={FOLDER_CONFIG}",
        f"--config.dataset_dir={root}",
        f"--config.tfds_data_dir={base / 'tfds'}",
        f"--workdir={workdir}",
        *overrides,
    )
    return root, workdir, classes.Classes.read(root / "classes.json")


def test_three_classes_train_with_their_classes_and_each_val_image_at_its_size(three_class_run):
    """Training records the dataset's classes and data in the weights, and scores val with its class names
    over exactly the non-void pixels of every val image (two sizes, so each at its own size)."""
    root, workdir, class_info = three_class_run
    _, meta = checkpointing.load_variables(str(workdir))
    assert classes.from_meta(meta) == class_info
    assert meta["model"]["num_classes"] == 3
    assert meta["data"]["dataset"] == "folder" and meta["data"]["dataset_dir"] == str(root)
    scores = json.loads((workdir / "eval_val.json").read_text())
    assert list(scores["per_class_iou"]) == ["thing0", "thing1", "thing2"]
    assert np.asarray(scores["confusion_matrix"]).sum() == _non_void_pixels(root, "val", class_info)


def test_three_classes_evaluate_predict_export_with_no_other_flag(three_class_run, tmp_path):
    """evaluate, predict and export on the workdir alone: the dataset and classes come from its weights."""
    root, workdir, class_info = three_class_run
    recorded = json.loads((workdir / "eval_val.json").read_text())
    output = tmp_path / "eval.json"
    result = _run("evaluate", f"--workdir={workdir}", f"--output={output}")
    scores = json.loads(output.read_text())
    assert np.asarray(scores["confusion_matrix"]).sum() == _non_void_pixels(root, "val", class_info)
    assert scores["miou"] == pytest.approx(recorded["miou"], abs=0.02)
    assert "thing2" in result.stdout and (tmp_path / "eval.png").is_file()

    out = tmp_path / "predicted"
    _run("predict", f"--input={root / 'val' / 'images'}", f"--output={out}", f"--checkpoint={workdir}")
    for image_path in sorted((root / "val" / "images").iterdir()):
        mask = np.asarray(Image.open(out / f"{image_path.stem}_mask.png"))
        color = np.asarray(Image.open(out / f"{image_path.stem}_color.png"))
        assert mask.shape == Image.open(image_path).size[::-1] and mask.max() < 3
        np.testing.assert_array_equal(color, class_info.palette[mask])  # its own colours, not CamVid's
    assert (out / "legend.png").is_file()

    exported = tmp_path / "export" / "model.stablehlo"
    result = _run(
        "export",
        "--format=stablehlo",
        f"--output={exported}",
        "--height=32",
        "--width=48",
        f"--checkpoint={workdir}",
    )
    assert exported.is_file() and "folder val images" in result.stdout
    written = classes.Classes.from_json(json.loads((exported.parent / export.CLASSES_FILE).read_text()))
    assert written == class_info


@pytest.fixture(scope="module")
def twenty_class_run(tmp_path_factory):
    """(dataset folder, workdir, classes) of a 20-class dataset with index masks and void 255, trained in
    this process through `train.train_and_evaluate`."""
    base = tmp_path_factory.mktemp("twenty_class")
    root = make_folder_dataset(
        base / "data", 20, 255, color_masks=False, sizes={"train": [(32, 48)] * 3, "val": [(32, 48)] * 2}
    )
    config = folder_config.get_config()
    config.dataset_dir = str(root)
    config.tfds_data_dir = str(base / "tfds")
    config.update_from_flattened_dict(TINY_OVERRIDES)
    workdir = base / "run"
    train.train_and_evaluate(config, str(workdir))
    return root, workdir, classes.Classes.read(root / "classes.json")


def test_twenty_classes_with_void_255_train_evaluate_predict_export(twenty_class_run, tmp_path):
    """Index masks with 255 as void: the loss and the scores leave 255 out; evaluate with CamVid's default
    config takes the workdir's data; predict colours with the dataset's palette; the StableHLO export gives
    the model's logits and writes the 20 classes beside it."""
    root, workdir, class_info = twenty_class_run
    config = evaluate.with_checkpoint_data(
        camvid_config.get_config(), checkpointing.load_variables(str(workdir))[1], {}
    )
    config.eval_batch_size = 2
    result = evaluate.evaluate_checkpoint(config, str(workdir), "val")
    assert list(result["per_class_iou"]) == list(class_info.names)
    assert np.asarray(result["confusion_matrix"]).sum() == _non_void_pixels(root, "val", class_info)

    segmenter = predict.Segmenter(str(workdir))
    assert segmenter.classes == class_info
    out = tmp_path / "predicted"
    assert (
        predict.predict_files(
            [str(p) for p in sorted((root / "val" / "images").iterdir())], str(out), segmenter, 2048, 0.5
        )
        == []
    )
    mask = np.asarray(Image.open(out / "val_000_mask.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "val_000_color.png")), class_info.palette[mask])

    apply, variables, meta = export.build_model(str(workdir))
    images = export.dataset_images(meta["data"], "val", 2, 32, 48)
    assert images.shape == (2, 32, 48, 3)
    reference = np.asarray(jax.jit(export.bind(apply, variables))(images))
    path = str(tmp_path / "fastscnn.stablehlo")
    verified = export.export("stablehlo", apply, variables, path, 32, 48, images, reference)
    assert verified.agreement >= 0.9999 and reference.shape == (2, 32, 48, 20)
    written = json.loads(pathlib.Path(export.write_classes(meta, path)).read_text())
    assert written["names"] == list(class_info.names) and written["ignore_label"] == 255


def test_eval_batches_group_images_by_size(tmp_path):
    """Mixed sizes: each batch holds one size, every example once, at its own size, void kept as 255."""
    root = make_folder_dataset(
        tmp_path / "data",
        3,
        255,
        color_masks=False,
        sizes={"train": [(32, 48)], "val": [(32, 48), (32, 48), (40, 24), (32, 48), (40, 24), (40, 24)]},
    )
    builder = folder.get_builder(str(root), str(tmp_path / "tfds"))
    batches = list(input_pipeline.eval_batches(builder, "val", 2))
    # File-name order: sizes A A B A B B -> [A A] [B -] [A -] [B B].
    assert [b["image"].shape[1:3] for b in batches] == [(32, 48), (40, 24), (32, 48), (40, 24)]
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, False], [True, False], [True, True]]
    labels = [label for b in batches for label, real in zip(b["label"], b["mask"], strict=True) if real]
    for i, label in enumerate(labels):
        expected = np.asarray(Image.open(root / "val" / "masks" / f"val_{i:03d}.png"))
        np.testing.assert_array_equal(label, expected)
    # Two processes: the same number of batches, each step of one shape on both, every example once.
    shards = [list(input_pipeline.eval_batches(builder, "val", 1, p, 2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    for a, b in zip(*shards, strict=True):
        assert a["image"].shape == b["image"].shape
    assert sum(int(b["mask"].sum()) for shard in shards for b in shard) == 6


# ------------------------------------------------------------------------------------------------ bad input


def _good(tmp_path, name="data", **kwargs) -> pathlib.Path:
    """A valid 3-class folder with RGB masks."""
    return make_folder_dataset(
        tmp_path / name,
        3,
        255,
        color_masks=True,
        sizes={"train": [(16, 16)] * 2, "val": [(16, 16)]},
        **kwargs,
    )


def _prepare_error(root: pathlib.Path, tmp_path) -> str:
    """The DatasetError message of preparing `root`."""
    with pytest.raises(camvid.DatasetError) as info:
        folder.get_builder(str(root), str(tmp_path / "tfds"))
    return str(info.value)


def test_missing_classes_json_is_named(tmp_path):
    """Without classes.json the error names the file and what it must hold."""
    root = _good(tmp_path)
    (root / "classes.json").unlink()
    message = _prepare_error(root, tmp_path)
    assert f"{root / 'classes.json'}: missing" in message and '"names"' in message


def test_every_bad_file_is_named_at_once(tmp_path):
    """A colour not in the palette, an image without a mask and an index mask value that is neither a class
    nor void, in three files: one error names each file, the colour and the value."""
    root = _good(tmp_path)
    # A colour not in the palette, at row 5, column 7 of a train mask.
    colour_mask = root / "train" / "masks" / "train_000.png"
    rgb = np.asarray(Image.open(colour_mask)).copy()
    rgb[5, 7] = (1, 2, 3)
    Image.fromarray(rgb).save(colour_mask)
    # An image without a mask.
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "val" / "images" / "lonely.png")
    # An index mask with the value 7 (3 classes, void 255).
    index_mask = root / "train" / "masks" / "train_001.png"
    values = np.zeros((16, 16), np.uint8)
    values[3, 3] = 7
    values[4, 4] = 255
    Image.fromarray(values).save(index_mask)
    message = _prepare_error(root, tmp_path)
    assert "(3 problem(s))" in message
    assert f"{colour_mask}: mask colours not in classes.json: (1, 2, 3) (first at row 5, column 7)" in message
    assert f"{root / 'val' / 'images' / 'lonely.png'}: image has no mask" in message
    assert f"{index_mask}: mask values [7] are neither classes 0..2 nor the ignore label 255" in message


@pytest.mark.parametrize(
    "content,expected",
    [
        ({"names": ["a", "b"], "colors": [[1, 2, 3]], "ignore_label": 255}, "2 names but 1 colors"),
        ({"names": ["a", "b"], "colors": [[1, 2, 3], [1, 2, 3]], "ignore_label": 255}, "repeats a colour"),
        ({"names": ["a", "b"], "colors": [[1, 2, 3], [4, 5, 6]], "ignore_label": 1}, "index of class 'b'"),
        ({"names": ["a"], "colors": [[1, 2, 300]], "ignore_label": 255}, "values 0..255"),
        ({"names": ["a"], "colors": [[1, 2, 3]]}, 'missing "ignore_label"'),
    ],
)
def test_bad_classes_json_is_named(tmp_path, content, expected):
    """A malformed classes.json is refused, naming the file and the problem."""
    root = _good(tmp_path)
    (root / "classes.json").write_text(json.dumps(content))
    message = _prepare_error(root, tmp_path)
    assert str(root / "classes.json") in message and expected in message


def test_classes_of_weights_without_them():
    """Weights that record no classes (those released before classes travelled with them): CamVid's for 11
    outputs, numbered otherwise."""
    assert classes.from_meta({"model": {"num_classes": 11}}) == classes.CAMVID
    numbered = classes.from_meta({"model": {"num_classes": 19}})
    assert numbered.names[18] == "class 18" and len(set(numbered.colors)) == 19
    with pytest.raises(classes.ClassesError, match="lists 11 classes but the model has 19"):
        classes.from_meta({"model": {"num_classes": 19}, "classes": classes.CAMVID.to_json()})


def test_num_classes_and_ignore_label_come_from_classes_json(tmp_path):
    """configs/folder.py's 0 and -1 take classes.json's values; a config that says otherwise is refused,
    naming both numbers."""
    root = _good(tmp_path)
    config = folder_config.get_config()
    config.dataset_dir = str(root)
    resolved, found = datasets.resolve(config)
    assert (resolved.num_classes, resolved.ignore_label) == (3, 255) and found.names[2] == "thing2"
    config.num_classes = 5
    with pytest.raises(steps.ConfigError, match="config.num_classes=5 but the data has 3 classes"):
        datasets.resolve(config)


def test_checkpoint_data_fills_what_the_command_line_leaves():
    """evaluate without --config: the checkpoint's data settings, except keys overridden on the command line;
    the classes then come from that data. Weights without data settings leave the config as it is."""
    config = camvid_config.get_config()
    config.tfds_data_dir = "/mine"  # as `--config.tfds_data_dir=/mine` leaves it
    meta = {"data": {"dataset": "folder", "dataset_dir": "/data", "tfds_data_dir": "/theirs"}}
    filled = evaluate.with_checkpoint_data(config, meta, {"tfds_data_dir": "/mine"})
    assert (filled.dataset, filled.dataset_dir, filled.tfds_data_dir) == ("folder", "/data", "/mine")
    assert (filled.num_classes, filled.ignore_label) == (0, -1)
    assert config.dataset == "camvid"  # the caller's config is not changed
    assert evaluate.with_checkpoint_data(config, {"model": {}}, {}) is config
