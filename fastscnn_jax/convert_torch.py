r"""Imports PyTorch weights of Tramac's Fast-SCNN-pytorch into a fastscnn_jax weights file.

  python -m fastscnn_jax.convert_torch --input=fast_scnn_citys.pth --output=fastscnn_citys.msgpack
  python -m fastscnn_jax.convert_torch --input=model.pth --output=out.msgpack --num_classes=11

The input is a state dict in the layout of github.com/Tramac/Fast-SCNN-pytorch (keys
`learning_to_downsample.*`, `global_feature_extractor.*`, `feature_fusion.*`, `classifier.*`, and
`auxlayer.*` when trained with `aux=True`): the state dict itself, or a checkpoint dict holding it under
`state_dict` or `model`; a `module.` prefix (DataParallel) is stripped. It is read with
`torch.load(..., weights_only=True)` only, so a file whose pickle would run code or build other objects is
refused. The number of classes comes from `classifier.conv.1.weight`; `--num_classes` checks it.

The output is one msgpack file like the shipped weights (`checkpointing.save_weights_file`), with meta
`model = {num_classes, width: 1.0, aux_head, torch_compat: true}`: `checkpointing.load_model` builds from it
`models.FastSCNN(num_classes, torch_compat=True)`, which computes what Tramac's model computes (see
`models.FastSCNN`). Like every fastscnn_jax model it takes raw RGB 0..255 and applies the ImageNet
normalisation inside, which is what Tramac's `ToTensor` + `Normalize` does before his network.

torch is an optional dependency (`pip install 'fastscnn_jax[torch]'`), imported only when a file is read.
"""

import functools
import hashlib
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fastscnn_jax import checkpointing, cli, models

FLAGS = flags.FLAGS

# The network the imported weights are for: Tramac's layout has fixed channel counts (width 1.0).
WIDTH = 1.0
CLASSIFIER_KEY = "classifier.conv.1.weight"
_BN_OPTIONAL = "num_batches_tracked"  # an int counter, absent from state dicts of PyTorch < 0.4.1


class ConversionError(ValueError):
    """The input cannot be imported; the message names the file and the key or reason."""


def _import_torch():
    """torch, or a ConversionError saying how to install it."""
    try:  # torch is optional: imported only when a file is read
        import torch
    except ImportError as e:
        raise ConversionError(
            f"reading PyTorch weights needs torch, which is not installed ({e}): "
            "pip install 'fastscnn_jax[torch]'"
        ) from None
    return torch


# --- The key map: Tramac's state-dict names -> (collection, flax path, conversion) ----------------------


def _conv(torch_name: str, flax_path: tuple[str, ...], bias: bool = False) -> list:
    """A Conv2d [O, I/groups, kh, kw] (and its bias) -> a Flax Conv kernel [kh, kw, I/groups, O].

    Depthwise convolutions too: [C, 1, 3, 3] -> [3, 3, 1, C], an `nn.Conv` with `feature_group_count=C`.
    """
    entries = [(f"{torch_name}.weight", "params", (*flax_path, "kernel"), "conv")]
    if bias:
        entries.append((f"{torch_name}.bias", "params", (*flax_path, "bias"), "copy"))
    return entries


def _bn(torch_name: str, flax_path: tuple[str, ...]) -> list:
    """A BatchNorm2d -> Flax BatchNorm scale/bias (params) and mean/var (batch_stats)."""
    return [
        (f"{torch_name}.weight", "params", (*flax_path, "scale"), "copy"),
        (f"{torch_name}.bias", "params", (*flax_path, "bias"), "copy"),
        (f"{torch_name}.running_mean", "batch_stats", (*flax_path, "mean"), "copy"),
        (f"{torch_name}.running_var", "batch_stats", (*flax_path, "var"), "copy"),
    ]


def _conv_bn(torch_conv: str, torch_bn: str, flax_path: tuple[str, ...], bias: bool = False) -> list:
    """A conv (depthwise or not) and its BN -> a `models.ConvBN` at `flax_path`."""
    return _conv(torch_conv, (*flax_path, "Conv_0"), bias) + _bn(torch_bn, (*flax_path, "BatchNorm_0"))


def _dsconv(torch_name: str, flax_path: tuple[str, ...]) -> list:
    """Tramac's `_DSConv` (`conv.0,1` depthwise + BN, `conv.3,4` 1x1 + BN) -> a `models.DSConv`."""
    return _conv_bn(f"{torch_name}.conv.0", f"{torch_name}.conv.1", (*flax_path, "ConvBN_0")) + _conv_bn(
        f"{torch_name}.conv.3", f"{torch_name}.conv.4", (*flax_path, "ConvBN_1")
    )


def key_map(aux: bool) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(torch key, flax collection, flax path, conversion) for every tensor of Tramac's FastSCNN.

    Conversions: 'conv' transposes [O, I, kh, kw] to [kh, kw, I, O] (depthwise [C, 1, 3, 3] to
    [3, 3, 1, C]), 'copy' keeps the array. BatchNorm `num_batches_tracked` counters are not listed (ignored).
    """
    entries = []
    ltd = "learning_to_downsample"
    entries += _conv_bn(f"{ltd}.conv.conv.0", f"{ltd}.conv.conv.1", (ltd, "ConvBN_0"))
    entries += _dsconv(f"{ltd}.dsconv1", (ltd, "DSConv_0"))
    entries += _dsconv(f"{ltd}.dsconv2", (ltd, "DSConv_1"))

    gfe = "global_feature_extractor"
    for stage in range(3):
        for block in range(3):
            t = f"{gfe}.bottleneck{stage + 1}.{block}.block"
            f = (gfe, f"InvertedResidual_{3 * stage + block}")
            entries += _conv_bn(f"{t}.0.conv.0", f"{t}.0.conv.1", (*f, "ConvBN_0"))
            entries += _conv_bn(f"{t}.1.conv.0", f"{t}.1.conv.1", (*f, "ConvBN_1"))
            entries += _conv_bn(f"{t}.2", f"{t}.3", (*f, "ConvBN_2"))
    for i, name in enumerate(("conv1", "conv2", "conv3", "conv4", "out")):
        t = f"{gfe}.ppm.{name}.conv"
        entries += _conv_bn(f"{t}.0", f"{t}.1", (gfe, "PyramidPooling_0", f"ConvBN_{i}"))

    ff = "feature_fusion"
    entries += _conv_bn(f"{ff}.dwconv.conv.0", f"{ff}.dwconv.conv.1", (ff, "ConvBN_0"))
    entries += _conv_bn(f"{ff}.conv_lower_res.0", f"{ff}.conv_lower_res.1", (ff, "ConvBN_1"), bias=True)
    entries += _conv_bn(f"{ff}.conv_higher_res.0", f"{ff}.conv_higher_res.1", (ff, "ConvBN_2"), bias=True)

    entries += _dsconv("classifier.dsconv1", ("classifier", "DSConv_0"))
    entries += _dsconv("classifier.dsconv2", ("classifier", "DSConv_1"))
    entries += _conv("classifier.conv.1", ("classifier", "Conv_0"), bias=True)

    if aux:
        entries += _conv_bn("auxlayer.0", "auxlayer.1", ("aux_head", "ConvBN_0"))
        entries += _conv("auxlayer.4", ("aux_head", "Conv_0"), bias=True)
    return entries


def _to_torch_shape(flax_shape: tuple[int, ...], conversion: str) -> tuple[int, ...]:
    """The PyTorch shape of a tensor that converts to `flax_shape`."""
    if conversion == "conv":
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    return tuple(flax_shape)


def _convert(array: np.ndarray, conversion: str) -> np.ndarray:
    """A PyTorch-layout array in Flax layout, float32."""
    if conversion == "conv":
        array = array.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(array, np.float32)


@functools.lru_cache(maxsize=8)
def _flax_shapes(num_classes: int, aux: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{(collection, *path): shape} of every variable of `FastSCNN(num_classes, torch_compat=True)`."""
    model = models.FastSCNN(num_classes, width=WIDTH, aux_head=aux, torch_compat=True)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    shapes = jax.eval_shape(lambda x: model.init(rngs, x, train=True), jnp.zeros((1, 64, 64, 3)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


# --- Reading -------------------------------------------------------------------------------------------


def _summarise(keys: list[str], limit: int = 8) -> str:
    """The first `limit` keys, and how many more."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _refusal(path: str, message: str) -> str:
    """The error for a file that `torch.load(weights_only=True)` refused, from torch's message."""
    called = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    if called:
        return (
            f"{path}: refused: loading its pickle would import and call {called.group(1)}, that is run code, "
            "so it is not loaded (only tensors and plain containers are accepted: torch.load with "
            "weights_only=True). If it is a whole pickled model rather than a state dict, save "
            "model.state_dict() from a trusted copy of it instead"
        )
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Check the documentation")] or ["?"]
    return (
        f"{path}: refused: torch.load with weights_only=True cannot load it safely; it is corrupt or holds "
        f"objects other than tensors and plain containers ({lines[-1]})"
    )


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch file as numpy arrays, read with `weights_only=True` only.

    Accepts a state dict, or a dict holding one under `state_dict` or `model`; strips a `module.` prefix.

    Raises:
      ConversionError: the file is missing, is not a PyTorch file, its pickle would run code or build
        objects other than tensors and containers, or it holds no state dict.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise ConversionError(f"{path}: not a readable PyTorch file: a damaged zip archive (truncated?)")
        if not head.startswith(b"\x80"):
            raise ConversionError(
                f"{path}: not a PyTorch file (torch.save writes a zip archive; before PyTorch 1.6, a pickle)"
            )
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(_refusal(path, str(e))) from None
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError ... on corrupt files
        raise ConversionError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None

    if isinstance(obj, Mapping):
        for entry in ("state_dict", "model"):
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors, or a checkpoint "
            "dict with 'state_dict' or 'model')"
        )
    keys = [str(k) for k in obj]
    prefix = "module."
    strip = all(k.startswith(prefix) for k in keys)
    state = {}
    for key, value in obj.items():
        name = str(key)[len(prefix) :] if strip else str(key)
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        state[name] = value.to(torch.float32).numpy() if value.is_floating_point() else value.numpy()
    return state


def convert_state_dict(
    state: dict[str, np.ndarray], num_classes: int | None = None, source: str = "state dict"
) -> tuple[dict, dict]:
    """Flax variables and model settings of a Tramac FastSCNN state dict.

    Args:
      state: torch key -> numpy array (see `load_state_dict`).
      num_classes: when given, the number of classes the weights must have.
      source: the file name, for messages.

    Returns:
      ({'params', 'batch_stats'} as numpy float32, {'num_classes', 'width', 'aux_head', 'torch_compat'}).

    Raises:
      ConversionError: naming the missing, unexpected or misshapen keys, or the class-count mismatch.
    """
    aux = any(k.startswith("auxlayer.") for k in state)
    entries = key_map(aux)
    expected = {torch_key for torch_key, *_ in entries}
    bn_prefixes = {k.rsplit(".", 1)[0] for k in expected if k.endswith(".running_mean")}
    optional = {f"{p}.{_BN_OPTIONAL}" for p in bn_prefixes}

    missing = [k for k, *_ in entries if k not in state]
    unexpected = [k for k in state if k not in expected and k not in optional]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if problems:
        raise ConversionError(
            f"{source}: not a state dict of Tramac's Fast-SCNN-pytorch FastSCNN; " + "; ".join(problems)
        )

    classifier = state[CLASSIFIER_KEY]
    if classifier.ndim != 4 or classifier.shape[1:] != (128, 1, 1):
        raise ConversionError(
            f"{source}: {CLASSIFIER_KEY} has shape {tuple(classifier.shape)}, "
            "expected (num_classes, 128, 1, 1)"
        )
    found_classes = int(classifier.shape[0])
    if num_classes is not None and num_classes != found_classes:
        raise ConversionError(
            f"{source}: the weights have {found_classes} classes ({CLASSIFIER_KEY} has shape "
            f"{tuple(classifier.shape)}), but --num_classes={num_classes}"
        )

    shapes = _flax_shapes(found_classes, aux)
    mapped = {(collection, *path) for _, collection, path, _ in entries}
    if mapped != set(shapes):  # a bug in the key map, not in the input
        raise AssertionError(f"key map and model differ: {sorted(mapped ^ set(shapes))[:5]}")
    variables: dict = {"params": {}, "batch_stats": {}}
    for torch_key, collection, path, conversion in entries:
        array = state[torch_key]
        want = _to_torch_shape(shapes[(collection, *path)], conversion)
        if tuple(array.shape) != want:
            raise ConversionError(
                f"{source}: {torch_key} has shape {tuple(array.shape)}, expected {want} "
                f"(Tramac's FastSCNN with {found_classes} classes)"
            )
        if not np.all(np.isfinite(array)):
            raise ConversionError(f"{source}: {torch_key} has non-finite values")
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _convert(array, conversion)
    settings = {"num_classes": found_classes, "width": WIDTH, "aux_head": aux, "torch_compat": True}
    return variables, settings


def _sha256(path: str) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(input_path: str, output_path: str, num_classes: int | None = None) -> dict:
    """Converts a Tramac FastSCNN PyTorch file into a fastscnn_jax weights file; returns its meta."""
    state = load_state_dict(input_path)
    variables, settings = convert_state_dict(state, num_classes, source=input_path)
    meta = {
        "model": settings,
        "converted_from": {
            "file": os.path.basename(input_path),
            "sha256": _sha256(input_path),
            "layout": "Tramac/Fast-SCNN-pytorch state dict",
        },
        "input": "raw RGB 0..255; the model applies the ImageNet normalisation inside",
    }
    checkpointing.save_weights_file(output_path, variables, meta)
    return meta


def main(argv):
    """Converts --input into --output."""
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    try:
        meta = convert(FLAGS.input, FLAGS.output, FLAGS.num_classes)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    model = meta["model"]
    print(
        f"{FLAGS.input} -> {FLAGS.output}: Tramac FastSCNN, {model['num_classes']} classes, "
        f"{'with' if model['aux_head'] else 'without'} auxiliary head; checkpointing.load_model builds it as "
        f"models.FastSCNN({model['num_classes']}, torch_compat=True)"
    )


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so the module stays importable)."""
    flags.DEFINE_string("input", None, "PyTorch file: a Tramac Fast-SCNN-pytorch state dict or checkpoint.")
    flags.DEFINE_string("output", None, "Weights file to write (.msgpack), for evaluate and predict.")
    flags.DEFINE_integer(
        "num_classes", None, "Expected number of classes; default: read from classifier.conv.1.weight."
    )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
