"""Datasets held in memory as numpy arrays, deterministic splits, and worker shards.

Every source ends up as ``Splits`` of three ``Arrays`` (train/val/test) whose ``x`` is
(N, *shape) float32 and already normalized, so training code never needs transforms. A sample's
shape has 1 to 3 dims: a feature vector (F,), a signal (C, L) or an image (C, H, W), H != W allowed.

* ``digits`` (default): scikit-learn's bundled 8x8 digits, works offline anywhere;
* ``cifar10``: an already-extracted CIFAR-10 under ``root`` (never downloaded);
* ``imagefolder``: ``root/<class>/<image>`` decoded with PIL, or ``root/train/<class>/<image>`` beside
  ``root/val/...`` and/or ``root/test/...`` (the folders are then its declared splits);
* ``parquet``: local or remote parquet with a label column and either flat float
  features plus a ``shape`` or encoded image bytes.

Splits. A source may declare its splits: cifar10 its official test batch; an image folder its train/val/test
folders; parquet a file, folder, glob or
URI per split (``train``, ``val``, ``test``) or one ``split_column`` whose values are train/val/test (a
folder written by ``raydistill data prepare`` names its split column in the schema metadata, so it is used
by default). A declared split is used as is; test is carved (seeded, stratified) from the training pool
only when not declared, val from train only when not declared. ``Splits.origin`` says where each came from.

Image sources (digits, cifar10, imagefolder, parquet images, and parquet lists of uint8 for a (C, H, W) shape:
``is_pixel_list``) are scaled to [0, 1] and standardized per channel with statistics of the train split only, so
no information from val/test leaks into training. Float parquet features are taken as-is (they are
model-ready numbers; ``write_parquet`` stores already-normalized arrays), except 8-bit pixels
written with their statistics (``raydistill.pixels`` metadata, ``standardize_pixels``).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import math
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raydistill.errors import DataError

__all__ = [
    "Arrays",
    "Splits",
    "SOURCES",
    "fingerprint",
    "load_splits",
    "shard_indices",
    "write_parquet",
    "input_normalization",
]

SOURCES = ("digits", "cifar10", "imagefolder", "parquet", "noisy_digits")
SHARD_MODES = ("random", "classwise")

_CIFAR_HINT = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it there (raydistill never downloads)"
)
# Schema metadata written by write_parquet, so a prepared file needs no --shape.
_META_SHAPE = b"raydistill.shape"
_META_NUM_CLASSES = b"raydistill.num_classes"
_META_SPLIT_COLUMN = b"raydistill.split_column"
# {"mean": [...], "std": [...]} per channel: the feature column holds 8-bit pixels, each row's C x H x W uint8 values
# as one fixed-size binary value, read as (pixels / 255 - mean) / std (``standardize_pixels``); written by
# ``raydistill data prepare`` for 8-bit image sources
_META_PIXELS = b"raydistill.pixels"
# b"float32": the feature column holds each row's float32 values (little-endian, C order) as one fixed-size binary
# value; written by ``write_parquet`` for float samples (why: see there)
_META_TENSOR = b"raydistill.tensor"
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Arrays:
    """One split in memory.

    x: (N, *shape) float32, normalized; y: (N,) int64 labels in [0, num_classes);
    ids: (N,) int64, stable and unique per sample (survive splitting and sharding);
    shape: one sample's shape, (F,), (C, L) or (C, H, W).
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    num_classes: int
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.x.shape[1:] != self.shape or not (len(self.x) == len(self.y) == len(self.ids)):
            raise DataError(
                f"inconsistent arrays: x {self.x.shape}, y {self.y.shape}, ids {self.ids.shape}, "
                f"shape {self.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> Arrays:
        """The rows at ``index`` (an int array or a slice) as a new ``Arrays``."""
        return Arrays(self.x[index], self.y[index], self.ids[index], self.num_classes, self.shape)


@dataclass
class Splits:
    """Train/val/test ``Arrays`` of one data source; ``shape`` is one sample's shape (1 to 3 dims);
    ``origin`` says, per split, where it came from (declared by the source, or carved and how)."""

    train: Arrays
    val: Arrays
    test: Arrays
    num_classes: int
    shape: tuple[int, ...]
    name: str
    origin: dict[str, str] | None = None
    # (mean, std) per channel of the standardization applied to [0, 1] images (train split's statistics); None
    # for data taken as it is (flat parquet features)
    channel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def describe(self) -> dict[str, dict]:
        """Per split: where it came from and its size (report.json's ``data.splits``)."""
        origin = self.origin or {}
        return {name: {"from": origin.get(name, "?"), "size": len(getattr(self, name))} for name in SPLIT_NAMES}

    # the reading interface Splits shares with a streamed run's ``stream.StreamData``
    def rows(self, split: str) -> int:
        return len(getattr(self, split))

    def batches(self, split: str, batch_size: int = 1024):
        """(x, y, ids) numpy batches of ``split`` in order."""
        part = getattr(self, split)
        for start in range(0, len(part), batch_size):
            rows = slice(start, start + batch_size)  # copies: object-store arrays are read-only
            yield np.array(part.x[rows]), np.array(part.y[rows]), np.array(part.ids[rows])

    def head(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` rows of ``split`` (x, y), as copies (object-store arrays are read-only)."""
        part = getattr(self, split)
        return np.array(part.x[:n]), np.array(part.y[:n])


def is_image(shape: Sequence[int]) -> bool:
    """Whether samples of ``shape`` are images (C, H, W): what crop/flip augmentation and 2-D CNNs need."""
    return len(shape) == 3


def image_side(shape: Sequence[int]) -> int:
    """The shorter side of an image shape (C, H, W), which sizes the crop padding; 1 for other shapes."""
    return min(int(shape[1]), int(shape[2])) if is_image(shape) else 1


# ---------------------------------------------------------------------------------
# Small helpers


def _labels(values: np.ndarray, where: str) -> np.ndarray:
    """``values`` as int64 class indices, or a ValueError naming ``where``."""
    values = np.asarray(values)
    if values.dtype == object or not (
        np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    ):
        raise DataError(
            f"labels in {where} must be integers 0..K-1, got dtype {values.dtype}; "
            "map class names to integer ids first"
        )
    if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():  # pyarrow gives a null label as NaN
        raise DataError(
            f"labels in {where} must be integers 0..K-1, found {int(np.isnan(values).sum())} missing (null); "
            "drop those rows or label them"
        )
    if np.issubdtype(values.dtype, np.floating) and (
        not np.all(np.isfinite(values)) or np.any(values != np.round(values))
    ):
        raise DataError(
            f"labels in {where} must be integers 0..K-1, found non-integral values; "
            "map classes to integer ids first"
        )
    labels = values.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(
            f"labels in {where} must be integers 0..K-1, found {labels.min()}; "
            "shift labels to start at 0"
        )
    return labels


def sample_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``data.shape`` checked: 1 to 3 positive ints, (F,), (C, L) or (C, H, W)."""
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        dims = ()
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise DataError(f"data.shape must be 1 to 3 positive integers ([F], [C, L] or [C, H, W]), got {shape!r}")
    return dims


def flat_feature_shape(given, metadata: dict, location, split: str | None = None) -> tuple[int, ...]:
    """The sample shape of a feature column: ``data.shape`` (``given``) or, when it is None, the shape the
    files were written with (``raydistill.shape`` in their schema metadata, from ``write_parquet``). Both set and
    different is a one-line error: the row length can match (3 x 24 x 32 = 3 x 32 x 24) while every sample would be
    read in the wrong layout, scrambled without a word. ``split``: ``location`` is that declared val or test split,
    read in the training data's shape (``given``), which its files must record if they record one."""
    written = sample_shape(metadata[_META_SHAPE].decode().split(",")) if _META_SHAPE in metadata else None
    if given is None:
        if written is None:
            raise DataError(f"the feature column of {location} needs data.shape ([F], [C, L] or [C, H, W], e.g. "
                            "[1, 8, 8]); pass data.shape, or data.image_column for encoded images")
        return written
    shape = sample_shape(given)
    if written is not None and shape != written and split is not None:
        raise DataError(f"declared {split} split {location} was written with sample shape {list(written)} but the "
                        f"training data's is {list(shape)}; write every split with the same sample shape")
    if written is not None and shape != written:
        raise DataError(f"data.shape {list(shape)} differs from the shape {list(written)} that the parquet data "
                        f"at {location} was written with (its raydistill.shape metadata); drop data.shape or set "
                        f"it to {list(written)}")
    return shape


def image_hw(image_size) -> tuple[int, int] | None:
    """``data.image_size`` as (height, width): an int is a square (torchvision's ``Resize((h, w))`` takes a pair
    the same way); None stays None. Anything else is a one-line error."""
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif isinstance(image_size, (list, tuple)) and len(image_size) == 2:
        size = tuple(image_size)
    else:
        size = ()
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
        raise DataError(f"image_size must be a positive integer (a square) or [height, width], got {image_size!r}; "
                        "pass e.g. 32 or [24, 40]")
    return size


def _decode_image(data: bytes | str, size: tuple[int, int], what: str, raw: bool = False) -> np.ndarray:
    """Decode an encoded image (bytes or a file path) to (3, height, width) float32 in [0, 1]; ``size`` is
    (height, width). ``raw``: the uint8 pixels instead (``pixels_to_float`` gives the same floats from them)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)  # PIL: (w, h)
            pixels = np.asarray(image, dtype=np.uint8 if raw else np.float32)
    except Exception as error:  # PIL raises many types for corrupt or truncated files
        message = str(error).replace(f" {data!r}", "") if not isinstance(data, bytes) else \
            re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))  # PIL names its in-memory buffer
        raise DataError(
            f"cannot decode image {what} ({type(error).__name__}: {message}); "
            "remove or replace that file"
        ) from error
    return pixels.transpose(2, 0, 1) if raw else pixels.transpose(2, 0, 1) / 255.0


def pixels_to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (a new array), the very values ``_decode_image`` gives without ``raw``."""
    x = pixels.astype(np.float32)
    x /= 255.0
    return x


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of (N, C, H, W) to (N, C, height, width); ``size`` is (height, width)."""
    import torch
    import torch.nn.functional as F

    if x.shape[2:] == tuple(size):
        return x
    resized = F.interpolate(
        torch.from_numpy(x), size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.numpy()


def _standardize(train: np.ndarray, others: list[np.ndarray]
                 ) -> tuple[list[np.ndarray], tuple[tuple[float, ...], tuple[float, ...]]]:
    """Per-channel (x - mean) / std with statistics of ``train`` only, applied to all; and those (mean, std)."""
    mean = train.mean(axis=(0, 2, 3), dtype=np.float64).reshape(1, -1, 1, 1)
    std = train.std(axis=(0, 2, 3), dtype=np.float64).reshape(1, -1, 1, 1)
    std[std == 0] = 1.0  # a constant channel stays constant instead of becoming NaN
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    stats = tuple(float(v) for v in mean.ravel()), tuple(float(v) for v in std.ravel())
    return [((a - mean) / std).astype(np.float32) for a in [train, *others]], stats


def standardize_pixels(pixels: np.ndarray, stats) -> np.ndarray:
    """uint8 pixels (N, C, ...) -> float32 (pixels / 255 - mean) / std per channel, ``stats`` = (mean, std): bit
    for bit what ``_standardize`` gives the same image loaded from its source (the same float32 operations in the
    same order)."""
    mean, std = (np.asarray(v, np.float32).reshape(1, -1, *[1] * (pixels.ndim - 2)) for v in stats)
    x = pixels_to_float(pixels)
    x -= mean
    x /= std
    return x


def input_normalization(source: str, channel_stats) -> dict | None:
    """How a model of the run takes its input, for the report and the exported artifact: each raw value (a pixel
    0..255; digits' 0..16) times ``scale``, then (that - mean) / std per channel with the training data's
    statistics (``channel_stats``), after any resize to ``data.image_size``; None when the samples are the stored
    numbers as they are (float features)."""
    if channel_stats is None:
        return None
    scale = 1 / 16 if source in ("digits", "noisy_digits") else 1 / 255
    return {"scale": scale, "mean": list(channel_stats[0]), "std": list(channel_stats[1]),
            "formula": "per channel: (raw * scale - mean) / std"}


def to_pixels(x: np.ndarray, stats, rows: int = 4096) -> np.ndarray | None:
    """Standardized images ``x`` (N, C, ...) float32 -> their uint8 pixels, when ``standardize_pixels`` of those
    pixels gives ``x`` back bit for bit (images decoded from 8-bit files, at their own size or resized by PIL, as
    CIFAR-10 and image folders are); None otherwise (e.g. resized by interpolating floats, or not 0..255 / 255).
    ``rows`` at a time, so that the float64 arithmetic never holds more than a slice of the set."""
    mean, std = (np.asarray(v, np.float64).reshape(1, -1, *[1] * (x.ndim - 2)) for v in stats)
    if len(x) == 0:
        return None
    pixels = np.empty(x.shape, np.uint8)
    for start in range(0, len(x), rows):
        part = x[start:start + rows]
        values = (part.astype(np.float64) * std + mean) * 255.0
        rounded = np.rint(values)
        if rounded.min() < 0 or rounded.max() > 255 or np.abs(values - rounded).max() > 0.01:
            return None
        pixels[start:start + rows] = rounded
        if not np.array_equal(standardize_pixels(pixels[start:start + rows], stats), part):
            return None
    return pixels


def stored_pixel_stats(metadata: dict, location, shape: tuple[int, ...], kind) -> tuple | None:
    """The (mean, std) of a feature column written as 8-bit pixels (``raydistill.pixels`` in the schema metadata;
    ``kind`` is the column's Arrow type), or None for features taken as they are (float lists, or float32 bytes
    marked by ``raydistill.tensor``); a file whose column or shape does not fit its metadata, or raw bytes with no
    such metadata, is an error."""
    import pyarrow as pa

    if _META_PIXELS not in metadata:
        if metadata.get(_META_TENSOR) == b"float32" and kind == pa.binary(4 * math.prod(shape)):
            return None  # float32 values as bytes (``write_parquet``): taken as they are
        if pa.types.is_binary(kind) or pa.types.is_fixed_size_binary(kind) or pa.types.is_large_binary(kind):
            if _META_TENSOR in metadata:
                raise DataError(f"parquet data at {location} is marked as float32 samples (its raydistill.tensor "
                                f"metadata) but its feature column is {kind} for shape {list(shape)} (which needs "
                                f"fixed_size_binary[{4 * math.prod(shape)}]); fix data.shape or rewrite the data "
                                "with raydistill data prepare")
            raise DataError(f"feature column of parquet data at {location} holds bytes ({kind}) with no "
                            "raydistill.pixels or raydistill.tensor metadata saying what they are; store one float "
                            "list per row, encoded images in data.image_column, or write it with raydistill data "
                            "prepare")
        return None
    import json

    stats = json.loads(metadata[_META_PIXELS])
    mean, std = tuple(map(float, stats["mean"])), tuple(map(float, stats["std"]))
    if (kind != pa.binary(math.prod(shape)) or len(shape) != 3 or not len(mean) == len(std) == shape[0]):
        raise DataError(f"parquet data at {location} is marked as 8-bit pixels of {len(mean)} channels (its "
                        f"raydistill.pixels metadata) but its feature column is {kind} for shape {list(shape)}; "
                        "rewrite it with raydistill data prepare, or drop that metadata")
    return mean, std


def _split_off(index: np.ndarray, y: np.ndarray, n_out: int, seed: int):
    """Split ``index`` into (rest, out) with ``len(out) == n_out``, both in shuffled order.

    Stratified by ``y`` when every class present has >= 2 samples and both parts can
    hold every class; otherwise a plain seeded permutation.

    The draws are scikit-learn's ``train_test_split(index, test_size=n_out, random_state=seed, shuffle=True,
    stratify=...)`` (its ``ShuffleSplit`` / ``StratifiedShuffleSplit``, 1.5 to 1.9), written out here with numpy
    alone. Why: importing scikit-learn costs ~1.2 CPU-s (scipy.stats, pandas), as much as a whole digits run's data
    stage, in every command that splits data; and a split written here stays the same whatever scikit-learn a
    machine has. tests/unit/test_data.py checks it against scikit-learn's own draws.
    """
    if n_out == 0:
        return np.random.default_rng(seed).permutation(index), index[:0]
    labels = y[index]
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    stratify = counts.min() >= 2 and n_out >= len(counts) and len(index) - n_out >= len(counts)
    rng = np.random.RandomState(seed)  # scikit-learn's check_random_state(seed)
    if not stratify:  # ShuffleSplit: one permutation, its head is the test part
        order = rng.permutation(len(index))
        return index[order[n_out:]], index[order[:n_out]]
    # StratifiedShuffleSplit._iter_indices, first split
    classes, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, len(index) - n_out, rng)
    t_i = _approximate_mode(class_counts - n_i, n_out, rng)
    rest, out = [], []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        rest.extend(members[: n_i[i]])
        out.extend(members[n_i[i]: n_i[i] + t_i[i]])
    return index[rng.permutation(rest)], index[rng.permutation(out)]


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's ``utils.extmath._approximate_mode``: how many of ``n_draws`` each class gets (the floor of
    its share, then one more to the largest remainders, ties broken by ``rng``)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


# ---------------------------------------------------------------------------------
# Sources. Each returns (x, y, ids, normalize, num_classes_hint) for the pool to split,
# or, for cifar10, also a fixed test part.


def _load_digits(image_size: tuple[int, int] | None):
    """scikit-learn's bundled digits (1,797 8x8 images, pixel values 0-16), read from its file as
    ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn (~1.2 CPU-s: see ``_split_off``)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source 'digits' needs scikit-learn's bundled copy; install scikit-learn "
                        "(pip install scikit-learn)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    x = (table[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0)[:, None, :, :]
    if image_size is not None:
        x = _resize(x, image_size)
    y = table[:, -1].astype(np.int64)
    return x, y, np.arange(len(y), dtype=np.int64)


NOISY_LABEL_RATE = 0.5  # noisy_digits: share of training-pool labels replaced by a wrong class


def _load_noisy_digits(image_size: tuple[int, int] | None, test_fraction: float, seed: int):
    """``noisy_digits``: the bundled digits with label noise, the built-in benchmark where distillation matters.

    A stratified ``test_fraction`` of the digits is set aside with its true labels (the fixed test part); in
    the rest (train and validation) ``NOISY_LABEL_RATE`` of the labels are replaced by a different class drawn
    uniformly (symmetric label noise, a fixed draw from ``seed``). Labels from crowds or heuristics look like
    this; a student trained on them alone fits the wrong labels, a teacher's soft outputs do not repeat them.
    Returns ``(pool, test)``, each ``(x, y, ids)``, like ``_load_cifar10``.
    """
    x, y, ids = _load_digits(image_size)
    pool, test = _split_off(np.arange(len(y)), y, int(round(test_fraction * len(y))), seed)
    rng = np.random.default_rng([seed, 0x6E6F6973])  # its own stream: the split's seed does not repeat it
    noisy = y[pool].copy()
    flip = rng.random(len(pool)) < NOISY_LABEL_RATE
    noisy[flip] = (noisy[flip] + rng.integers(1, 10, int(flip.sum()))) % 10  # never the true class
    return (x[pool], noisy, ids[pool]), (x[test], y[test], ids[test])


def _load_cifar10(root, image_size: tuple[int, int] | None):
    from torchvision.datasets import CIFAR10

    if root is None:
        raise DataError(f"cifar10 needs root=DIR: {_CIFAR_HINT}")
    parts = []
    for train in (True, False):
        try:
            dataset = CIFAR10(os.fspath(root), train=train, download=False)
        except (RuntimeError, OSError) as error:
            raise DataError(f"CIFAR-10 not found under {root}: {_CIFAR_HINT}") from error
        x = dataset.data.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        if image_size is not None:
            x = _resize(x, image_size)
        y = np.asarray(dataset.targets, dtype=np.int64)
        offset = 0 if train else 50000  # ids stay unique across the official splits
        parts.append((x, y, np.arange(len(y), dtype=np.int64) + offset))
    return parts


# Folder names of declared splits in an image folder (DIR/train/<class>/<image>, DIR/val/..., DIR/test/...), the
# layout of ImageNet's and most image-classification sets.
IMAGEFOLDER_SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def imagefolder_splits(root) -> dict[str, str] | None:
    """``{"train": DIR/train, "val": DIR/val, "test": DIR/test}`` (the ones present) when ``root`` holds a ``train``
    folder and a val or test folder, each of class folders; None for a plain ``DIR/<class>/<image>`` folder.
    Why: torchvision's ImageFolder on such a root takes ``train`` and ``val`` for two classes, and the split each
    image is in for its label."""
    def folder_of_classes(path: str) -> bool:
        return os.path.isdir(path) and any(entry.is_dir() for entry in os.scandir(path))

    found = {}
    for split, names in IMAGEFOLDER_SPLIT_NAMES.items():
        for name in names:
            path = os.path.join(os.fspath(root), name)
            if folder_of_classes(path):
                found[split] = path
                break
    return found if "train" in found and len(found) > 1 else None


def _load_imagefolder(root, image_size: tuple[int, int], class_to_idx: dict[str, int] | None = None):
    """(x, y, ids, class names) of ``root``/<class>/<image>; with ``class_to_idx`` (another split's classes) its
    class folders must be among them and keep their labels."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if root is None or not os.path.isdir(root):
        raise DataError(
            f"image folder {root!r} not found; pass root=DIR laid out as DIR/<class>/<image>"
        )
    try:
        if class_to_idx is None:
            dataset = ImageFolder(os.fspath(root))
            samples, classes = dataset.samples, dataset.classes
        else:
            classes, _ = find_classes(os.fspath(root))
            unknown = sorted(set(classes) - set(class_to_idx))
            if unknown:
                raise DataError(f"image folder {root} has class folder(s) {', '.join(unknown[:5])} that the training "
                                "folder has not; give every split the training folder's classes")
            samples = make_dataset(os.fspath(root), {c: class_to_idx[c] for c in classes}, IMG_EXTENSIONS)
            classes = sorted(class_to_idx, key=class_to_idx.get)
    except (FileNotFoundError, OSError) as error:
        raise DataError(
            f"no images found under {root} ({error}); lay images out as DIR/<class>/<image>"
        ) from error
    x = np.stack([_decode_image(path, image_size, repr(path)) for path, _ in samples])
    y = np.asarray([label for _, label in samples], dtype=np.int64)
    return x.astype(np.float32), y, np.arange(len(y), dtype=np.int64), classes


def _parquet_dataset(path):
    """A ``pyarrow.dataset`` over a file, folder, glob, or filesystem URI."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    if path is None:
        raise DataError("parquet source needs path=FILE|DIR|GLOB|URI; pass the data location")
    path = os.fspath(path)
    source, filesystem = path, None
    # In a URI, "?" starts pyarrow's options (s3://bucket/prefix?endpoint_override=host:9000&scheme=http), as
    # FileSystem.from_uri reads them; globs there use * and [...].
    uri = "://" in path
    where, _, options = path.partition("?") if uri else (path, "", "")
    try:
        if any(ch in where for ch in ("*[" if uri else "*?[")):
            if uri:
                # Remote glob: list from the deepest literal folder, then match names.
                scheme, rest = where.split("://", 1)
                parts = rest.split("/")
                first_glob = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*["))
                literal = "/".join(parts[:first_glob])
                query = f"?{options}" if options else ""
                filesystem, base = pafs.FileSystem.from_uri(f"{scheme}://{literal}{query}")
                pattern = posixpath.join(base, *parts[first_glob:])
                recursive = len(parts) - first_glob > 1 or "**" in pattern
                infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=recursive))
                source = sorted(
                    i.path
                    for i in infos
                    if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern)
                )
            else:
                source = sorted(glob.glob(path, recursive=True))
            if not source:
                raise DataError(f"no parquet files match {path!r}; check the glob pattern")
        return ds.dataset(source, filesystem=filesystem, format="parquet")
    except FileNotFoundError as error:
        raise DataError(
            f"parquet data not found at {path!r}; pass an existing file, folder, glob or URI"
        ) from error
    except (pa.ArrowInvalid, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read parquet at {path!r} ({first}); check the path") from error


def _require_columns(names: list[str], wanted: list[str], path, schema=None, feature_column: str | None = None
                     ) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(
            f"column(s) {', '.join(map(repr, missing))} not in parquet {path}; "
            f"available columns: {', '.join(names)}"
            + (image_column_hint(schema) if feature_column in missing else "")
        )


def holds_encoded_images(kind) -> bool:
    """Whether a pyarrow type can hold encoded images: binary, or Hugging Face's struct with a binary ``bytes``."""
    import pyarrow as pa

    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        kind = kind.field("bytes").type
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def image_column_hint(schema) -> str:
    """When the feature column is missing: "; ... set data.image_column=NAME" if ``schema`` (a pyarrow schema) has a
    column of encoded images (``holds_encoded_images``), else ""."""
    for f in schema or ():
        if holds_encoded_images(f.type):
            return f"; column {f.name!r} looks like encoded images: set data.image_column={f.name}"
    return ""


def check_image_column(schema, column: str, where: str) -> None:
    """``data.image_column`` must name a column of encoded images: another type (a feature list, numbers) would
    fail in the image decoder, row by row, with a message that blames the file."""
    kind = schema.field(column).type
    if not holds_encoded_images(kind):
        raise DataError(f"data.image_column {column!r} of {where} holds {kind}, not encoded image bytes (PNG/JPEG); "
                        "set data.image_column to such a column, or null to read data.feature_column")


def row_length_error(feature_column: str, where: str, lengths, shape: tuple[int, ...]) -> DataError:
    """The one message for feature rows whose length does not fit ``data.shape`` (in-memory and streamed data)."""
    return DataError(
        f"feature column {feature_column!r} of {where} has length {', '.join(str(n) for n in lengths[:5])} per row "
        f"but data.shape {list(shape)} needs {math.prod(shape)}; fix data.shape or the data"
    )


def _flat_features(column, shape: tuple[int, ...], feature_column: str, where: str, copy: bool = True
                   ) -> np.ndarray:
    """(N,) list column of floats (a pyarrow Array or ChunkedArray) -> (N, *shape) float32, checking every row's
    length (a fixed-size binary column of 8-bit pixels, or lists of uint8 for an image shape (``is_pixel_list``):
    (N, *shape) uint8). The in-memory loader and the streamed
    batches (``stream.to_arrays``) both check rows with it. ``copy=False``: float32 values (and pixels) stay a
    (read-only) view of Arrow's buffer, for a caller that copies them."""
    shape = tuple(shape)
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        # one chunk (a streamed batch usually is): use it as it is; combine_chunks would copy every value once
        # more (Arrow concatenates even a single list chunk): 2.9 -> 1.7 CPU-ms per 1,000 CIFAR-sized rows in
        # 64-row slices, a small part of the 43-60 a streamed worker spends reading them
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    # a row as one binary value (``write_parquet``): 8-bit pixels (with ``pixel_stats``) or float32 values; only
    # with their metadata (``stored_pixel_stats`` checks it before any read)
    as_bytes = pa.types.is_fixed_size_binary(column.type)
    if not (
        as_bytes
        or pa.types.is_list(column.type)
        or pa.types.is_large_list(column.type)
        or pa.types.is_fixed_size_list(column.type)
    ):
        raise DataError(
            f"feature column {feature_column!r} has type {column.type}, not a list of floats; "
            "store one float list per row, flat or nested one level per dimension (or use image_column for "
            "encoded images)"
        )
    if column.null_count:
        raise DataError(
            f"feature column {feature_column!r} has {column.null_count} empty rows; drop them"
        )
    need = math.prod(shape)
    if as_bytes:  # uint8 (N, *shape), a view of Arrow's buffer, for the caller to standardize (``standardize_pixels``),
        # or float32 samples stored as their bytes (``write_parquet``): 4 bytes a value
        dtype = {need: np.dtype(np.uint8), 4 * need: np.dtype("<f4")}.get(column.type.byte_width)
        if dtype is None:
            raise row_length_error(feature_column, where, [column.type.byte_width], shape)
        values = np.frombuffer(column.buffers()[1], dtype, count=len(column) * need,
                               offset=column.offset * column.type.byte_width)
        return (values.copy() if copy else values).reshape(len(column), *shape)
    dtype = np.uint8 if is_pixel_list(column.type, shape) else np.float32  # 8-bit images: uint8 (see there)
    if len(column) == 0:  # no rows (a batch whose rows all belong to another split): no length to check
        return np.zeros((0, *shape), dtype)
    if _is_list(column.type.value_type):  # nested lists, one level per dimension: what HF datasets' Array2D/3D
        # features and ``x.tolist()`` of a (N, C, H, W) array write
        return _nested_features(column, shape, feature_column, where, dtype)
    if pa.types.is_fixed_size_list(column.type):  # every row has the type's length: no need to count them
        if column.type.list_size != need:
            raise row_length_error(feature_column, where, [column.type.list_size], shape)
    else:
        lengths = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False))
        if len(lengths) != 1 or lengths[0] != need:
            raise row_length_error(feature_column, where, lengths, shape)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=copy)
    return values.reshape(len(column), *shape)


def _is_list(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def is_pixel_list(kind, shape: Sequence[int]) -> bool:
    """Whether a feature column of type ``kind`` holds 8-bit images: lists (flat or nested) of uint8 for an image
    ``shape`` (C, H, W), as numpy's uint8 images, torchvision's ``PILToTensor`` output or Hugging Face's
    ``Array3D(dtype="uint8")`` are written. They are read as images are (``pixels_to_float``, then per channel with
    the training data's statistics), not as numbers 0..255: torchvision's ``ToTensor`` and ``Normalize`` do the
    same to them. uint8 lists of other shapes (counts, codes) stay numbers, as every float list does."""
    import pyarrow as pa

    while _is_list(kind):
        kind = kind.value_type
    return len(shape) == 3 and pa.types.is_uint8(kind)


def _nested_features(column, shape: tuple[int, ...], feature_column: str, where: str, dtype=np.float32
                     ) -> np.ndarray:
    """A column of nested lists, one nesting level per dimension of ``data.shape`` -> (N, *shape) ``dtype``. Each
    level's lengths must be the shape's, the same in every row: a (4, 2, 4) nesting read as (2, 4, 4), or a
    (C, H * W) one as (C, H, W), would only be the same floats in another layout, so either is a one-line error,
    not a reshape. Written here: Arrow has no "nested lists to a tensor" conversion (``to_numpy`` gives arrays of
    arrays)."""
    import pyarrow.compute as pc

    found, level = [], column
    while _is_list(level.type):
        if level.null_count:
            raise DataError(f"feature column {feature_column!r} of {where} has {level.null_count} missing "
                            f"{'rows' if not found else 'nested lists'}; drop those rows")
        lengths = ([level.type.list_size] if hasattr(level.type, "list_size")
                   else np.unique(pc.list_value_length(level).to_numpy(zero_copy_only=False)).tolist())
        if len(lengths) != 1:  # ragged: rows (or their nested lists) of different lengths at this level
            raise DataError(f"feature column {feature_column!r} of {where} holds nested lists of different lengths "
                            f"({', '.join(map(str, lengths[:5]))}) at nesting level {len(found) + 1}; every row must "
                            f"be one array of data.shape {list(shape)}")
        found.append(int(lengths[0]))
        level = level.flatten()
    if tuple(found) != shape:
        raise DataError(f"feature column {feature_column!r} of {where} holds nested lists of shape {found} per row "
                        f"but data.shape is {list(shape)}; set data.shape to {found} or write flat rows")
    return level.to_numpy(zero_copy_only=False).astype(dtype).reshape(len(column), *shape)


@dataclass
class _Part:
    """The rows read from one parquet location, plus what the split checks compare."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    has_ids: bool  # False: ids are row numbers (no id column)
    normalize: bool  # decoded images (and uint8 lists of an image shape) are standardized; float lists taken as is
    hint: int  # class count from the schema metadata (0: none)
    schema: dict[str, str]  # column -> type, of the columns read
    split: np.ndarray | None  # values of the split column, when one is used
    split_column: str | None
    pixels: tuple | None = None  # (mean, std): x holds 8-bit pixels to standardize (``stored_pixel_stats``)

    def take(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x[mask], self.y[mask], self.ids[mask]


def _load_parquet(path, label_column, feature_column, image_column, id_column, shape, image_size,
                  split_column: str | None = None, split_from_metadata: bool = False,
                  declared: str | None = None) -> _Part:
    """Read one parquet location. ``split_column`` (or, with ``split_from_metadata``, the column that
    ``raydistill data prepare`` named in the schema metadata) is read too, for the caller to split on.
    ``declared``: the location is that declared split, ``shape`` the training data's (``flat_feature_shape``)."""
    import pyarrow as pa

    dataset = _parquet_dataset(path)
    names = dataset.schema.names
    metadata = dataset.schema.metadata or {}
    if split_column is None and split_from_metadata and _META_SPLIT_COLUMN in metadata:
        split_column = metadata[_META_SPLIT_COLUMN].decode()
    data_column = image_column if image_column is not None else feature_column
    _require_columns(names, [label_column, data_column] + ([split_column] if split_column else []), path,
                     dataset.schema, feature_column if image_column is None else None)
    columns = [label_column, data_column] + ([id_column] if id_column in names else [])
    columns += [split_column] if split_column else []
    pixels = None
    if image_column is None:  # before the read: a shape the files contradict is an error, not a read
        shape = flat_feature_shape(shape, metadata, path, split=declared)
        pixels = stored_pixel_stats(metadata, path, shape, dataset.schema.field(feature_column).type)
    else:
        check_image_column(dataset.schema, image_column, f"parquet data at {path}")
    try:
        table = dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as error:  # a corrupt or truncated file: pyarrow names it in the message
        raise DataError(f"cannot read parquet data at {path} ({str(error).splitlines()[0][:200]}); "
                        "replace or remove the unreadable file") from None
    if table.num_rows == 0:
        raise DataError(f"parquet data at {path} has no rows; point path at non-empty data")

    label_values = table[label_column]
    if label_values.null_count:
        raise DataError(f"label column {label_column!r} has missing values; drop those rows")
    y = _labels(label_values.to_numpy(), f"column {label_column!r} of {path}")
    has_ids = id_column in names
    ids = table[id_column].to_numpy().astype(np.int64) if has_ids else np.arange(table.num_rows, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(
            f"id column {id_column!r} has duplicate ids in {path}; make ids unique or drop the column"
        )

    if image_column is not None:
        encoded = table[image_column].to_pylist()
        x = np.stack(
            [
                _decode_image(
                    item["bytes"] if isinstance(item, dict) else item,  # HF-style struct too
                    image_size,
                    f"in row {row} (id {ids[row]}) of column {image_column!r}",
                )
                for row, item in enumerate(encoded)
            ]
        ).astype(np.float32)
        normalize = True
    else:
        x = _flat_features(table[feature_column], shape, feature_column, str(path))
        normalize = x.dtype == np.uint8 and pixels is None  # lists of 8-bit pixels: standardized as images are
        if normalize:
            x = pixels_to_float(x)
    split = None
    if split_column:
        split = np.asarray(table[split_column].to_pylist(), dtype=object)
        unknown = sorted({str(v) for v in set(split.tolist())} - set(SPLIT_NAMES))
        if unknown:
            raise DataError(f"split column {split_column!r} of {path} holds {', '.join(map(repr, unknown[:3]))}; "
                            f"its values must be {', '.join(SPLIT_NAMES)}")
    hint = int(metadata[_META_NUM_CLASSES]) if _META_NUM_CLASSES in metadata else 0
    schema = {c: str(dataset.schema.field(c).type) for c in columns if c != split_column}
    return _Part(x, y, ids, has_ids, normalize, hint, schema, split, split_column, pixels)


def _check_same_schema(name: str, part: _Part, train: _Part, location) -> None:
    """A declared split file must have the training data's columns and types."""
    for column, kind in train.schema.items():
        if part.schema.get(column, "missing") != kind:
            raise DataError(f"declared {name} split {location} has a different schema: column {column!r} is "
                            f"{part.schema.get(column, 'missing')} there but {kind} in the training data; "
                            "write every split with the same columns and types")


def _check_disjoint(parts: dict[str, np.ndarray]) -> None:
    """No sample id in two splits (``parts``: split name -> ids)."""
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = np.intersect1d(parts[a], parts[b])
            if len(both):
                raise DataError(f"{len(both)} sample ids are in both the {a} and the {b} split (e.g. ids "
                                f"{both[:3].tolist()}); a sample must be in one split only: fix the split files")


# ---------------------------------------------------------------------------------
# Public API


def load_splits(
    source: str = "digits",
    *,
    root=None,
    path=None,
    train=None,
    val=None,
    test=None,
    split_column: str | None = None,
    label_column: str = "label",
    feature_column: str = "features",
    image_column: str | None = None,
    id_column: str = "id",
    shape: Sequence[int] | None = None,
    image_size: int | Sequence[int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> Splits:
    """Load ``source`` into memory and split it deterministically into train/val/test.

    Which arguments each source uses:
    ``digits``: ``image_size`` (resize; default native 8);
    ``cifar10``: ``root``, ``image_size`` (default native 32); test is the official
    test set, val is carved from the official train set and ``test_fraction`` is unused;
    ``imagefolder``: ``root``, ``image_size`` (default 32), images decoded to RGB;
    ``image_size`` is an int (a square) or (height, width);
    ``parquet``: ``path`` (or ``train``), ``label_column``, ``id_column`` (used when present, else row
    order), and either ``feature_column`` + ``shape`` (1 to 3 dims) or ``image_column`` + ``image_size``;
    declared splits ``val`` / ``test`` (file, folder, glob or URI each) or ``split_column``.

    A declared split is used as is. Otherwise test is carved from the training pool and val from what
    is left, stratified by class when every class has >= 2 samples; same ``seed`` -> identical ids in
    every split. ``limit`` keeps the first ``limit`` samples of each split after splitting and
    normalizing (for smoke tests). Class count = max label of the training pool + 1 (or the schema's).
    """
    source = str(source).strip().lower()
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; use one of: {', '.join(SOURCES)}")
    for label, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{label} must be in [0, 1), got {value!r}")
    image_size = image_hw(image_size)  # (height, width) or None (native size) from here on
    decoded = image_size or (32, 32)  # the size decoded images get (image folders, encoded images in Parquet)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if source != "parquet" and (train or val or test or split_column):
        raise DataError(f"data.train/val/test and data.split_column declare splits of parquet data; the {source} "
                        "source has its own; remove them or use data.source=parquet")

    declared: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # split name -> (x, y, ids)
    pixels = None  # (mean, std) of 8-bit pixel features (the training data's raydistill.pixels metadata)
    origin: dict[str, str] = {}
    hint = 0
    if source == "digits":
        pool, where = _load_digits(image_size), "scikit-learn's digits"
        normalize = True
    elif source == "cifar10":
        (pool, declared["test"]), where = _load_cifar10(root, image_size), "the official CIFAR-10 training batches"
        origin["test"] = "declared: the official CIFAR-10 test batch"
        normalize = True
    elif source == "noisy_digits":
        (pool, declared["test"]), where = (_load_noisy_digits(image_size, test_fraction, seed),
                                           f"scikit-learn's digits, {NOISY_LABEL_RATE:.0%} of the labels wrong")
        origin["test"] = f"declared: a stratified {test_fraction} of the digits, true labels (data.seed={seed})"
        normalize = True
    elif source == "imagefolder":
        layout = imagefolder_splits(root) if root is not None and os.path.isdir(root) else None
        x, y, ids, classes = _load_imagefolder(layout["train"] if layout else root, decoded)
        pool, hint, normalize = (x, y, ids), len(classes), True
        where = f"the image folder {layout['train'] if layout else root}"
        offset = len(ids)
        for name in ("val", "test"):
            if layout and name in layout:  # declared by the folder layout: used as is, ids after the others
                vx, vy, vids, _ = _load_imagefolder(layout[name], decoded,
                                                    {c: i for i, c in enumerate(classes)})
                declared[name] = (vx, vy, vids + offset)
                offset += len(vids)
                origin[name] = f"declared: the image folder {layout[name]}"
    else:
        if split_column and (train or val or test):
            raise DataError("declare splits either as files (data.train/val/test) or with data.split_column, "
                            "not both; remove one")
        if train and path and os.fspath(train) != os.fspath(path):
            raise DataError("data.train and data.path both name the training data; set only one")
        location = train or path
        if location is None and (val or test):
            raise DataError("data.val / data.test need the training data too; set data.train (or data.path)")
        read = dict(label_column=label_column, feature_column=feature_column, image_column=image_column,
                    id_column=id_column, shape=shape, image_size=decoded)
        part = _load_parquet(location, **read, split_column=split_column, split_from_metadata=not (val or test))
        normalize, hint, where, pixels = part.normalize, part.hint, f"{location}", part.pixels
        if part.split is not None:
            for name in ("val", "test"):
                mask = part.split == name
                if mask.any():
                    declared[name] = part.take(mask)
                    origin[name] = f"declared: rows with {part.split_column} == '{name}' in {location}"
            pool = part.take(part.split == "train")
            where = f"rows with {part.split_column} == 'train' in {location}"
            if not len(pool[1]):
                raise DataError(f"split column {part.split_column!r} of {location} marks no row 'train'; "
                                "mark the training rows")
        else:
            pool = (part.x, part.y, part.ids)
        offset = int(part.ids.max()) + 1
        for name, loc in (("val", val), ("test", test)):
            if not loc:
                continue
            if image_column is None:  # feature columns: read in the training data's shape
                read["shape"] = part.x.shape[1:]
            other = _load_parquet(loc, **read, declared=name)
            _check_same_schema(name, other, part, loc)
            if not (other.has_ids and part.has_ids):  # row numbers: each file numbered after the last
                other.ids = other.ids + offset
            offset = max(offset, int(other.ids.max()) + 1)
            declared[name] = (other.x, other.y, other.ids)
            origin[name] = f"declared: data.{name}={loc}"
            hint = max(hint, other.hint)

    x, y, ids = pool
    n = len(y)
    n_test = 0 if "test" in declared else int(round(test_fraction * n))
    n_val = 0 if "val" in declared else int(round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training "
            f"samples out of {n}; lower the fractions or add data"
        )
    index = np.arange(n)
    rest, test_index = _split_off(index, y, n_test, seed)
    train_index, val_index = _split_off(rest, y, n_val, seed + 1)
    carved = {"test": (test_index, f"data.test_fraction={test_fraction}"),
              "val": (val_index, f"data.val_fraction={val_fraction}")}
    num_classes = max(int(y.max()) + 1, hint)
    parts = [(x[train_index], y[train_index], ids[train_index])]
    for name in ("val", "test"):
        if name in declared:
            labels = declared[name][1]
            if labels.size and labels.max() >= num_classes:
                raise DataError(f"the declared {name} split has label {int(labels.max())} but the training data "
                                f"has classes 0..{num_classes - 1}; fix the labels or the split files")
            parts.append(declared[name])
        else:
            index_out, fraction = carved[name]
            parts.append((x[index_out], y[index_out], ids[index_out]))
            origin[name] = f"carved at random from {where} ({fraction}, data.seed={seed})"
    origin["train"] = where + (" less the carved splits" if n_test or n_val else "")
    _check_disjoint({name: p[2] for name, p in zip(SPLIT_NAMES, parts)})
    xs = [p[0] for p in parts]
    stats = pixels
    if pixels is not None:  # every split with the training data's statistics, as prepare standardized them
        xs = [standardize_pixels(a, pixels) for a in xs]
    if normalize:
        xs, stats = _standardize(xs[0], xs[1:])
    sample = tuple(int(s) for s in xs[0].shape[1:])
    arrays = [
        Arrays(
            np.ascontiguousarray(xi[:limit], dtype=np.float32),
            np.ascontiguousarray(yi[:limit], dtype=np.int64),
            np.ascontiguousarray(ii[:limit], dtype=np.int64),
            num_classes,
            sample,
        )
        for xi, (_, yi, ii) in zip(xs, parts)
    ]
    return Splits(*arrays, num_classes=num_classes, shape=sample, name=source, origin=origin, channel_stats=stats)


def shard_indices(
    y: np.ndarray, num_shards: int, rank: int, mode: str = "random", seed: int = 0
) -> np.ndarray:
    """Sorted indices into ``y`` (N,) of worker ``rank``'s shard out of ``num_shards``.

    Every shard has the same size, because DDP needs equal step counts per worker:
    ``random``: a seeded permutation cut into equal shards; the N % num_shards left-over
    samples are dropped. ``classwise`` (non-IID): class c goes to shard
    c * num_shards // K, so each shard sees a contiguous block of classes; every shard is
    then truncated (a seeded random subset) to the smallest shard's size, so samples of
    larger shards are dropped. Shards are disjoint for a fixed seed.
    """
    y = np.asarray(y)
    if mode not in SHARD_MODES:
        raise DataError(f"unknown shard mode {mode!r}; use one of: {', '.join(SHARD_MODES)}")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise DataError(f"num_shards must be a positive integer, got {num_shards!r}")
    if not isinstance(rank, int) or not 0 <= rank < num_shards:
        raise DataError(f"rank must be in [0, {num_shards}), got {rank!r}")
    labels = _labels(y, "shard_indices") if y.ndim == 1 else None
    if labels is None:
        raise DataError(f"y must be a 1-D label array, got shape {y.shape}")
    n = len(labels)
    rng = np.random.default_rng(seed)
    if mode == "random":
        per_shard = n // num_shards
        if per_shard == 0:
            raise DataError(
                f"cannot split {n} samples into {num_shards} non-empty shards; "
                "use fewer workers or more data"
            )
        permutation = rng.permutation(n)
        return np.sort(permutation[rank * per_shard : (rank + 1) * per_shard])

    num_classes = int(labels.max()) + 1 if n else 0
    shard_of_sample = labels * num_shards // max(num_classes, 1)
    sizes = np.bincount(shard_of_sample, minlength=num_shards)
    if num_classes < num_shards or sizes.min() == 0:
        raise DataError(
            f"classwise sharding of {num_classes} classes over {num_shards} shards leaves a "
            "shard empty; use mode='random' or fewer workers"
        )
    # One permutation per shard, drawn in shard order, so the result doesn't depend on
    # which rank asks.
    per_shard = int(sizes.min())
    keep = None
    for shard in range(num_shards):
        members = np.flatnonzero(shard_of_sample == shard)
        chosen = rng.permutation(members)[:per_shard]
        if shard == rank:
            keep = chosen
    return np.sort(keep)


def write_parquet(arrays: Arrays, path, rows_per_file: int | None = None, split: np.ndarray | None = None,
                  pixel_stats: tuple | None = None) -> list[str]:
    """Write ``arrays`` as parquet with columns ``id`` (int64), ``label`` (int64) and ``features``: each row's
    float32 values (x flattened, C order, little-endian) as one fixed-size binary value, marked float32 in the schema
    metadata (``raydistill.tensor``); returns the files written. Why bytes and not list<float32>: Parquet decodes a
    list one value at a time with its repetition and definition levels; one binary value a row is copied. On
    CIFAR-sized rows pyarrow's reading costs 0.30x the machine CPU so, and a streamed worker's 0.73x (15 against 49,
    92 against 126 CPU-ms per 1,000 rows: docs/benchmarks.md, "Streaming: where a streamed epoch's CPU goes"), at
    the same size on disk; Petastorm's ndarray codec stores tensors as bytes for the same reason. Every reader here
    gives back the same float32 values (``_flat_features``); a float list column from elsewhere reads as before.

    ``pixel_stats`` = (mean, std) per channel: ``arrays.x`` holds (N, C, H, W) uint8 pixels (``to_pixels``),
    written as a fixed-size binary column (each row's C x H x W bytes in that order) with those statistics in the
    schema metadata; every reader gives ``standardize_pixels`` of them (the floats they were made from). Why bytes
    and not a list<uint8>: Parquet has no 8-bit type, so a list stores each pixel as a dictionary-encoded INT32
    with its own repetition and definition levels, and decoding them costs about what float32 lists cost (16
    against 20 CPU-ms per 1,000 CIFAR-sized rows); one binary value a row reads in ~1 (docs/benchmarks.md,
    "Streaming: where a streamed epoch's CPU goes"), at the same size on disk (a quarter of float32's).

    ``rows_per_file=None`` writes the single file ``path``; otherwise ``path`` is a
    folder of ``part-NNNNN.parquet`` files (it must not exist or be empty). The shape
    and class count go into the schema metadata, so ``load_splits("parquet", path=...)``
    needs no ``shape``. ``split`` (N,) of "train"/"val"/"test" adds a ``split`` column, named in the
    metadata as the split column, so the loader keeps exactly these splits. Rows grouped by split (as
    ``raydistill data prepare`` orders them) give files of one split each (a new file starts where the
    split changes), so a streamed split reads only its own files (``stream.plan_stream``); interleaved
    rows are cut into files of ``rows_per_file`` as they come. Atomic: everything is
    written under a temporary name in the same folder (hidden, so readers skip it) and moved into
    place with ``os.replace``.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if rows_per_file is not None and (not isinstance(rows_per_file, int) or rows_per_file < 1):
        raise DataError(f"rows_per_file must be a positive integer or None, got {rows_per_file!r}")
    if (pixel_stats is not None) != (arrays.x.dtype == np.uint8):
        raise ValueError("write_parquet writes uint8 x as 8-bit pixels, with pixel_stats, and only those")
    n = len(arrays)
    if pixel_stats is not None:
        width = math.prod(arrays.shape)
        features = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(arrays.x).reshape(-1))])
    else:
        flat = np.ascontiguousarray(arrays.x.reshape(n, math.prod(arrays.shape)), dtype="<f4")
        features = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(4 * flat.shape[1]), n, [None, pa.py_buffer(flat.reshape(-1).view(np.uint8))])
    columns = {
        "id": pa.array(np.asarray(arrays.ids, dtype=np.int64)),
        "label": pa.array(np.asarray(arrays.y, dtype=np.int64)),
        "features": features,
    }
    metadata = {
        _META_SHAPE: ",".join(str(s) for s in arrays.shape).encode(),
        _META_NUM_CLASSES: str(int(arrays.num_classes)).encode(),
    }
    if pixel_stats is not None:  # float32 statistics as exact decimals (a float32 is exactly a Python float)
        metadata[_META_PIXELS] = json.dumps({"mean": list(pixel_stats[0]), "std": list(pixel_stats[1])}).encode()
    else:
        metadata[_META_TENSOR] = b"float32"
    if split is not None:
        split = np.asarray([str(v) for v in split], dtype=object)  # the column, and where grouped rows change split
        columns["split"] = pa.array(split, type=pa.string())
        metadata[_META_SPLIT_COLUMN] = b"split"
    table = pa.table(columns).replace_schema_metadata(metadata)

    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
    if rows_per_file is None:
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return [path]

    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise DataError(f"refusing to overwrite {path}; pass a new or empty folder")
    names = []
    try:
        os.makedirs(tmp)
        runs = [(0, n)]
        if split is not None and n:
            cuts = [0, *(np.flatnonzero(split[1:] != split[:-1]) + 1).tolist(), n]
            if len(cuts) - 1 == len(set(split.tolist())):  # grouped: one run per split value
                runs = list(zip(cuts[:-1], cuts[1:]))
        starts = [(start, min(rows_per_file, end - start)) for begin, end in runs
                  for start in range(begin, max(end, begin + 1), rows_per_file)]
        for part, (start, rows) in enumerate(starts):
            name = f"part-{part:05d}.parquet"
            pq.write_table(table.slice(start, rows), os.path.join(tmp, name))
            names.append(name)
        os.replace(tmp, path)  # POSIX: a directory may replace an empty directory
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return [os.path.join(path, name) for name in names]


def fingerprint(splits: Splits) -> str:
    """sha256 hex digest over x, y and ids of train, val and test (dtype, shape and bytes),
    plus the class count; equal data gives equal keys, so it can key caches."""
    digest = hashlib.sha256()
    digest.update(f"num_classes={splits.num_classes}".encode())
    for part in (splits.train, splits.val, splits.test):
        for array in (part.x, part.y, part.ids):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()
