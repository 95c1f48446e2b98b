r"""Exports a trained Fast-SCNN (by default the shipped CamVid weights) for serving outside JAX.

  python -m fastscnn_jax.export --format=saved_model --output=out/fastscnn_saved_model
  python -m fastscnn_jax.export --format=tflite_int8 --output=out/fastscnn_int8.tflite
  python -m fastscnn_jax.export --format=all --output=out/export --report=out/export/report.md

Formats (`FORMATS`):
  saved_model   TF SavedModel (jax2tf, batch symbolic, height and width fixed). Signatures
                `serving_default` (uint8 `images`) and `serving_float` (float32 `images`, 0..255), both
                returning float32 `logits`.
  tflite        TFLite, float32 weights and compute.
  tflite_fp16   TFLite, float16 weights (computed in float32 unless a delegate chooses float16).
  tflite_int8   TFLite, full-integer post-training quantisation (weights per channel, activations per
                tensor) calibrated on `--num_calibration` train images of the dataset; uint8 input and float32
                output stay at the edges; activations equalised first (`equalize_activations`). 97-99% argmax
                agreement with the float model (see `FLOORS`).
  tflite_int8_mixed
                TFLite, int8 like tflite_int8 except the layers whose rounding costs most agreement
                (`MIXED_FLOAT_LAYERS`: learning-to-downsample, feature fusion, classifier, final
                upsampling), which stay float32: ~99% agreement.
  tflite_dynamic
                TFLite, dynamic-range quantisation: int8 weights, float activations (quantised on the fly
                by the kernels that can). As small as int8 and >= 99% agreement, but slower on CPU.
  stablehlo     `jax.export` serialisation (batch symbolic), loadable with `jax.export.deserialize` and no
                model code; lowered for CPU, CUDA and TPU.
  onnx          ONNX, via the float32 TFLite model and tf2onnx; needs the `[onnx]` extra.
Every format is exported from the plain core (`checkpointing.load_model(..., layer="off")`): convolutions as
`lax.conv_general_dilated`, which the TFLite and ONNX converters turn into CONV_2D and DEPTHWISE_CONV_2D ops
and which every XLA backend compiles, so that a SavedModel or StableHLO file made on one machine runs well on
another; the CPU layer's forms are for this machine's XLA:CPU only. TFLite and ONNX models have batch 1.
TFLite models are run (verified) with `ai_edge_litert`'s interpreter (the `[tflite]` extra), which replaces
the deprecated `tf.lite.Interpreter`. Every model takes raw RGB uint8 NHWC images (0..255; the network
normalises inside) and returns float32 logits NHWC [B, height, width, num_classes]. Height and width are fixed
at export (`--height`, `--width`): the network's resize and pooling matrices are computed with numpy from
static shapes, so they cannot be symbolic (jax2tf with a symbolic height fails with "TypeError: '_DimExpr'
object cannot be interpreted as an integer").

Every export is verified before it is reported as written: on `--num_verify` val images of the checkpoint's
dataset (`dataset_images`: CamVid's for the shipped weights, the data a workdir was trained on otherwise)
resized to the export size, its logits are compared with the JAX model's as this machine runs it (`predict`'s
model: the backend's layer, `layer="auto"`) on max absolute error and per-pixel argmax agreement, against the
floors in `FLOORS`. A failed verification removes the file and exits with an error. Beside the model goes
`classes.json` (`CLASSES_FILE`): the class names, colours and void label the weights record, in the form of a
dataset folder's `classes.json`, for whoever turns the logits' argmax into labels.

TensorFlow is imported only by the formats that need it (SavedModel, TFLite, ONNX): the StableHLO export,
the images it is verified on included, runs without it.
"""

import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import export as jax_export
from PIL import Image

from fastscnn_jax import checkpointing, classes, cli
from fastscnn_jax.images import open_image

FORMATS = (
    "saved_model",
    "tflite",
    "tflite_fp16",
    "tflite_int8",
    "tflite_int8_mixed",
    "tflite_dynamic",
    "stablehlo",
    "onnx",
)
# Post-training int8 quantisation calibrated on train images (after `equalize_activations`).
INT8_FORMATS = ("tflite_int8", "tflite_int8_mixed")
# File or folder name of each format under an `--format=all` output folder.
FILE_NAMES = {
    "saved_model": "fastscnn_saved_model",
    "tflite": "fastscnn_float32.tflite",
    "tflite_fp16": "fastscnn_float16.tflite",
    "tflite_int8": "fastscnn_int8.tflite",
    "tflite_int8_mixed": "fastscnn_int8_mixed.tflite",
    "tflite_dynamic": "fastscnn_int8_dynamic.tflite",
    "stablehlo": "fastscnn.stablehlo",
    "onnx": "fastscnn.onnx",
}


@dataclasses.dataclass(frozen=True)
class Floor:
    """What an exported model must meet on the verification images."""

    max_abs_error: float | None  # on logits; None: not checked (quantised models), only reported
    agreement: float  # per-pixel argmax agreement with the JAX model, fraction


# Float32 formats compute the same function, to float rounding. Float16 weights move the logits a little and
# flip the pixels whose top two logits are that close. Quantised formats are held to argmax agreement below
# what they reach on CamVid val at 96x128 and 360x480 (docs/export.md), the smaller size being the harder.
# Their largest logit error is reported, not checked: it grows with the logits' range, which a longer-trained
# model widens (dynamic range: 1.7-2.0 at 360x480 for the present weights, 99.8% agreement).
FLOORS = {
    "saved_model": Floor(1e-3, 0.9999),
    "tflite": Floor(1e-3, 0.9999),
    "tflite_fp16": Floor(0.5, 0.998),
    "tflite_int8": Floor(None, 0.955),
    "tflite_int8_mixed": Floor(None, 0.975),
    "tflite_dynamic": Floor(None, 0.99),
    "stablehlo": Floor(1e-3, 0.9999),
    "onnx": Floor(1e-3, 0.9999),
}


JAX_ROW = "JAX model (jit, as predict.py runs it)"
# Written beside the exported model(s): the classes of the weights (`classes.Classes.to_json`).
CLASSES_FILE = "classes.json"


class ExportError(RuntimeError):
    """An export failed, or its verification did not meet the floor."""


@dataclasses.dataclass
class Result:
    """Verification (and optional latency) of one exported model."""

    format: str
    path: str
    size_bytes: int
    max_abs_error: float
    agreement: float
    latency_ms: float | None = None


def build_model(checkpoint: str, layer: str = "off"):
    """(apply, variables, meta) of a weights file or workdir: `apply(variables, images)` maps raw RGB
    images [B, H, W, 3] (uint8 or float, 0..255) to float32 logits [B, H, W, C].

    The model is `checkpointing.load_model`'s, by default the plain core (`layer="off"`), which every format
    is exported from; `layer="auto"` gives the model as this machine runs it, the verification's reference.
    `apply.module` is the Flax module (for `equalize_activations`).
    """
    model, variables, meta = checkpointing.load_model(checkpoint, layer)

    def fastscnn(variables, images):
        """Logits [B, H, W, C] of raw RGB images [B, H, W, 3]."""
        return model.apply(variables, images, train=False)

    fastscnn.module = model
    return fastscnn, variables, meta


def _equalization_pairs(num_blocks: int) -> list[tuple[str, list[str], list[tuple[str, str]]]]:
    """(producer, BatchNorms to scale, [(consumer kernel owner, kind)]) for `equalize_activations`.

    A producer is a module whose output is ReLU(BatchNorm(...)) (or, for the feature fusion, ReLU of a sum of
    two BatchNorms) and whose every consumer is linear in each channel of it: a depthwise convolution ('dw'),
    or a convolution ('conv'), possibly after a per-channel bilinear resize (pyramid pooling -> fusion).
    Paths are of the Flax parameters, '/'-separated; every convolution is a `Conv_0`, depthwise ones with
    kernels [3, 3, 1, C].
    """
    ltd, gfe, ff, cls = "learning_to_downsample", "global_feature_extractor", "feature_fusion", "classifier"
    conv = "Conv_0"

    def simple(producer, consumer, kind):
        """A ConvBN whose single consumer is `consumer`."""
        return (producer, [producer], [(f"{consumer}/{conv}", kind)])

    pairs = [
        simple(f"{ltd}/ConvBN_0", f"{ltd}/DSConv_0/ConvBN_0", "dw"),
        simple(f"{ltd}/DSConv_0/ConvBN_0", f"{ltd}/DSConv_0/ConvBN_1", "conv"),
        simple(f"{ltd}/DSConv_0/ConvBN_1", f"{ltd}/DSConv_1/ConvBN_0", "dw"),
        simple(f"{ltd}/DSConv_1/ConvBN_0", f"{ltd}/DSConv_1/ConvBN_1", "conv"),
        # The 1/8 features feed the global branch, the fusion and (training only) the auxiliary head.
        (
            f"{ltd}/DSConv_1/ConvBN_1",
            [f"{ltd}/DSConv_1/ConvBN_1"],
            [
                (f"{gfe}/InvertedResidual_0/ConvBN_0/{conv}", "conv"),
                (f"{ff}/ConvBN_2/{conv}", "conv"),
                (f"aux_head/ConvBN_0/{conv}", "conv"),
            ],
        ),
    ]
    for k in range(num_blocks):
        block = f"{gfe}/InvertedResidual_{k}"
        pairs += [
            simple(f"{block}/ConvBN_0", f"{block}/ConvBN_1", "dw"),
            simple(f"{block}/ConvBN_1", f"{block}/ConvBN_2", "conv"),
        ]
    pairs += [
        simple(f"{gfe}/PyramidPooling_0/ConvBN_4", f"{ff}/ConvBN_0", "dw"),  # through the 4x upsampling
        simple(f"{ff}/ConvBN_0", f"{ff}/ConvBN_1", "conv"),
        (ff, [f"{ff}/ConvBN_1", f"{ff}/ConvBN_2"], [(f"{cls}/DSConv_0/ConvBN_0/{conv}", "dw")]),
        simple(f"{cls}/DSConv_0/ConvBN_0", f"{cls}/DSConv_0/ConvBN_1", "conv"),
        simple(f"{cls}/DSConv_0/ConvBN_1", f"{cls}/DSConv_1/ConvBN_0", "dw"),
        simple(f"{cls}/DSConv_1/ConvBN_0", f"{cls}/DSConv_1/ConvBN_1", "conv"),
        (f"{cls}/DSConv_1/ConvBN_1", [f"{cls}/DSConv_1/ConvBN_1"], [(f"{cls}/{conv}", "conv")]),
    ]
    return pairs


def equalize_activations(apply, variables: dict, calibration: np.ndarray) -> dict:
    """Variables of the same function whose ReLU activations have equal per-channel ranges, for int8 export.

    TFLite quantises activations with one scale per tensor, so in a tensor whose channels have very different
    ranges the small channels get few levels. For each producer of `_equalization_pairs`, with m_c the maximum
    of its output channel c over the calibration images, the BatchNorm scale and bias of channel c are divided
    by s_c > 0 and the consumers' kernels multiplied by s_c along their input channels. Since
    ReLU(x / s) = ReLU(x) / s and the consumers are linear per channel, the network computes the same logits
    (to float rounding; a test checks it). Depthwise consumers, whose int8 weights have one scale per channel,
    take s_c = m_c / max m (every channel's range becomes the largest); convolutions, whose weights share a
    scale across input channels, take s_c = sqrt(m_c / geometric mean of m) (half the way, as in cross-layer
    equalisation, Nagel et al. 2019). Channels below 1e-3 of the largest are treated as at that floor.

    Args:
      apply: `build_model`'s function (its `module` is the Flax model).
      variables: {'params', 'batch_stats'}.
      calibration: uint8 images [N, H, W, 3] the ranges are measured on.
    """
    model = apply.module

    def channel_maxima(variables, images):
        """Per-channel maxima of every module's output."""
        _, state = model.apply(
            variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return jax.tree.map(
            lambda y: jnp.max(y.reshape(-1, y.shape[-1]), axis=0) if y.ndim == 4 else y,
            state["intermediates"],
        )

    maxima = jax.jit(channel_maxima)(variables, calibration)
    params = jax.tree.map(np.array, variables["params"])

    def node(tree, path):
        """The subtree at a '/'-separated path."""
        for key in path.split("/"):
            tree = tree[key]
        return tree

    num_blocks = sum(k.startswith("InvertedResidual_") for k in params["global_feature_extractor"])
    for producer, norms, consumers in _equalization_pairs(num_blocks):
        m = np.asarray(node(maxima, producer)["__call__"][0], np.float64)
        m = np.maximum(m, 1e-3 * m.max())
        kinds = {kind for _, kind in consumers}
        if kinds == {"dw"}:
            scale = m / m.max()
        else:
            scale = np.sqrt(m / np.exp(np.mean(np.log(m))))
        for norm in norms:
            bn = node(params, norm)["BatchNorm_0"]
            bn["scale"] = (bn["scale"] / scale).astype(np.float32)
            bn["bias"] = (bn["bias"] / scale).astype(np.float32)
        for owner, kind in consumers:
            try:
                layer = node(params, owner)
            except KeyError:
                if owner.startswith("aux_head/"):
                    continue  # weights without the auxiliary head
                raise
            # A depthwise kernel [3, 3, 1, C] takes input channel c in its output channel c.
            shape = (1, 1, 1, -1) if kind == "dw" else (1, 1, -1, 1)
            layer["kernel"] = (layer["kernel"] * scale.reshape(shape)).astype(np.float32)
    return {"params": params, "batch_stats": variables["batch_stats"]}


def bind(apply, variables):
    """`images -> logits` with the variables as constants of the function."""

    def fastscnn(images):
        """Logits [B, H, W, C] of raw RGB images [B, H, W, 3]."""
        return apply(variables, images)

    return fastscnn


def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crops an RGB image to the aspect ratio of (height, width), then resizes it (bilinear)."""
    h, w = image.shape[:2]
    if h * width > w * height:  # too tall
        crop = round(w * height / width)
        image = image[(h - crop) // 2 : (h - crop) // 2 + crop]
    elif h * width < w * height:  # too wide
        crop = round(h * width / height)
        image = image[:, (w - crop) // 2 : (w - crop) // 2 + crop]
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def find_camvid_dir(dataset_dir: str = "") -> pathlib.Path:
    """The CamVid folder the verification and calibration images are read from: `dataset_dir`, else
    $CAMVID_DIR, else `../shared/camvid` beside the checkout or the current folder.

    The places `camvid.find_camvid_dir` looks in, without importing that module (it needs TensorFlow).

    Raises:
      ExportError: a given folder that has no `train/` and `val/`, or none found.
    """
    is_camvid = lambda path: (path / "train").is_dir() and (path / "val").is_dir()
    for given, what in ((dataset_dir, "--dataset_dir"), (os.environ.get("CAMVID_DIR", ""), "$CAMVID_DIR")):
        if given:
            path = pathlib.Path(given).expanduser().resolve()
            if not is_camvid(path):
                raise ExportError(f"{what}={path} is not a CamVid folder: it needs train/ and val/")
            return path
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    for base in (repo_root, pathlib.Path.cwd()):
        path = (base.parent / "shared" / "camvid").resolve()
        if is_camvid(path):
            return path
    raise ExportError("no local CamVid folder found (--dataset_dir, $CAMVID_DIR or ../shared/camvid)")


def _fit_all(sources, count: int, height: int, width: int) -> np.ndarray:
    """Up to `count` of `sources` (paths or file objects) spread evenly over them, fitted to the size."""
    picks = np.unique(np.linspace(0, len(sources) - 1, min(count, len(sources))).round().astype(int))
    fitted = []
    for i in picks:
        with open_image(sources[i]) as image:
            fitted.append(fit_image(np.asarray(image.convert("RGB")), height, width))
    return np.stack(fitted)


def dataset_images(data: dict, split: str, count: int, height: int, width: int) -> np.ndarray:
    """Up to `count` images of `split` of the dataset checkpoint metadata records (`meta["data"]`, as
    training writes it; {} means CamVid, found as `find_camvid_dir` finds it), spread evenly over the split,
    as uint8 [n, height, width, 3]. Reads the files directly, without TensorFlow.

    Raises:
      ExportError: the data is not found, or the split has no image.
    """
    dataset, dataset_dir = data.get("dataset", "camvid"), data.get("dataset_dir", "")
    if dataset == "folder":
        root = pathlib.Path(dataset_dir)
        suffixes = (".png", ".jpg", ".jpeg")
        sources = sorted(p for p in (root / split / "images").glob("*") if p.suffix.lower() in suffixes)
    elif dataset == "cityscapes":
        archive = pathlib.Path(dataset_dir) / "leftImg8bit_trainvaltest.zip"
        if not archive.is_file():
            raise ExportError(f"{archive}: missing (the Cityscapes images the export is verified on)")
        with zipfile.ZipFile(archive) as zf:
            names = sorted(
                n for n in zf.namelist() if n.startswith(f"leftImg8bit/{split}/") and n.endswith(".png")
            )
            picks = np.unique(np.linspace(0, len(names) - 1, min(count, len(names))).round().astype(int))
            sources = [io.BytesIO(zf.read(names[i])) for i in picks] if names else []
        root = archive
    else:
        root = find_camvid_dir(dataset_dir)
        sources = sorted((root / split).glob("*.png"))
    if not sources:
        raise ExportError(f"no {split} images in {root} ({dataset}) to verify or calibrate the export on")
    return _fit_all(sources, count, height, width)


def write_classes(meta: dict, path: str) -> str:
    """Writes the weights' classes (`classes.from_meta`) as `CLASSES_FILE` in the folder of the exported
    `path`; returns the file's path."""
    folder = os.path.dirname(os.path.abspath(os.path.normpath(path)))
    target = os.path.join(folder, CLASSES_FILE)
    with open(target, "w") as f:
        json.dump(classes.from_meta(meta).to_json(), f, indent=2)
    return target


# ---------------------------------------------------------------------------------------------- exporters


def _tensorflow():
    """TensorFlow, imported only by the formats that need it (not StableHLO's); ExportError if missing."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ExportError(
            f"this format needs TensorFlow, which does not import ({e}); only stablehlo does without it"
        ) from None
    return tf


def _tf_function(fn, height: int, width: int):
    """A tf.function of the jax2tf-converted `fn` over uint8 images [1, height, width, 3]."""
    tf = _tensorflow()
    from jax.experimental import jax2tf  # needs TensorFlow

    converted = jax2tf.convert(fn, with_gradient=False)
    return tf.function(
        lambda images: {"logits": converted(images)},
        autograph=False,
        input_signature=[tf.TensorSpec([1, height, width, 3], tf.uint8, name="images")],
    )


def export_saved_model(apply, variables, path: str, height: int, width: int) -> None:
    """Writes a SavedModel with `serving_default` (uint8) and `serving_float` (float32) signatures.

    The variables are TF variables of the SavedModel (stored once, not as constants of the function); the
    uint8 signature casts to float32 and calls the float one (one converted function).
    """
    tf = _tensorflow()
    from jax.experimental import jax2tf  # needs TensorFlow

    module = tf.Module()
    module.variables_ = tf.nest.map_structure(tf.Variable, variables)
    converted = jax2tf.convert(
        apply, polymorphic_shapes=[None, f"(b, {height}, {width}, 3)"], with_gradient=False
    )
    module.serving_float = tf.function(
        lambda images: {"logits": converted(module.variables_, images)},
        autograph=False,
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="images")],
    )
    module.serving_default = tf.function(
        lambda images: module.serving_float(tf.cast(images, tf.float32)),
        autograph=False,
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")],
    )
    signatures = {
        "serving_default": module.serving_default.get_concrete_function(),
        "serving_float": module.serving_float.get_concrete_function(),
    }
    tf.saved_model.save(module, path, signatures=signatures)


def export_tflite(
    fn, path: str, height: int, width: int, quantization: str, calibration: np.ndarray | None = None
) -> None:
    """Writes a batch-1 TFLite model.

    `quantization`: 'none', 'float16', 'int8' (full integer; needs `calibration`), 'int8_mixed' (int8 but
    `MIXED_FLOAT_LAYERS` in float32; needs `calibration`) or 'dynamic' (int8 weights).
    """
    tf = _tensorflow()

    module = tf.Module()
    module.serve = _tf_function(fn, height, width)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        if calibration is None:
            raise ValueError("int8 quantisation needs calibration images")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif quantization == "int8_mixed":
        if calibration is None:
            raise ValueError("int8 quantisation needs calibration images")
        model = _quantize_mixed(converter, calibration)
    elif quantization == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization != "none":
        raise ValueError(
            f"quantization={quantization!r}: expected none, float16, int8, int8_mixed or dynamic"
        )
    if quantization != "int8_mixed":
        model = converter.convert()
    with open(path, "wb") as f:
        f.write(model)


# Layers that tflite_int8_mixed keeps in float32, as regular expressions over the names of the TFLite ops'
# outputs (which carry the Flax module path): the blocks whose int8 rounding cost the most argmax agreement
# (docs/export.md), above all learning-to-downsample, the full-resolution branch, whose rounding errors reach
# the logits twice (through the fusion and the global branch). The global feature extractor and pyramid
# pooling (most of the weights and MACs, at low resolution) stay int8.
MIXED_FLOAT_LAYERS = (
    r"FastSCNN/learning_to_downsample/",
    r"FastSCNN/feature_fusion/",
    r"FastSCNN/classifier/",
    r"FastSCNN/upsample_logits/",
)


def _quantize_mixed(converter, calibration: np.ndarray) -> bytes:
    """Int8 post-training quantisation with the ops of `MIXED_FLOAT_LAYERS` left in float32.

    TFLite's selective quantisation (`tf.lite.experimental.QuantizationDebugger` with `denylisted_nodes`):
    the node names are read off the float model; the converter adds the (de)quantise ops at the borders.
    """
    tf = _tensorflow()

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise ExportError("tflite_int8_mixed needs ai_edge_litert: pip install -e '.[tflite]'") from e

    float_model = converter.convert()
    interpreter = Interpreter(model_content=float_model)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    pattern = re.compile("|".join(MIXED_FLOAT_LAYERS))
    denylist = sorted(
        {
            names[op["outputs"][0]]
            for op in interpreter._get_ops_details()
            if pattern.search(names[op["outputs"][0]])
        }
    )
    if not denylist:
        raise ExportError(
            f"no TFLite op matches {MIXED_FLOAT_LAYERS}: were the model's module names changed?"
        )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=lambda: ([image[None]] for image in calibration[:1]),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denylist),
    )
    return debugger.get_nondebug_quantized_model()


def export_stablehlo(fn, path: str, height: int, width: int) -> None:
    """Writes `jax.export` bytes of the model, batch symbolic, for CPU, CUDA and TPU."""
    (batch,) = jax_export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, height, width, 3), np.uint8)
    exported = jax_export.export(jax.jit(fn), platforms=("cpu", "cuda", "tpu"))(spec)
    with open(path, "wb") as f:
        f.write(exported.serialize())


def export_onnx(fn, path: str, height: int, width: int) -> None:
    """Writes a batch-1 ONNX model: the float32 TFLite model converted by tf2onnx."""
    try:
        import tf2onnx
    except ImportError as e:
        raise ExportError("--format=onnx needs the onnx extra: pip install -e '.[onnx]'") from e
    with tempfile.TemporaryDirectory() as tmp:
        tflite_path = os.path.join(tmp, "model.tflite")
        export_tflite(fn, tflite_path, height, width, "none")
        tf2onnx.convert.from_tflite(tflite_path, opset=17, output_path=path)


# ------------------------------------------------------------------------------------------------ runners


def load_runner(format: str, path: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function uint8 images [B, H, W, 3] -> float32 logits [B, H, W, C] running the exported model.

    Models of batch 1 (TFLite, ONNX) are run image by image.
    """
    if format == "saved_model":
        tf = _tensorflow()

        signature = tf.saved_model.load(path).signatures["serving_default"]
        return lambda images: signature(images=tf.constant(images))["logits"].numpy()
    if format.startswith("tflite"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise ExportError("TFLite models are run with ai_edge_litert: pip install -e '.[tflite]'") from e

        interpreter = Interpreter(model_path=path)
        interpreter.allocate_tensors()
        (input_detail,) = interpreter.get_input_details()
        (output_detail,) = interpreter.get_output_details()

        def run_tflite(images):
            """Runs the interpreter on each image."""
            out = []
            for image in images:
                interpreter.set_tensor(input_detail["index"], image[None])
                interpreter.invoke()
                out.append(interpreter.get_tensor(output_detail["index"])[0])
            return np.stack(out)

        return run_tflite
    if format == "stablehlo":
        with open(path, "rb") as f:
            exported = jax_export.deserialize(bytearray(f.read()))
        call = jax.jit(exported.call)
        return lambda images: np.asarray(call(images))
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError as e:
            raise ExportError("--format=onnx needs the onnx extra: pip install -e '.[onnx]'") from e

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: np.concatenate([session.run(None, {name: image[None]})[0] for image in images])
    raise ValueError(f"unknown format {format!r}")


def size_of(path: str) -> int:
    """Bytes of a file, or of all files under a folder."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)
    return os.path.getsize(path)


def output_path(output: str, format: str, several: bool) -> str:
    """Where `format` is written: `output` itself, or `output/FILE_NAMES[format]` when exporting several
    formats or when `output` is an existing folder that is not a SavedModel (never replaced wholesale)."""
    is_saved_model = os.path.isfile(os.path.join(output, "saved_model.pb"))
    if several or (os.path.isdir(output) and not (format == "saved_model" and is_saved_model)):
        return os.path.join(output, FILE_NAMES[format])
    return output


def _remove(path: str) -> None:
    """Removes a file, or a SavedModel folder, if it exists; refuses any other folder."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ExportError(f"{path} is a folder but not a SavedModel; not replacing it")
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def measure_latencies(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]], image: np.ndarray, runs: int
) -> dict[str, float]:
    """Median wall time (ms) of each runner on one image [1, H, W, 3], after two warm-up calls each.

    The runners take turns (one call each per round), so that load from other processes hits all alike.
    """
    for run in runners.values():
        for _ in range(2):
            run(image)
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run(image)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def verify(format: str, path: str, images: np.ndarray, reference: np.ndarray) -> Result:
    """Runs the exported model on `images` and checks it against the JAX logits `reference`.

    Raises:
      ExportError: the logits' shape, max abs error or argmax agreement misses `FLOORS[format]`.
    """
    logits = load_runner(format, path)(images)
    if logits.shape != reference.shape or logits.dtype != np.float32:
        raise ExportError(
            f"{format}: logits {logits.dtype}{list(logits.shape)}, expected float32{list(reference.shape)}"
        )
    result = Result(
        format=format,
        path=path,
        size_bytes=size_of(path),
        max_abs_error=float(np.abs(logits - reference).max()),
        agreement=float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    )
    floor = FLOORS[format]
    if (floor.max_abs_error is not None and not result.max_abs_error <= floor.max_abs_error) or not (
        result.agreement >= floor.agreement
    ):
        raise ExportError(
            f"{format} export {path} failed verification on {len(images)} val images: max abs logit "
            f"error {result.max_abs_error:.3g} (limit {floor.max_abs_error}), argmax agreement "
            f"{result.agreement:.4%} (floor {floor.agreement:.2%})"
        )
    return result


def export(
    format: str,
    apply,
    variables,
    path: str,
    height: int,
    width: int,
    verify_images: np.ndarray,
    reference: np.ndarray,
    calibration: np.ndarray | None = None,
    equalize: bool = True,
) -> Result:
    """Exports `apply` with `variables` as `format` to `path` and verifies it.

    The int8 formats first equalise the variables on `calibration` (`equalize_activations`) unless `equalize`
    is False (a caller exporting several int8 formats that equalised once). On failure (of the export or its
    verification) nothing is left at `path`.
    """
    # Without calibration images export_tflite refuses the int8 formats with a clear message.
    if equalize and format in INT8_FORMATS and calibration is not None:
        variables = equalize_activations(apply, variables, calibration)
    fn = bind(apply, variables)
    _remove(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        if format == "saved_model":
            export_saved_model(apply, variables, path, height, width)
        elif format.startswith("tflite"):
            quantization = {
                "tflite": "none",
                "tflite_fp16": "float16",
                "tflite_int8": "int8",
                "tflite_int8_mixed": "int8_mixed",
                "tflite_dynamic": "dynamic",
            }[format]
            export_tflite(fn, path, height, width, quantization, calibration)
        elif format == "stablehlo":
            export_stablehlo(fn, path, height, width)
        elif format == "onnx":
            export_onnx(fn, path, height, width)
        else:
            raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)} or all")
        return verify(format, path, verify_images, reference)
    except BaseException:
        if os.path.isdir(path):
            shutil.rmtree(path)  # what this call wrote (an existing folder was refused above)
        elif os.path.exists(path):
            os.remove(path)
        raise


def report_table(
    results: list[Result], height: int, width: int, jax_latency: float | None, num_verify: int, runs: int
) -> str:
    """Markdown table of the results, with a line saying how they were measured and with what."""

    def version(package):
        """Installed version of `package`, or 'not installed'."""
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    packages = ("jax", "tensorflow-cpu", "tensorflow", "ai-edge-litert", "tf2onnx", "onnxruntime")
    versions = ", ".join(f"{p} {v}" for p in packages if (v := version(p)) != "not installed")
    lines = [
        f"Input {height}x{width}; errors and agreement vs the JAX model on {num_verify} val images; "
        f"latency: batch 1, median of {runs} runs (formats taking turns), {os.cpu_count()} CPU cores, "
        f"Python {sys.version.split()[0]}, {versions}.",
        "",
        "| format | file | size | max abs logit error | argmax agreement | CPU latency, batch 1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    if jax_latency is not None:
        lines.append(f"| {JAX_ROW} | - | - | - | - | {jax_latency:.1f} ms |")
    for r in results:
        latency = "-" if r.latency_ms is None else f"{r.latency_ms:.1f} ms"
        lines.append(
            f"| {r.format} | `{os.path.basename(r.path)}` | {r.size_bytes / 2**20:.2f} MiB | "
            f"{r.max_abs_error:.2g} | {r.agreement:.4%} | {latency} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    """Exports, verifies and reports."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    if not FLAGS.format or not FLAGS.output:
        raise app.UsageError("--format and --output are required")
    formats = list(FORMATS) if FLAGS.format == "all" else FLAGS.format.split(",")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise app.UsageError(
            f"--format={FLAGS.format}: unknown {unknown}; expected {', '.join(FORMATS)} or all"
        )
    if not os.path.exists(FLAGS.checkpoint):
        raise app.UsageError(f"--checkpoint={FLAGS.checkpoint} does not exist")
    height, width = FLAGS.height, FLAGS.width
    try:
        # Every format from the plain core; the int8 ones from its equalised variables, computed once.
        apply, variables, meta = build_model(FLAGS.checkpoint, "off")
        classes.from_meta(meta)  # Recorded classes that do not fit the model fail here, before any work.
        # The reference: the model as predict.py builds and runs it on this machine.
        jitted = jax.jit(bind(*build_model(FLAGS.checkpoint, "auto")[:2]))
    except ValueError as e:  # not a weights file, one without model settings, bad classes: named
        sys.exit(f"error: {e}")
    # The checkpoint's dataset, or the CamVid folder --dataset_dir names.
    data = (
        {"dataset": "camvid", "dataset_dir": FLAGS.dataset_dir} if FLAGS.dataset_dir else meta.get("data", {})
    )
    try:
        verify_images = dataset_images(data, "val", FLAGS.num_verify, height, width)
        calibration = None
        if set(INT8_FORMATS) & set(formats):
            calibration = dataset_images(data, "train", FLAGS.num_calibration, height, width)
    except ExportError as e:
        sys.exit(f"error: {e}")
    dataset = data.get("dataset", "camvid")
    equalized = None if calibration is None else equalize_activations(apply, variables, calibration)
    reference = np.asarray(jitted(verify_images))
    several = len(formats) > 1
    results = []
    for format in formats:
        path = output_path(FLAGS.output, format, several)
        start = time.perf_counter()
        try:
            result = export(
                format,
                apply,
                equalized if format in INT8_FORMATS else variables,
                path,
                height,
                width,
                verify_images,
                reference,
                calibration,
                equalize=False,
            )
        except ExportError as e:
            sys.exit(f"error: {e}")
        results.append(result)
        print(
            f"wrote {path}: {format}, {result.size_bytes / 2**20:.2f} MiB; verified on {len(verify_images)} "
            f"{dataset} val images at {height}x{width}: max abs logit error {result.max_abs_error:.2g}, "
            f"argmax agreement {result.agreement:.4%} ({time.perf_counter() - start:.1f} s)"
        )
    print(f"wrote {write_classes(meta, output_path(FLAGS.output, formats[0], several))}")
    if FLAGS.report:
        runners = {JAX_ROW: lambda x: np.asarray(jitted(x))}
        runners.update((r.format, load_runner(r.format, r.path)) for r in results)
        latencies = measure_latencies(runners, verify_images[:1], FLAGS.latency_runs)
        for r in results:
            r.latency_ms = latencies[r.format]
        jax_latency = latencies[JAX_ROW]
        table = report_table(results, height, width, jax_latency, len(verify_images), FLAGS.latency_runs)
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.report)), exist_ok=True)
        with open(FLAGS.report, "w") as f:
            f.write(table)
        print(table)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so the module stays importable)."""
    flags.DEFINE_string("format", None, f"One of {', '.join(FORMATS)}, a comma-separated list, or all.")
    flags.DEFINE_string(
        "output",
        None,
        "File to write (a folder for saved_model). For several formats, or an existing folder that is not a "
        "SavedModel: the folder the files go into, under their default names (FILE_NAMES).",
    )
    flags.DEFINE_string(
        "checkpoint", checkpointing.DEFAULT_WEIGHTS, "Weights file, workdir or checkpoint step folder."
    )
    flags.DEFINE_integer("height", 360, "Input height of the exported model.")
    flags.DEFINE_integer("width", 480, "Input width of the exported model.")
    flags.DEFINE_string(
        "dataset_dir",
        "",
        "CamVid folder for calibration and verification (default: the checkpoint's data, else CamVid found).",
    )
    flags.DEFINE_integer("num_verify", 8, "Val images (at most) each export is verified on.")
    flags.DEFINE_integer("num_calibration", 64, "Train images (at most) calibrating int8 quantisation.")
    flags.DEFINE_string("report", "", "Also measure CPU latency and write a Markdown table here.")
    flags.DEFINE_integer("latency_runs", 20, "Timed runs per format for --report (median reported).")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
