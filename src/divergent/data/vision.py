"""Image classification data: a split container, fast batch access, and a local CIFAR reader.

CIFAR-10/100 are read from the standard python-pickle releases already on disk
(``cifar-10-batches-py/`` and ``cifar-100-python/``); nothing is downloaded. Any
torch ``Dataset`` that yields ``(input, label)`` pairs also works with the
trainers through :class:`ClassificationData`.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

__all__ = [
    "ClassificationData",
    "AugmentedImageDataset",
    "get_batch",
    "stratified_split",
    "load_cifar",
    "CIFAR_STATS",
]

# Per-channel mean and std of the CIFAR training sets (standard values used by
# the CRD/mdistiller recipes), on pixels scaled to [0, 1].
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class ClassificationData:
    """Train/validation/test splits of one classification task.

    ``train``, ``val`` and ``test`` are any ``Dataset`` yielding ``(input, label)``;
    ``num_classes`` is the number of labels; ``input_shape`` is one input's shape
    (e.g. ``(1, 8, 8)`` for digits, ``(3, 32, 32)`` for CIFAR, ``(d,)`` for feature vectors).
    ``class_names`` names label 0, 1, ... when known (the user's files); ``fingerprint`` is a
    hash of the data and of how it was read, for cache keys ("" when unknown).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...] | None = None
    fingerprint: str = ""

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            if len(getattr(self, split)) == 0:
                raise ValueError(
                    f"{self.name}: the {split} split has no examples; every split needs some (for a split "
                    f"drawn from the data: more examples per class, or other fractions)"
                )


class AugmentedImageDataset(Dataset):
    """Images held as one tensor, with the CIFAR training augmentation applied on access.

    The augmentation is the standard one of the CIFAR distillation recipes: a random
    crop of the zero-padded image (``pad`` pixels each side) and a horizontal flip with
    probability 1/2. Randomness comes from torch's global generator, so it is
    reproduced exactly when a run resumes with the saved RNG state.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, augment: bool = True, pad: int = 4):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.augment = augment
        self.pad = pad

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        images, labels = self.get_batch(torch.tensor([index]))
        return images[0], labels[0]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[indices]
        labels = self.labels[indices]
        if not self.augment:
            return images, labels
        n, _, height, width = images.shape
        padded = torch.nn.functional.pad(images, (self.pad,) * 4)
        dy = torch.randint(0, 2 * self.pad + 1, (n,))
        dx = torch.randint(0, 2 * self.pad + 1, (n,))
        # Gather each image's crop with one advanced-indexing call instead of a Python loop.
        rows = (dy[:, None] + torch.arange(height)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width)[None, :])[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        channels = torch.arange(images.shape[1])[None, :, None, None]
        cropped = padded[batch, channels, rows, cols]
        flip = torch.rand(n) < 0.5
        cropped[flip] = cropped[flip].flip(-1)
        return cropped, labels


def get_batch(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples ``indices`` of ``dataset`` as one ``(inputs, labels)`` batch.

    Uses the dataset's own ``get_batch`` when it has one, indexes the tensors of a
    ``TensorDataset`` directly, and otherwise collates ``dataset[i]`` one by one.

    >>> ds = TensorDataset(torch.arange(10.0).view(5, 2), torch.arange(5))
    >>> get_batch(ds, torch.tensor([4, 0]))[1]
    tensor([4, 0])
    """
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    if isinstance(dataset, TensorDataset):
        inputs, labels = dataset.tensors[0], dataset.tensors[1]
        return inputs[indices], labels[indices]
    items = [dataset[int(i)] for i in indices]
    inputs, labels = default_collate(items)
    return inputs, torch.as_tensor(labels)


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split example indices into parts of the given ``fractions`` with equal class proportions.

    Each class's examples are shuffled with ``seed`` and cut by the fractions, so every
    part holds (up to rounding) the same share of every class.

    >>> parts = stratified_split(np.array([0] * 10 + [1] * 10), [0.6, 0.2, 0.2], seed=0)
    >>> [len(p) for p in parts], [int((np.array([0] * 10 + [1] * 10)[p] == 1).sum()) for p in parts]
    ([12, 4, 4], [6, 2, 2])
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f <= 0 for f in fractions):
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        bounds = np.round(np.cumsum([0.0, *fractions]) * len(members)).astype(int)
        for part, start, stop in zip(parts, bounds[:-1], bounds[1:]):
            part.extend(members[start:stop].tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def _find_cifar_folder(data_dir: Path, folder_name: str, marker: str) -> Path:
    candidates = [data_dir / folder_name, data_dir]
    for candidate in candidates:
        if (candidate / marker).is_file():
            return candidate
    looked = ", ".join(str(c / marker) for c in candidates)
    raise FileNotFoundError(
        f"CIFAR files not found: looked for {looked}. Nothing is downloaded; place the "
        f"python-pickle release ('{folder_name}', from https://www.cs.toronto.edu/~kriz/cifar.html) "
        f"under --data-dir {data_dir}"
    )


def _read_cifar_arrays(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if name == "cifar10":
        folder = _find_cifar_folder(data_dir, "cifar-10-batches-py", "data_batch_1")
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files = [folder / "test_batch"]
        label_key = b"labels"
    elif name == "cifar100":
        folder = _find_cifar_folder(data_dir, "cifar-100-python", "train")
        train_files = [folder / "train"]
        test_files = [folder / "test"]
        label_key = b"fine_labels"
    else:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")

    def read(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"CIFAR file missing: {path} (the release in {folder} is incomplete)")
            batch = _unpickle(path)
            if b"data" not in batch or label_key not in batch:
                raise ValueError(
                    f"{path} is not a CIFAR python-pickle batch: expected keys b'data' and {label_key!r}, "
                    f"found {sorted(batch)}"
                )
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    return train_x, train_y, test_x, test_y


def load_cifar(
    data_dir: str | Path,
    name: str = "cifar100",
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    augment: bool = True,
) -> ClassificationData:
    """CIFAR-10 or CIFAR-100 from the python-pickle release in ``data_dir``.

    ``data_dir`` is the folder that contains ``cifar-10-batches-py/`` (or
    ``cifar-100-python/``), or that folder itself. Pixels are scaled to [0, 1] and
    normalised per channel; ``val_fraction`` of the training set (stratified, with
    ``split_seed``) is held out for validation; the official test set is the test
    split. Training images are augmented (random crop with 4-pixel padding, flip)
    when ``augment`` is true. A missing release raises ``FileNotFoundError`` naming
    the paths looked in.
    """
    data_dir = Path(data_dir).expanduser()
    train_x, train_y, test_x, test_y = _read_cifar_arrays(data_dir, name)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_STATS[name])

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(images).float() / 255.0 - mean) / std

    parts = stratified_split(train_y, [1.0 - val_fraction, val_fraction], seed=split_seed)
    train_idx, val_idx = parts
    num_classes = 10 if name == "cifar10" else 100
    digest = hashlib.sha256(f"{name}|{val_fraction}|{split_seed}|{augment}".encode())
    for array in (train_x, train_y, test_x, test_y):
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return ClassificationData(
        name=name,
        train=AugmentedImageDataset(to_tensor(train_x[train_idx]), torch.from_numpy(train_y[train_idx]), augment=augment),
        val=TensorDataset(to_tensor(train_x[val_idx]), torch.from_numpy(train_y[val_idx])),
        test=TensorDataset(to_tensor(test_x), torch.from_numpy(test_y)),
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        fingerprint=digest.hexdigest()[:16],
    )
