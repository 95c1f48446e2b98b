"""Shared test helpers: synthetic CamVid folders (one small one prepared per session) and the real CamVid."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import os
import pathlib
import shutil
import sys
import tempfile
import threading

import numpy as np
import pytest
from PIL import Image

# fastscnn_jax (and with it JAX and TensorFlow, ~7 s) is imported inside the helpers below, not here: the
# pytest-xdist controller loads this file too, runs no test, and would make the workers wait for that import.

_CACHE_VAR = "FASTSCNN_JAX_TEST_COMPILATION_CACHE"
# LLVM at optimisation level 0 for every program the suite compiles. Compiling is most of the suite's time
# (tiny programs that then run a few steps) and level 0 compiles the tiny train step ~40% faster, running it
# slower by milliseconds. The programs compute the same functions; only rounding may differ from level 2, and
# every comparison in the suite is between programs built alike or to a tolerance. Speed is measured by the
# benchmark commands, not by tests. A compiler option of a jit (the CPU layer's init) still overrides it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess of the suite: the suite's own flags plus `extra`."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


def pytest_configure(config):
    """One persistent JAX compilation cache, fresh for each pytest session, for every process of it.

    Most of the suite's time is XLA:CPU compiling (a tiny train step takes ~20 s on 2 cores), and many
    tests compile the same programs: in this process, in pytest-xdist's workers and in the `python -m
    fastscnn_jax.*` runs they start. The controller (or the only process) makes the folder; the workers and
    every subprocess inherit it through the environment. Programs that compile in under a second are not
    cached (JAX's default). A cached executable is the one the compiler made, so results are the same
    (tests/main_test.py's resume tests compare runs bit for bit across it).
    """
    if _CACHE_VAR not in os.environ:
        os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="fastscnn_jax_test_cache_")
        config._fastscnn_cache_owner = True
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_VAR]
    if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = xla_flags(TEST_XLA_FLAGS)
    # JAX reads both variables when it is first imported, which is after this hook (in collection), unless
    # something imported it earlier.
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])


# The test files that take longest, longest first (about 200 s of one worker's time each for the first two,
# 150-95 s for the next five, 75-25 s for the rest, in one suite run on a 2-core VM). scripts/test.sh hands
# whole files to the two pytest-xdist workers in collection order (--dist loadfile --no-loadscope-reorder);
# starting the longest first keeps one worker from finishing minutes before the other. Files not named here
# follow, in pytest's order. main_test.py waits for the training run it shares with faults_test.py
# (main_test.uninterrupted_run) if that one is still running it: far apart in the list, it does not.
LONGEST_FIRST = (
    "faults_test.py",
    "multihost_test.py",
    "folder_test.py",
    "cpu_test.py",
    "steps_test.py",
    "no_tensorflow_test.py",
    "train_test.py",
    "models_test.py",
    "predict_test.py",
    "export_test.py",
    "benchmark_test.py",
    "gpu_check_test.py",
    "cityscapes_test.py",
    "notebook_test.py",
    "main_test.py",
    "prepare_test.py",
    "release_test.py",
    "convert_torch_test.py",
)


def pytest_collection_modifyitems(items):
    """Orders the tests by file as LONGEST_FIRST says (a stable sort: each file's tests keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


def pytest_unconfigure(config):
    """The process that made the cache folder removes it."""
    if getattr(config, "_fastscnn_cache_owner", False):
        shutil.rmtree(os.environ.pop(_CACHE_VAR), ignore_errors=True)


def make_fake_camvid(
    root: str | pathlib.Path,
    splits: tuple[str, ...] = ("train", "val"),
    n: int = 4,
    size: tuple[int, int] = (24, 32),
    seed: int = 0,
    with_list_files: bool = True,
    sequences: tuple[str, ...] = ("0001TP",),
) -> pathlib.Path:
    """Writes a small synthetic CamVid folder like the SegNet one.

    Args:
      root: folder to create (parents too).
      splits: splits to write, each with `<split>/`, `<split>annot/` and maybe `<split>.txt`.
      n: pairs per split.
      size: (height, width) of every image.
      seed: seed of the random RGB images.
      with_list_files: write `<split>.txt` with the SegNet `/SegNet/CamVid/` prefix.
      sequences: the frames' sequences (file-name prefixes), in turn.

    Returns:
      `root` as a Path.
    """
    root = pathlib.Path(root)
    from fastscnn_jax import camvid

    rng = np.random.default_rng(seed)
    h, w = size
    rows, cols = np.mgrid[:h, :w]
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        lines = []
        # Reverse order, so list-file order differs from sorted file-name order.
        for i in reversed(range(n)):
            name = f"{sequences[i % len(sequences)]}_{split}{i:04d}.png"
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            # 4x4 blocks shifted per example: all 12 values (void included), misalignment shows.
            mask = ((rows // 4) + 3 * (cols // 4) + i) % (camvid.IGNORE_LABEL + 1)
            Image.fromarray(image).save(root / split / name)
            Image.fromarray(mask.astype(np.uint8)).save(root / f"{split}annot" / name)
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n")
        if with_list_files:
            (root / f"{split}.txt").write_text("".join(lines))
    return root


def checksums_of(root: str | pathlib.Path) -> dict[str, str]:
    """{'train/x.png': SHA-256 hex} of every PNG in the split folders of a CamVid folder (its own pins)."""
    root = pathlib.Path(root)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob("*/*.png"))
    }


@pytest.fixture
def fake_camvid_factory(tmp_path):
    """make_fake_camvid writing under this test's tmp_path: factory(name='camvid', **kwargs)."""

    def factory(name: str = "camvid", **kwargs) -> pathlib.Path:
        """Writes a synthetic CamVid folder `tmp_path / name`."""
        return make_fake_camvid(tmp_path / name, **kwargs)

    return factory


@pytest.fixture(scope="session")
def real_camvid_dir() -> pathlib.Path:
    """The real CamVid folder ../shared/camvid next to the repository."""
    path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "camvid"
    assert (path / "train").is_dir() and (path / "trainannot").is_dir(), (
        f"real CamVid folder missing: expected train/ and trainannot/ in {path}"
    )
    return path


def shared_temp_dir(tmp_path_factory, name: str) -> pathlib.Path:
    """The folder `name` in the session's temporary root, made if missing: under pytest-xdist, the same folder
    for every worker (the parent of each worker's own root), so that they can share what they make there."""
    root = tmp_path_factory.getbasetemp()
    folder = (root.parent if "PYTEST_XDIST_WORKER" in os.environ else root) / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def real_tfds_dir(tmp_path_factory) -> pathlib.Path:
    """The TFDS data_dir holding the real CamVid prepared for this session (see real_camvid_builder)."""
    return shared_temp_dir(tmp_path_factory, "tfds_real")


@pytest.fixture(scope="session")
def real_camvid_builder(real_camvid_dir, real_tfds_dir):
    """The real CamVid prepared once per test session into a temporary TFDS data_dir.

    Once for all pytest-xdist workers too: they share the data_dir, and `camvid.get_builder` lets one
    process prepare it while the others wait for its result.
    """
    from fastscnn_jax import camvid

    return camvid.get_builder(str(real_camvid_dir), data_dir=str(real_tfds_dir))


# The small CamVid: what the tests of whole training runs (resume, faults, multi-host, the notebook) and of
# evaluating other networks train and evaluate on. They test the code, not the data, and on the real CamVid
# each run spent about a quarter of its time decoding 367 training images and evaluating 101 val images of
# 360x480. Its frames keep what those tests rely on: sequences to hold out or score alone, an odd number of
# val images (an uneven share per process, and a last batch to pad) and a size off the network's 32-pixel
# grid (resized inside, as 360x480 is).
SMALL_CAMVID_SIZE = (120, 160)
SMALL_CAMVID_SEQUENCES = ("0001TP", "0006R0", "0016E5")


@pytest.fixture(scope="session")
def small_camvid(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(folder, TFDS data_dir) of a small synthetic CamVid, prepared once for all pytest-xdist workers.

    Train: 12 frames, 4 of each of SMALL_CAMVID_SEQUENCES; val: 5 frames of 0016E5 (as the real val is).
    """
    shared = shared_temp_dir(tmp_path_factory, "small_camvid")
    root, data_dir = shared / "camvid", shared / "tfds"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (shared / "written").exists():
            shutil.rmtree(root, ignore_errors=True)
            size = SMALL_CAMVID_SIZE
            make_fake_camvid(root, splits=("train",), n=12, size=size, sequences=SMALL_CAMVID_SEQUENCES)
            make_fake_camvid(root, splits=("val",), n=5, size=size, seed=1, sequences=("0016E5",))
            (shared / "written").touch()
    from fastscnn_jax import camvid

    camvid.get_builder(str(root), data_dir=str(data_dir))
    return root, data_dir


@pytest.fixture(scope="session")
def small_data_flags(small_camvid) -> list[str]:
    """Command-line config overrides pointing an entry point at the session's small CamVid."""
    root, data_dir = small_camvid
    return [f"--config.dataset_dir={root}", f"--config.tfds_data_dir={data_dir}"]


def non_void_pixels(root: pathlib.Path, split: str, sequence: str = "") -> int:
    """Number of labelled (not void) pixels in a CamVid folder's split, or in one sequence's frames of it."""
    from fastscnn_jax import camvid

    masks = sorted((root / f"{split}annot").glob(f"{sequence}*.png"))
    assert masks, f"no masks of {sequence or 'any sequence'} in {root / f'{split}annot'}"
    return sum(int((np.asarray(Image.open(m)) != camvid.IGNORE_LABEL).sum()) for m in masks)


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """(folder, base URL) of a local HTTP server serving that folder; shut down afterwards."""
    folder = tmp_path / "www"
    folder.mkdir()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # A CI proxy must not intercept the local server.
    monkeypatch.setenv("no_proxy", "127.0.0.1")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        """Serves files without logging every request."""

        def log_message(self, *args):
            """Drops the access log."""

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder)
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
