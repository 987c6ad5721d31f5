"""The user's own classification data: a ``.npz`` file, a ``.csv`` file, or a folder of images per class.

:func:`load_user_data` reads one of three formats and returns a
:class:`~divergent.data.vision.ClassificationData` with train/val/test splits:

``.npz`` (``numpy.savez``), read with ``allow_pickle=False``:
    ``X`` (inputs) and ``y`` (labels, numbers or strings), the same length. Optionally the test
    split as ``X_test``/``y_test``, or a ``split`` array beside ``X`` holding ``"train"``,
    ``"val"``, ``"test"`` (or ``0``, ``1``, ``2``) per example. ``X`` of shape ``[n, d]`` is a
    feature vector per example; ``[n, H, W]`` a grey image; ``[n, C, H, W]`` an image with C
    channels — except that a ``uint8`` array whose last axis is 1, 3 or 4 long and whose second
    axis is not is read as ``[n, H, W, C]`` (the layout of PIL and NumPy images). ``uint8``
    images are scaled to [0, 1]; other images are taken as they are.
a folder in ImageFolder layout:
    one sub-folder per class holding its images (searched recursively; files with the
    extensions torchvision's ImageFolder reads: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff
    .webp). Classes are the sub-folder names, sorted as torchvision sorts them. Images are read
    with Pillow, resized (bilinear) to ``image_size`` (default: the most common size in the
    folder), grey when every image is grey and RGB otherwise (alpha dropped), scaled to [0, 1].
``.csv`` with ``label_column``:
    one row per example; the label column may hold any values (numbers or text); every other
    column is a numeric feature.

Labels of any type become class indices 0..K-1 in sorted order of their values; the values
are kept as ``class_names``. Where no split is given, a stratified 60/20/20 train/val/test
split fixed by ``split_seed``; with a test split but no validation examples, a stratified
quarter of the rest becomes the validation split. With ``normalize`` (the default), feature
vectors are standardised and images normalised per channel, with the mean and standard
deviation of the training split only; without it, the values are used as read (features as
stored, images in [0, 1]) — what a teacher trained on the raw values expects.

Every problem is a ``ValueError`` (``FileNotFoundError`` for a missing path) naming the file
and what was expected: an unreadable file, missing ``X``/``y``, lengths that differ, NaN or
infinite features, a non-numeric feature column, fewer than 2 classes, an empty class folder,
a class with too few examples to split, an unknown extension.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from divergent.data.vision import ClassificationData, stratified_split

__all__ = ["load_user_data", "IMAGE_EXTENSIONS", "SPLIT_VALUES", "DEFAULT_FRACTIONS"]

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_VALUES = {"train": 0, "val": 1, "test": 2, 0: 0, 1: 1, 2: 2}
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
_UNSPLIT = -1  # train or val, to be split


@dataclass
class _Read:
    """What a reader found: inputs, raw labels, a split per row (or None), and how to fingerprint it."""

    x: np.ndarray
    labels: np.ndarray
    split: np.ndarray | None
    is_image: bool
    fingerprint: str


def _digest(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- .npz


def _npz_array(arrays, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(arrays[key])
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise ValueError(f"data {path}: array {key!r} could not be read without unpickling ({exc}); store "
                         f"numbers, or labels as fixed-width strings (np.array(labels, dtype=str))") from None


def _read_npz(path: Path) -> _Read:
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = list(arrays.keys())
    except Exception as exc:
        raise ValueError(f"data {path} could not be read as a .npz file (numpy.savez): {exc}") from None
    missing = [k for k in ("X", "y") if k not in keys]
    if missing:
        raise ValueError(f"data {path} has no array {' or '.join(map(repr, missing))}; a .npz needs X (inputs) and "
                         f"y (labels), optionally X_test/y_test or split; found: {', '.join(keys) or 'nothing'}")
    x, y = _npz_array(arrays, "X", path), _npz_array(arrays, "y", path)
    _check_pair(x, y, "X", "y", path)
    split = None
    has_test = [k in keys for k in ("X_test", "y_test")]
    if any(has_test) and not all(has_test):
        raise ValueError(f"data {path} has {'X_test' if has_test[0] else 'y_test'} without "
                         f"{'y_test' if has_test[0] else 'X_test'}; give both or neither")
    if "split" in keys and all(has_test):
        raise ValueError(f"data {path} has both a split array and X_test/y_test; give the test split one way")
    if all(has_test):
        x_test, y_test = _npz_array(arrays, "X_test", path), _npz_array(arrays, "y_test", path)
        _check_pair(x_test, y_test, "X_test", "y_test", path)
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"data {path}: X_test has examples of shape {x_test.shape[1:]}, X of shape {x.shape[1:]}")
        split = np.concatenate([np.full(len(x), _UNSPLIT), np.full(len(x_test), 2)])
        x, y = np.concatenate([x, x_test]), np.concatenate([y, y_test])
    elif "split" in keys:
        split = _split_codes(_npz_array(arrays, "split", path), len(x), path)
    if x.dtype == bool:
        x = x.astype(np.uint8)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"data {path}: X has dtype {x.dtype}; expected numbers")
    if x.ndim == 2:
        is_image = False
    elif x.ndim == 3:
        x, is_image = x[:, None], True
    elif x.ndim == 4:
        channels_last = x.dtype == np.uint8 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        x, is_image = (x.transpose(0, 3, 1, 2) if channels_last else x), True
    else:
        raise ValueError(f"data {path}: X has shape {x.shape}; expected [n, d] feature vectors, [n, H, W] grey "
                         f"images or [n, C, H, W] images")
    if is_image and x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    arrays_bytes = _file_digest(path)
    return _Read(x.astype(np.float32), y, split, is_image, arrays_bytes)


def _check_pair(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str, path: Path) -> None:
    if x.ndim < 2:
        raise ValueError(f"data {path}: {x_name} has shape {x.shape}; expected one row per example "
                         f"([n, d] features or [n, ...] images)")
    if y.ndim != 1:
        raise ValueError(f"data {path}: {y_name} has shape {y.shape}; expected one label per example, shape [n]")
    if len(x) != len(y):
        raise ValueError(f"data {path}: {x_name} has {len(x)} examples but {y_name} has {len(y)} labels; "
                         f"they must be the same length")


def _split_codes(split: np.ndarray, n: int, path: Path) -> np.ndarray:
    if split.shape != (n,):
        raise ValueError(f"data {path}: split has shape {split.shape}; expected one entry per example, shape ({n},)")
    values = split.tolist()
    bad = sorted({str(v) for v in values if v not in SPLIT_VALUES or isinstance(v, bool)})
    if bad:
        raise ValueError(f"data {path}: split holds {', '.join(bad[:5])}; expected 'train', 'val', 'test' (or 0, 1, 2)")
    codes = np.array([SPLIT_VALUES[v] for v in values], dtype=np.int64)
    if not (codes == 0).any() or not (codes == 2).any():
        raise ValueError(f"data {path}: split must mark some examples 'train' and some 'test'")
    if not (codes == 1).any():
        codes[codes == 0] = _UNSPLIT  # no validation examples: a quarter of train becomes val
    return codes


# ----------------------------------------------------------------------------------- .csv


def _read_csv(path: Path, label_column: str) -> _Read:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except Exception as exc:
        raise ValueError(f"data {path} could not be read as a .csv file: {' '.join(str(exc).split())[:200]}") from None
    columns = [str(c) for c in frame.columns]
    if not label_column:
        raise ValueError(f"data {path} is a .csv: name its label column with --label-column (label_column); "
                         f"columns: {', '.join(columns)}")
    if label_column not in columns:
        from divergent.config import suggest

        raise ValueError(f"data {path} has no column {label_column!r}{suggest(label_column, columns, 'column')}; "
                         f"columns: {', '.join(columns)}")
    if len(frame) == 0:
        raise ValueError(f"data {path} has no rows")
    labels = frame[label_column]
    if labels.isna().any():
        raise ValueError(f"data {path}: label column {label_column!r} is empty in {int(labels.isna().sum())} row(s)")
    features = frame.drop(columns=[label_column])
    if features.shape[1] == 0:
        raise ValueError(f"data {path} has no feature column besides the label column {label_column!r}")
    for column in features.columns:
        if not (pd.api.types.is_numeric_dtype(features[column]) or pd.api.types.is_bool_dtype(features[column])):
            example = next((v for v in features[column] if isinstance(v, str)), features[column].iloc[0])
            raise ValueError(f"data {path}: column {column!r} is not numeric (e.g. {example!r}); every column "
                             f"but the label column {label_column!r} must hold numbers — drop or encode it")
    empty = [str(c) for c in features.columns if features[c].isna().any()]
    if empty:
        raise ValueError(f"data {path}: column(s) {', '.join(map(repr, empty))} have empty or NaN values; "
                         f"fill or drop them")
    x = features.to_numpy(dtype=np.float64).astype(np.float32)
    values = labels.to_numpy()
    if values.dtype == object:
        values = values.astype(str)
    return _Read(x, values, None, False, _digest(_file_digest(path), label_column))


# ------------------------------------------------------------------------------- ImageFolder


def _image_files(folder: Path) -> list[Path]:
    files = []
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(root) / name)
    return files


def _read_image_folder(folder: Path, image_size: int) -> _Read:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise ValueError(f"data {folder} is a folder without sub-folders; expected the ImageFolder layout: one "
                         f"sub-folder of images per class")
    files, labels = [], []
    for name in classes:
        found = _image_files(folder / name)
        if not found:
            raise ValueError(f"data {folder}: class folder {name!r} holds no images (looked for "
                             f"{' '.join(IMAGE_EXTENSIONS)}); an empty class cannot be learnt — add images or remove it")
        files += found
        labels += [name] * len(found)
    sizes, modes = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
                modes.append(image.mode)
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"data {folder}: image {path} could not be read: {exc}") from None
    grey = all(mode in ("1", "L", "I", "I;16", "F") for mode in modes)
    size = (image_size, image_size) if image_size else Counter(sizes).most_common(1)[0][0]
    pixels = np.empty((len(files), size[1], size[0], 1 if grey else 3), dtype=np.uint8)
    digest = hashlib.sha256(f"{size}|{grey}".encode())
    for i, path in enumerate(files):
        data = path.read_bytes()
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(data).digest())
        try:
            with Image.open(path) as image:
                image = image.convert("L" if grey else "RGB")
                if image.size != size:
                    image = image.resize(size, Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"data {folder}: image {path} could not be read: {exc}") from None
        pixels[i] = array.reshape(size[1], size[0], -1)
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return _Read(x, np.array(labels), None, True, digest.hexdigest())


# ------------------------------------------------------------------------------------ common


def _class_indices(labels: np.ndarray, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    try:
        classes, indices = np.unique(labels, return_inverse=True)
    except TypeError as exc:
        raise ValueError(f"data {path}: labels of mixed types cannot be sorted ({exc}); use one type") from None
    if len(classes) < 2:
        raise ValueError(f"data {path} has {len(classes)} class ({', '.join(map(str, classes))}); a classifier "
                         f"needs at least 2 classes")
    return indices.astype(np.int64).reshape(-1), tuple(str(c) for c in classes.tolist())


def _assign_splits(y: np.ndarray, split: np.ndarray | None, names: tuple[str, ...], seed: int,
                   fractions: tuple[float, float, float], path: Path) -> list[np.ndarray]:
    if split is None:
        parts = stratified_split(y, list(fractions), seed=seed)
        for index, name in enumerate(names):
            counts = [int((y[part] == index).sum()) for part in parts]
            if min(counts) == 0:
                raise ValueError(
                    f"data {path}: class {name!r} has {int((y == index).sum())} example(s), too few to put one in "
                    f"each of train, val and test (a stratified {'/'.join(str(round(f * 100)) for f in fractions)} "
                    f"split, split_seed {seed}); give more examples of it, or give the split in the file")
        return parts
    parts = [np.flatnonzero(split == code) for code in (0, 1, 2)]
    rest = np.flatnonzero(split == _UNSPLIT)
    if len(rest):
        train, val = stratified_split(y[rest], [0.75, 0.25], seed=seed)
        parts[0], parts[1] = np.sort(np.concatenate([parts[0], rest[train]])), np.sort(np.concatenate([parts[1], rest[val]]))
    for index, name in enumerate(names):
        if not (y[parts[0]] == index).any():
            raise ValueError(f"data {path}: class {name!r} has no training example; every class needs one")
    if len(parts[1]) == 0:
        raise ValueError(f"data {path}: the validation split is empty; give more training examples")
    return parts


def load_user_data(
    path: str | os.PathLike,
    *,
    label_column: str = "",
    split_seed: int = 0,
    image_size: int = 0,
    normalize: bool = True,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> ClassificationData:
    """The user's data at ``path`` (``.npz``, ``.csv`` with ``label_column``, or an ImageFolder folder), split and scaled.

    See the module documentation for the formats, the detection rules and the errors.

    >>> import tempfile, numpy as np
    >>> f = Path(tempfile.mkdtemp()) / "blobs.npz"
    >>> np.savez(f, X=np.arange(40.0).reshape(20, 2), y=np.array(["a", "b"] * 10))
    >>> data = load_user_data(f)
    >>> len(data.train), len(data.val), len(data.test), data.input_shape, data.class_names
    (12, 4, 4, (2,), ('a', 'b'))
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data {path} does not exist; expected a .npz file, a .csv file or a folder with "
                                f"one sub-folder of images per class")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 0:
        raise ValueError(f"image_size must be an int >= 0 (0: the most common size), got {image_size!r}")
    if path.is_dir():
        read = _read_image_folder(path, image_size)
    elif path.suffix.lower() == ".npz":
        read = _read_npz(path)
    elif path.suffix.lower() == ".csv":
        read = _read_csv(path, label_column)
    else:
        raise ValueError(f"data {path}: unknown kind {path.suffix or '(no extension)'!r}; expected a .npz file "
                         f"(X, y), a .csv file (with --label-column) or a folder of class sub-folders (ImageFolder)")
    if label_column and path.suffix.lower() != ".csv":
        raise ValueError(f"label_column {label_column!r} is only read from a .csv file; {path} is not one")
    if not np.isfinite(read.x).all():
        bad = int((~np.isfinite(read.x)).reshape(len(read.x), -1).any(axis=1).sum())
        raise ValueError(f"data {path}: {bad} example(s) have NaN or infinite inputs; fix or drop them")
    y, names = _class_indices(read.labels, path)
    parts = _assign_splits(y, read.split, names, split_seed, fractions, path)
    x = torch.from_numpy(np.ascontiguousarray(read.x))
    if normalize:
        # Statistics of the training split only, per feature (vectors) or per channel (images).
        axes = (0, 2, 3) if read.is_image else (0,)
        train = x[torch.from_numpy(parts[0])]
        mean, std = train.mean(dim=axes, keepdim=True), train.std(dim=axes, keepdim=True)
        x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    labels = torch.from_numpy(y)

    def subset(idx: np.ndarray) -> TensorDataset:
        index = torch.from_numpy(idx)
        return TensorDataset(x[index].contiguous(), labels[index])

    fingerprint = _digest(read.fingerprint, f"seed={split_seed}", f"size={image_size}", f"norm={normalize}",
                          f"fractions={list(fractions)}")
    return ClassificationData(
        name=path.name, train=subset(parts[0]), val=subset(parts[1]), test=subset(parts[2]),
        num_classes=len(names), input_shape=tuple(x.shape[1:]), class_names=names, fingerprint=fingerprint[:16],
    )
