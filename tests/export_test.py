"""Exports of the shipped weights (fastscnn_jax.export): each format round-trips on real CamVid val images.

The command is run once (module fixture) for every format at 96x128; each test then loads its file with the
format's own runtime and compares it with the JAX model, loaded here as `predict.Segmenter` loads it
(`checkpointing.load_model`, this backend's layer); the files are exported from the plain core.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import linen as nn

from fastscnn_jax import camvid, checkpointing, export

HEIGHT, WIDTH = 96, 128
# Val images the command did not verify on (it takes 4 spread from the first to the last).
CHECK_INDICES = (7, 38, 71)


@pytest.fixture(scope="module")
def exported(real_camvid_dir, tmp_path_factory):
    """(folder, report path) of `--format=all` exports of the shipped weights at 96x128."""
    out = tmp_path_factory.mktemp("export")
    report = out / "report.md"
    cmd = [
        sys.executable,
        "-m",
        "fastscnn_jax.export",
        "--format=all",
        f"--output={out}",
        f"--height={HEIGHT}",
        f"--width={WIDTH}",
        f"--dataset_dir={real_camvid_dir}",
        "--num_verify=4",
        "--num_calibration=32",
        f"--report={report}",
        "--latency_runs=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for format in export.FORMATS:
        assert f"wrote {out / export.FILE_NAMES[format]}: {format}," in proc.stdout, proc.stdout
    return out, report


@pytest.fixture(scope="module")
def val_images(real_camvid_dir):
    """Three real CamVid val images at 96x128, uint8 [3, 96, 128, 3]."""
    pairs = camvid.list_split(real_camvid_dir, "val")
    images = []
    for i in CHECK_INDICES:
        with camvid.open_image(pairs[i][0]) as image:
            images.append(export.fit_image(np.asarray(image.convert("RGB")), HEIGHT, WIDTH))
    return np.stack(images)


@pytest.fixture(scope="module")
def reference(val_images):
    """The JAX model's float32 logits of `val_images`, loaded as predict.Segmenter loads it."""
    model, variables, _ = checkpointing.load_model(checkpointing.DEFAULT_WEIGHTS)
    return np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(val_images))


def check(logits, reference, max_error, floor):
    """Asserts shape, dtype, max abs logit error (None: not checked) and argmax agreement."""
    assert logits.dtype == np.float32 and logits.shape == reference.shape
    agreement = (logits.argmax(-1) == reference.argmax(-1)).mean()
    error = np.abs(logits - reference).max()
    assert agreement >= floor, (agreement, error)
    if max_error is not None:
        assert error <= max_error, (agreement, error)


def test_saved_model_signatures_batch_and_dtypes(exported, val_images, reference):
    """serving_default takes uint8 of any batch, serving_float float32; both give the JAX logits."""
    import tensorflow as tf

    loaded = tf.saved_model.load(os.fspath(exported[0] / export.FILE_NAMES["saved_model"]))
    default = loaded.signatures["serving_default"]
    assert default.structured_input_signature[1]["images"].dtype == tf.uint8
    assert default.structured_input_signature[1]["images"].shape.as_list() == [None, HEIGHT, WIDTH, 3]
    check(default(images=tf.constant(val_images[:1]))["logits"].numpy(), reference[:1], 1e-3, 0.9999)
    floats = loaded.signatures["serving_float"](images=tf.constant(val_images.astype(np.float32)))
    check(floats["logits"].numpy(), reference, 1e-3, 0.9999)


@pytest.mark.parametrize(
    "format,max_error,floor",
    [
        ("tflite", 1e-3, 0.9999),
        ("tflite_fp16", 0.5, 0.998),
        ("tflite_int8", None, 0.955),
        ("tflite_int8_mixed", None, 0.975),
        ("tflite_dynamic", None, 0.99),
    ],
)
def test_tflite(exported, val_images, reference, format, max_error, floor):
    """Each TFLite model takes uint8 [1, 96, 128, 3] and meets its floor under ai_edge_litert."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.fspath(exported[0] / export.FILE_NAMES[format]))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == np.uint8 and list(inp["shape"]) == [1, HEIGHT, WIDTH, 3]
    logits = []
    for image in val_images:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        logits.append(interpreter.get_tensor(out["index"])[0])
    check(np.stack(logits), reference, max_error, floor)


def _ops(path):
    """[(op name, output tensor detail, input tensor details)] of a TFLite model."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.fspath(path))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return [
        (op["op_name"], tensors[op["outputs"][0]], [tensors[i] for i in op["inputs"] if i >= 0])
        for op in interpreter._get_ops_details()
    ]


def test_int8_convolutions_quantised_per_channel(exported):
    """Full-integer int8: every convolution (1x1 ones too: not FULLY_CONNECTED, which is quantised per
    tensor; depthwise ones as DEPTHWISE_CONV_2D) is an int8 CONV_2D / DEPTHWISE_CONV_2D with one weight scale
    per output channel."""
    ops = _ops(exported[0] / export.FILE_NAMES["tflite_int8"])
    convs = [(name, out, ins) for name, out, ins in ops if name in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    # Regular convs: stem, 2 DSConv 1x1s, 9 x 2 bottleneck 1x1s, 4 + 1 pyramid pool, 2 fusion, 3 classifier.
    assert sum(name == "CONV_2D" for name, _, _ in convs) == 1 + 2 + 18 + 5 + 2 + 3
    # Depthwise convs: 2 learning-to-downsample DSConvs, 9 bottlenecks, the fusion, 2 classifier DSConvs.
    assert sum(name == "DEPTHWISE_CONV_2D" for name, _, _ in convs) == 2 + 9 + 1 + 2
    for name, out, (_, weights, *_) in convs:
        channels = out["shape"][-1]
        assert out["dtype"] == np.int8 and weights["dtype"] == np.int8, (name, out["name"])
        assert len(weights["quantization_parameters"]["scales"]) == channels, (name, out["name"])
    assert not [out["name"] for name, out, _ in ops if name == "FULLY_CONNECTED" and "Conv" in out["name"]]


def test_int8_mixed_keeps_listed_layers_in_float(exported):
    """tflite_int8_mixed: the ops of MIXED_FLOAT_LAYERS compute in float32, the global branch in int8."""
    ops = _ops(exported[0] / export.FILE_NAMES["tflite_int8_mixed"])
    convs = [(out["name"], out["dtype"]) for name, out, _ in ops if name in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    float_convs = [n for n, dtype in convs if dtype == np.float32]
    int8_convs = [n for n, dtype in convs if dtype == np.int8]
    assert len(float_convs) + len(int8_convs) == len(convs)
    for layer in ("learning_to_downsample", "feature_fusion", "classifier"):
        assert any(f"/{layer}/" in n for n in float_convs), layer
        assert not any(f"/{layer}/" in n for n in int8_convs), layer
    assert len([n for n in int8_convs if "/global_feature_extractor/" in n]) == 9 * 3 + 5
    assert not [n for n in float_convs if "/global_feature_extractor/" in n]


def test_onnx(exported, val_images, reference):
    """The ONNX model takes uint8 and matches the JAX logits under onnxruntime."""
    import onnxruntime

    path = os.fspath(exported[0] / export.FILE_NAMES["onnx"])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)"
    logits = np.concatenate([session.run(None, {inp.name: image[None]})[0] for image in val_images])
    check(logits, reference, 1e-3, 0.9999)


def test_stablehlo_loads_without_model_code(exported, val_images, reference, tmp_path):
    """A fresh process with only jax deserialises and runs the file at two batch sizes."""
    np.save(tmp_path / "images.npy", val_images)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from jax import export
        with open({os.fspath(exported[0] / export.FILE_NAMES["stablehlo"])!r}, "rb") as f:
            exported = export.deserialize(bytearray(f.read()))
        images = np.load({os.fspath(tmp_path / "images.npy")!r})
        out = np.concatenate([np.asarray(exported.call(images[:1])), np.asarray(exported.call(images[1:]))])
        np.save({os.fspath(tmp_path / "logits.npy")!r}, out)
        assert not [m for m in sys.modules if m.startswith(("fastscnn_jax", "flax"))]
        print(exported.platforms, exported.in_avals)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "('cpu', 'cuda', 'tpu')" in proc.stdout and "uint8[b,96,128,3]" in proc.stdout, proc.stdout
    check(np.load(tmp_path / "logits.npy"), reference, 1e-3, 0.9999)


def test_report_table(exported):
    """The report has a row per format with size, error, agreement and a latency."""
    text = exported[1].read_text()
    assert text.startswith("Input 96x128; errors") and "\n| format | file | size |" in text
    assert "| JAX model (jit, as predict.py runs it) |" in text
    for format in export.FORMATS:
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {format} |")]
        assert row.endswith(" ms |") and "MiB" in row and "%" in row


def test_failed_verification_leaves_no_file(tmp_path, val_images, monkeypatch):
    """An export that misses its floor raises ExportError naming the numbers, and its file is removed."""
    apply, variables, _ = export.build_model(checkpointing.DEFAULT_WEIGHTS)
    reference = np.asarray(jax.jit(export.bind(apply, variables))(val_images))
    monkeypatch.setitem(export.FLOORS, "stablehlo", export.Floor(-1.0, 0.5))
    path = tmp_path / "model.stablehlo"
    with pytest.raises(export.ExportError, match="failed verification .* max abs logit error 0 "):
        export.export("stablehlo", apply, variables, os.fspath(path), HEIGHT, WIDTH, val_images, reference)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_existing_folder_is_kept_and_written_into(tmp_path, val_images, reference):
    """--output naming an existing folder puts the file inside it; the folder's other files stay."""
    (tmp_path / "notes.txt").write_text("keep me")
    path = export.output_path(os.fspath(tmp_path), "stablehlo", several=False)
    assert path == os.fspath(tmp_path / export.FILE_NAMES["stablehlo"])
    apply, variables, _ = export.build_model(checkpointing.DEFAULT_WEIGHTS, "auto")
    result = export.export("stablehlo", apply, variables, path, HEIGHT, WIDTH, val_images, reference)
    assert result.agreement == 1.0 and result.max_abs_error <= 1e-3
    assert (tmp_path / "notes.txt").read_text() == "keep me" and os.path.isfile(path)
    folder = os.fspath(tmp_path)
    with pytest.raises(export.ExportError, match="is a folder but not a SavedModel; not replacing it"):
        export.export("stablehlo", apply, variables, folder, HEIGHT, WIDTH, val_images, reference)
    assert (tmp_path / "notes.txt").exists()


def test_equalized_activations_same_logits_equal_ranges(val_images, reference):
    """equalize_activations changes the weights (int8 export), not the function: same logits, and a producer
    feeding a depthwise convolution has every channel's maximum at the largest (or below 1e-3 of it)."""
    apply, variables, _ = export.build_model(checkpointing.DEFAULT_WEIGHTS)  # the exported core
    assert apply.module.conv is nn.Conv
    equalized = export.equalize_activations(apply, variables, val_images)
    block = ("global_feature_extractor", "InvertedResidual_0", "ConvBN_0")
    before, after = (
        np.asarray(v["params"][block[0]][block[1]][block[2]]["BatchNorm_0"]["scale"])
        for v in (variables, equalized)
    )
    assert not np.allclose(before, after)
    logits = np.asarray(jax.jit(export.bind(apply, equalized))(val_images))
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4 * scale)
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() > 0.9999

    @jax.jit
    def maxima(v):
        """Per-channel maxima of the producer's output on the images."""
        _, state = apply.module.apply(
            v, val_images, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        out = state["intermediates"][block[0]][block[1]][block[2]]["__call__"][0]
        return out.reshape(-1, out.shape[-1]).max(0)

    m = maxima(equalized)
    spread = maxima(variables)
    assert spread.min() < 0.5 * spread.max()  # the ranges did differ
    alive = spread > 1e-3 * spread.max()
    np.testing.assert_allclose(m[alive], m.max(), rtol=1e-4)
