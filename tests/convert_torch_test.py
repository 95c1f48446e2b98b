"""Tests of `python -m fastscnn_jax.convert_torch`: Tramac's Fast-SCNN-pytorch weights into fastscnn_jax.

A randomly initialised `torch_reference.TramacFastSCNN` (his network, his state-dict keys) with realistic,
then perturbed, BatchNorm running statistics is saved, converted by the real command, loaded back the way
`predict` and `evaluate` load weights, and its logits compared with PyTorch's at 384x480. Malicious pickles,
bad keys, wrong class counts and a missing torch install are refused with messages naming the file or key.
"""

import hashlib
import math
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # an optional dependency (the `torch` extra)

import torch.nn.functional as F  # noqa: E402

from fastscnn_jax import checkpointing, convert_torch, models  # noqa: E402
from fastscnn_jax.torch_reference import TramacFastSCNN  # noqa: E402
from tests.conftest import non_void_pixels  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 11
SIZE = (384, 480)  # Tramac's network needs multiples of 32


def _run_cli(*args):
    """Runs `python -m fastscnn_jax.convert_torch` from the repository root."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "fastscnn_jax.convert_torch", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _random_tramac(num_classes: int, aux: bool, seed: int = 0) -> TramacFastSCNN:
    """Tramac's FastSCNN in eval mode with random weights and non-trivial BN running statistics.

    Convolutions get He-normal weights (random biases where the port has them). The running statistics are
    first measured on random images (so activations keep a sensible scale), then perturbed at random, and
    the BN affine parameters are random too, so that every statistic matters.
    """
    torch.manual_seed(seed)
    model = TramacFastSCNN(num_classes, aux=aux)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()), generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(2, 3, 128, 160, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                std = m.running_var.sqrt()
                m.running_mean.add_(0.2 * std * torch.randn(m.num_features, generator=g))
                m.running_var.mul_(torch.empty(m.num_features).uniform_(0.5, 2.0, generator=g))
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.momentum = 0.1
    return model.eval()


def _normalise(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float, as Tramac's demo feeds his network (ToTensor, then ImageNet Normalize)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def tramac():
    """Tramac's model for CamVid's 11 classes, with the auxiliary layer, randomly initialised."""
    return _random_tramac(NUM_CLASSES, aux=True)


@pytest.fixture(scope="module")
def saved(tramac, tmp_path_factory):
    """Path of `tramac`'s state dict, saved with torch.save."""
    path = tmp_path_factory.mktemp("torch") / "fast_scnn_camvid.pth"
    torch.save(tramac.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
    """(completed CLI process, output path) of converting `saved`."""
    output = tmp_path_factory.mktemp("jax") / "imported.msgpack"
    result = _run_cli(f"--input={saved}", f"--output={output}", f"--num_classes={NUM_CLASSES}")
    return result, output


def test_cli_import_reproduces_tramac_logits(tramac, saved, converted):
    """The converted file, loaded as predict/evaluate load weights, gives Tramac's logits at 384x480."""
    result, output = converted
    assert result.returncode == 0, result.stderr[-4000:]
    assert "11 classes" in result.stdout and "torch_compat=True" in result.stdout

    model, variables, meta = checkpointing.load_model(str(output))  # what predict and evaluate call
    settings = meta["model"]
    assert settings == {"num_classes": 11, "width": 1.0, "aux_head": True, "torch_compat": True}
    assert (model.num_classes, model.width, model.aux_head, model.torch_compat) == (11, 1.0, True, True)
    assert meta["converted_from"]["sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert set(variables) == {"params", "batch_stats"}
    # Depthwise kernels as the grouped nn.Conv's: [3, 3, 1, C] from torch's [C, 1, 3, 3].
    depthwise = variables["params"]["learning_to_downsample"]["DSConv_0"]["ConvBN_0"]["Conv_0"]["kernel"]
    torch_depthwise = tramac.state_dict()["learning_to_downsample.dsconv1.conv.0.weight"].numpy()
    assert depthwise.shape == (3, 3, 1, 32) and torch_depthwise.shape == (32, 1, 3, 3)
    np.testing.assert_array_equal(depthwise, torch_depthwise.transpose(2, 3, 1, 0))

    images = np.random.default_rng(0).integers(0, 256, (2, *SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        reference, _ = tramac(_normalise(images))
    reference = reference.permute(0, 2, 3, 1).numpy()
    logits = np.asarray(jax.jit(model.apply)(variables, images))  # raw uint8 in, as predict feeds it

    scale = float(np.abs(reference).max())
    max_diff = float(np.abs(logits - reference).max())
    print(f"logit scale {scale:.3f}, max abs difference {max_diff:.3g} ({max_diff / scale:.2g} relative)")
    assert 1.0 < scale < 1e3  # a meaningful comparison: neither vanishing nor exploding logits
    assert max_diff <= 1e-4 * scale
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() > 0.999

    # The auxiliary head (used only when training here) maps too: same outputs on the 1/8 features.
    with torch.no_grad():
        high = tramac.learning_to_downsample(_normalise(images[:1]))
        aux_reference = tramac.auxlayer(high).permute(0, 2, 3, 1).numpy()
    aux_variables = {collection: variables[collection]["aux_head"] for collection in variables}
    aux = models.AuxHead(NUM_CLASSES).apply(aux_variables, high.permute(0, 2, 3, 1).numpy(), train=False)
    np.testing.assert_allclose(aux, aux_reference, atol=1e-4 * float(np.abs(aux_reference).max()), rtol=0)

    # The default network (this project's conventions) is a different function of the same weights.
    default = np.asarray(jax.jit(models.FastSCNN(NUM_CLASSES).apply)(variables, images[:1]))
    assert np.abs(default - reference[:1]).max() > 0.1 * scale


def test_checkpoint_dicts_and_dataparallel_prefix(tramac, converted, tmp_path):
    """{'state_dict': ...} with `module.` keys and {'model': ...} import to the same variables."""
    _, output = converted
    expected, _ = checkpointing.load_variables(str(output))
    state = tramac.state_dict()
    wrapped = {
        "parallel.pth": {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}},
        "model.pth": {"model": state, "optimizer": {"lr": 0.01}},
    }
    for name, checkpoint in wrapped.items():
        torch.save(checkpoint, tmp_path / name)
        meta = convert_torch.convert(str(tmp_path / name), str(tmp_path / f"{name}.msgpack"))
        assert meta["model"]["num_classes"] == NUM_CLASSES
        variables, _ = checkpointing.load_variables(str(tmp_path / f"{name}.msgpack"))
        assert jax.tree.structure(variables) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)


def test_state_dict_without_aux_layer(tramac):
    """Weights of a model trained without `aux` import without the auxiliary head."""
    state = {k: v for k, v in _state(tramac).items() if not k.startswith("auxlayer.")}
    variables, settings = convert_torch.convert_state_dict(state)
    assert settings == {"num_classes": 11, "width": 1.0, "aux_head": False, "torch_compat": True}
    assert "aux_head" not in variables["params"] and "aux_head" not in variables["batch_stats"]
    assert "classifier" in variables["params"]


class _Payload:
    """Unpickling this runs code: it writes `marker`. A stand-in for a malicious checkpoint."""

    def __init__(self, marker: str):
        """Remembers the file the payload writes."""
        self.marker = marker

    def __reduce__(self):
        """Tells pickle to rebuild the object by calling exec on code that writes the marker file."""
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _write_malicious(path, marker, form: str) -> None:
    """A .pth whose state dict holds the payload: torch.save's zip form, or a bare pickle."""
    checkpoint = {"state_dict": {"classifier.conv.1.weight": _Payload(str(marker))}}
    if form == "zip":
        torch.save(checkpoint, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(checkpoint, f, protocol=2)


def test_malicious_pickle_is_refused_by_the_command(tmp_path):
    """The command refuses a code-running torch.save file, naming it; the payload never runs."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    _write_malicious(path, marker, "zip")
    result = _run_cli(f"--input={path}", f"--output={tmp_path / 'out.msgpack'}")
    assert result.returncode != 0
    assert f"error: {path}: refused: loading its pickle would import and call exec" in result.stderr, (
        result.stderr
    )
    assert not marker.exists()
    assert not (tmp_path / "out.msgpack").exists()

    # The payload is real: unpickling the same file unsafely does run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_malicious_bare_pickle_is_refused(tmp_path):
    """A bare pickle (torch's legacy form) with the payload is refused too, naming the file."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil_legacy.pth"
    _write_malicious(path, marker, "pickle")
    with pytest.raises(
        convert_torch.ConversionError, match=f"{path}: refused: .* call exec, that is run code"
    ):
        convert_torch.convert(str(path), str(tmp_path / "out.msgpack"))
    assert not marker.exists()
    with open(path, "rb") as f:
        pickle.load(f)  # the control: an unsafe load does run the payload
    assert marker.exists()


def _state(tramac) -> dict[str, np.ndarray]:
    """Tramac's state dict as the converter reads it: numpy arrays."""
    return {k: v.numpy() for k, v in tramac.state_dict().items()}


@pytest.mark.parametrize(
    "edit,num_classes,message",
    [
        (lambda s: s.pop("feature_fusion.conv_lower_res.0.bias"), None, "missing keys: feature_fusion"),
        (lambda s: s.pop("auxlayer.4.bias"), None, r"missing keys: auxlayer\.4\.bias"),
        (
            lambda s: s.update({"classifier.conv.2.weight": np.zeros((11, 128, 1, 1))}),
            None,
            r"unexpected keys: classifier\.conv\.2\.weight",
        ),
        (
            lambda s: s.update(
                {"global_feature_extractor.bottleneck2.0.block.2.weight": np.zeros((95, 384, 1, 1))}
            ),
            None,
            r"global_feature_extractor\.bottleneck2\.0\.block\.2\.weight has shape \(95, 384, 1, 1\), "
            r"expected \(96, 384, 1, 1\)",
        ),
        (lambda s: s.update({"auxlayer.4.bias": np.zeros(19)}), None, r"auxlayer\.4\.bias has shape \(19,\)"),
        (lambda s: None, 19, r"11 classes \(classifier\.conv\.1\.weight has shape \(11, 128, 1, 1\)\).*=19"),
    ],
    ids=["missing", "missing-aux", "unexpected", "shape", "aux-classes", "num-classes"],
)
def test_bad_state_dicts_name_the_key(tramac, edit, num_classes, message):
    """Missing, unexpected and misshapen keys and a wrong class count are refused, naming the key."""
    state = _state(tramac)
    edit(state)
    with pytest.raises(convert_torch.ConversionError, match=message):
        convert_torch.convert_state_dict(state, num_classes, source="x.pth")


def test_bad_key_in_a_file_is_refused(tramac, tmp_path):
    """Converting a readable file with a missing key names the file and the key, and writes nothing."""
    state = tramac.state_dict()
    del state["classifier.dsconv2.conv.3.weight"]
    torch.save(state, tmp_path / "broken.pth")
    convert_torch.load_state_dict(str(tmp_path / "broken.pth"))  # a readable file
    with pytest.raises(
        convert_torch.ConversionError, match=r"broken\.pth.*missing keys: classifier\.dsconv2"
    ):
        convert_torch.convert(str(tmp_path / "broken.pth"), str(tmp_path / "out.msgpack"))
    assert not (tmp_path / "out.msgpack").exists()


def test_files_that_are_not_state_dicts(saved, tmp_path):
    """Other files, pickled models, non-dict contents and non-tensor entries are refused, naming the file."""
    (tmp_path / "text.pth").write_text("not a checkpoint")
    (tmp_path / "truncated.pth").write_bytes(saved.read_bytes()[:5000])
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02garbage")
    torch.save(TramacFastSCNN(2), tmp_path / "whole_model.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({"classifier.conv.1.weight": 3}, tmp_path / "int.pth")
    cases = {
        "text.pth": "not a PyTorch file",
        "truncated.pth": "not a readable PyTorch file",
        "corrupt.pth": "refused: torch.load with weights_only=True cannot load it safely; it is corrupt",
        "whole_model.pth": r"refused: loading its pickle would import and call .*model\.state_dict\(\)",
        "list.pth": "holds a list, not a state dict",
        "int.pth": "entry 'classifier.conv.1.weight' is a int, not a tensor",
        "absent.pth": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(convert_torch.ConversionError, match=f"{tmp_path / name}: {message}"):
            convert_torch.load_state_dict(str(tmp_path / name))


def test_torch_is_optional(saved, monkeypatch):
    """Importing the converter does not import torch; without torch it says how to install it."""
    check = "import sys, fastscnn_jax.convert_torch; assert 'torch' not in sys.modules"
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True
    )
    assert result.returncode == 0, result.stderr
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(convert_torch.ConversionError, match=r"pip install 'fastscnn_jax\[torch\]'"):
        convert_torch.load_state_dict(str(saved))


@pytest.mark.parametrize(
    "src,dst", [((12, 15), (48, 60)), ((1, 1), (5, 4)), ((6, 7), (1, 3)), ((23, 31), (7, 9))]
)
def test_resize_align_corners_equals_pytorch(src, dst):
    """`resize_bilinear(..., align_corners=True)` equals F.interpolate(bilinear, align_corners=True)."""
    x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), dst, mode="bilinear", align_corners=True
    )
    out = models.resize_bilinear(x, dst, align_corners=True)
    np.testing.assert_allclose(out, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_predict_and_evaluate_build_the_imported_network(tramac, converted, small_camvid):
    """predict's Segmenter and evaluate follow the file's model settings (torch_compat), not the defaults."""
    from configs import tiny
    from fastscnn_jax import evaluate, predict

    _, output = converted
    image = np.random.default_rng(1).integers(0, 256, (1, *SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        reference, _ = tramac(_normalise(image))
    expected = reference.argmax(1)[0].numpy()
    mask = predict.Segmenter(str(output))(image[0], max_side=max(SIZE))
    assert (mask == expected).mean() > 0.999

    config = tiny.get_config()
    config.dataset_dir, config.tfds_data_dir = map(str, small_camvid)
    # tiny's width is 0.25: evaluate must take width and torch_compat from the file.
    scores = evaluate.evaluate_checkpoint(config, str(output), "val")
    assert 0 <= scores["miou"] <= 1
    assert np.asarray(scores["confusion_matrix"]).sum() == non_void_pixels(small_camvid[0], "val")
