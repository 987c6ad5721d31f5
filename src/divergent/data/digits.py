"""scikit-learn's bundled handwritten digits as a ready train/val/test task.

1,797 real 8x8 grey-level images of the digits 0-9, shipped inside scikit-learn,
so the default comparison runs on any machine with no download.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import TensorDataset

from divergent.data.vision import ClassificationData, stratified_split

__all__ = ["load_digits_data"]


def load_digits_data(*, split_seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> ClassificationData:
    """The digits as ``(1, 8, 8)`` float images in [0, 1], split stratified by class.

    ``fractions`` are the train/val/test shares; the split depends only on
    ``split_seed``, so runs with different training seeds see the same split.

    >>> data = load_digits_data()
    >>> len(data.train), len(data.val), len(data.test), data.num_classes, data.input_shape
    (1078, 360, 359, 10, (1, 8, 8))
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of the original 32x32 bitmap's 4x4 blocks.
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    labels = torch.from_numpy(bunch.target).long()
    train_idx, val_idx, test_idx = stratified_split(bunch.target, list(fractions), seed=split_seed)

    def subset(idx) -> TensorDataset:
        idx = torch.from_numpy(idx)
        return TensorDataset(images[idx], labels[idx])

    fingerprint = hashlib.sha256(bunch.images.tobytes() + bunch.target.tobytes()
                                 + f"|{split_seed}|{list(fractions)}".encode()).hexdigest()[:16]
    return ClassificationData(
        name="digits",
        train=subset(train_idx),
        val=subset(val_idx),
        test=subset(test_idx),
        num_classes=10,
        input_shape=(1, 8, 8),
        class_names=tuple(str(d) for d in range(10)),
        fingerprint=fingerprint,
    )
