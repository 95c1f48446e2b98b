"""notebooks/colab_tpu.ipynb runs end to end on CPU in the tiny configuration (so that it cannot rot).

The notebook is executed with nbclient in a kernel of this interpreter (the venv's), papermill-style: a cell
inserted after the one tagged `parameters` sets the CI values (no install, configs/tiny.py, a temporary
workdir, the small CamVid of tests/conftest.py, a small export).
"""

import json
import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from fastscnn_jax import export

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"
KERNEL = "fastscnn-test"
# Cells (by id) that must show at least this many figures.
FIGURES = {"data": 2, "curves": 1, "evaluate": 1, "predictions": 1, "export": 1}


def ci_parameters(workdir, camvid_dir, tfds_dir) -> str:
    """Source of the injected cell: the notebook's parameters for a CPU run of a few minutes."""
    # One checkpoint (step 10) instead of tiny.py's five: the suite's time, not what the notebook shows.
    overrides = {"tfds_data_dir": str(tfds_dir), "checkpoint_every_steps": 10}
    return "\n".join(
        [
            "# Injected by tests/notebook_test.py",
            "INSTALL = False",
            'CONFIG = "configs/tiny.py"',
            f"CONFIG_OVERRIDES = {overrides!r}",
            f"WORKDIR = {str(workdir)!r}",
            f"CAMVID_DIR = {str(camvid_dir)!r}",
            "NUM_EXAMPLES = 2",
            'EXPORT_FORMATS = ["tflite"]',
            "EXPORT_HEIGHT, EXPORT_WIDTH = 64, 96",
            "import sys",
            'print("kernel python:", sys.executable)',
        ]
    )


def kernel_manager(kernels_dir: pathlib.Path) -> KernelManager:
    """A manager of ipykernel kernels run by this interpreter, whatever kernelspecs the machine has."""
    spec = kernels_dir / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "fastscnn_jax test",
                "language": "python",
            }
        )
    )
    return KernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels_dir)])
    )


def figures(cell) -> int:
    """PNG images a code cell displayed."""
    return sum(
        o.output_type in ("display_data", "execute_result") and "image/png" in o.data for o in cell.outputs
    )


def text(cell) -> str:
    """The stream output (stdout and stderr) of a code cell."""
    return "".join(o.text for o in cell.outputs if o.output_type == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory, small_camvid):
    """(executed notebook, workdir) of the notebook run in the CI configuration."""
    tmp = tmp_path_factory.mktemp("notebook")
    workdir = tmp / "workdir"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    injected = nbformat.v4.new_code_cell(ci_parameters(workdir, *small_camvid), id="injected")
    nb.cells.insert(index + 1, injected)
    env = {**os.environ, "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2"}
    client = NotebookClient(
        nb,
        km=kernel_manager(tmp / "kernels"),
        timeout=300,  # per cell
        resources={"metadata": {"path": str(REPO)}},
    )
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, tmp / "executed.ipynb")  # kept for a look when a cell fails
    return nb, workdir


def cell(nb, cell_id):
    """The cell with this id."""
    (found,) = [c for c in nb.cells if c.get("id") == cell_id]
    return found


def test_notebook_in_stored_form():
    """Stored without outputs or execution counts, with one parameters cell (install, full recipe)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code_cells)
    parameters = [c for c in code_cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "INSTALL = True" in parameters[0].source
    assert 'CONFIG = "configs/camvid.py"' in parameters[0].source


def test_runs_in_this_interpreter(executed):
    """The kernel was this test's Python (the venv), not some other installed kernel."""
    nb, _ = executed
    assert f"kernel python: {sys.executable}\n" in text(cell(nb, "injected"))


def test_no_errors(executed):
    """Every code cell ran without an error output (nbclient raises on one; this checks what it kept)."""
    nb, _ = executed
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.execution_count is not None, c.source[:200]
            assert not [o for o in c.outputs if o.output_type == "error"], c.source[:200]
    assert not cell(nb, "install").outputs  # INSTALL = False: the cell did nothing


def test_trained_on_every_device_and_kept_the_best(executed):
    """Training ran with the mesh over all devices and left a best checkpoint and eval_val.json."""
    import jax

    nb, workdir = executed
    assert f"mesh {{'data': {jax.device_count()}}}" in text(cell(nb, "config"))
    assert any((workdir / "best").iterdir())
    with open(workdir / "eval_val.json") as f:
        scores = json.load(f)
    assert scores["step"] == 10 and 0.0 <= scores["miou"] <= 1.0
    assert "best val mIoU" in text(cell(nb, "train"))


def test_evaluation_reproduces_training(executed):
    """The evaluate cell printed the per-class table, with the mIoU training recorded."""
    nb, workdir = executed
    with open(workdir / "eval_val.json") as f:
        miou = json.load(f)["miou"]
    out = text(cell(nb, "evaluate"))
    assert "SignSymbol" in out and "Bicyclist" in out
    assert f"miou          {miou:8.4f}" in out
    assert f"recorded by training: mIoU {miou:.4f}" in out


def test_exported_verified_tflite(executed):
    """The TFLite file exists, is non-empty, and the export command verified it."""
    nb, workdir = executed
    path = workdir / "export" / export.FILE_NAMES["tflite"]
    assert path.is_file() and path.stat().st_size > 0
    out = text(cell(nb, "export"))
    # All 5 val images of the small CamVid (export verifies on at most --num_verify=8).
    assert f"wrote {path}: tflite," in out and "verified on 5 camvid val images at 64x96" in out


@pytest.mark.parametrize("cell_id", sorted(FIGURES))
def test_figures(executed, cell_id):
    """Each figure cell displayed its PNG figures."""
    nb, _ = executed
    assert figures(cell(nb, cell_id)) >= FIGURES[cell_id]
