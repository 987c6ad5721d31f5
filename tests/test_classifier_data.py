"""Digits split and the torchvision-free CIFAR reader (tested on tiny pickles written here)."""

import pickle

import numpy as np
import pytest
import torch

from divergent.data.digits import load_digits_data
from divergent.data.vision import AugmentedImageDataset, CIFAR_STATS, get_batch, load_cifar, stratified_split


def test_digits_split_is_stratified_disjoint_and_deterministic():
    data = load_digits_data(split_seed=0)
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 1797
    images = [d.tensors[0].flatten(1) for d in (data.train, data.val, data.test)]
    # No image row appears in two splits (the digits have a few exact duplicates; compare indices via hashing rows).
    train_rows = {tuple(r.tolist()) for r in images[0]}
    overlap = sum(tuple(r.tolist()) in train_rows for r in images[2])
    assert overlap <= 5
    for split in (data.train, data.val, data.test):
        counts = torch.bincount(split.tensors[1], minlength=10).float()
        share = counts / counts.sum()
        assert (share - 0.1).abs().max() < 0.012  # every class ~10% in every split
    again = load_digits_data(split_seed=0)
    assert torch.equal(again.test.tensors[0], data.test.tensors[0])
    other = load_digits_data(split_seed=1)
    assert not torch.equal(other.test.tensors[0], data.test.tensors[0])
    assert data.train.tensors[0].min() >= 0 and data.train.tensors[0].max() <= 1


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(np.zeros(10), [0.5, 0.6], seed=0)


def _write_cifar10(folder, n_per_batch=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=n_per_batch))
        arrays[name] = (data, labels)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, handle)
    return arrays


def test_cifar10_reader_reads_pickles_and_normalises(tmp_path):
    arrays = _write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_cifar(tmp_path, "cifar10", val_fraction=0.2, augment=False)
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert len(data.train) + len(data.val) == 30 and len(data.test) == 6
    test_x, test_y = data.test.tensors
    raw, labels = arrays["test_batch"]
    mean, std = CIFAR_STATS["cifar10"]
    # Pixel (c, h, w) of image i is raw[i, c * 1024 + h * 32 + w] in the CIFAR layout.
    expected = (raw[2, 1024 + 5 * 32 + 7] / 255.0 - mean[1]) / std[1]
    assert test_x[2, 1, 5, 7].item() == pytest.approx(expected, rel=1e-5)
    assert test_y.tolist() == [int(v) for v in labels]
    # The folder itself may be given as data_dir.
    assert len(load_cifar(tmp_path / "cifar-10-batches-py", "cifar10").test) == 6


def test_cifar100_reader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 200), ("test", 4)):  # two training images per class: one each for train and val
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [0] * n}, handle)
    data = load_cifar(tmp_path, "cifar100", val_fraction=0.5)
    assert data.num_classes == 100
    assert data.test.tensors[1].tolist() == [0, 1, 2, 3]


def test_missing_cifar_names_the_paths_looked_in(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_cifar(tmp_path / "nowhere", "cifar10")
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py" / "data_batch_1") in str(info.value)
    assert "Nothing is downloaded" in str(info.value)


def test_augmentation_is_a_shifted_crop_of_the_padded_image_or_its_mirror():
    images = torch.randn(5, 3, 8, 8)
    dataset = AugmentedImageDataset(images, torch.arange(5), pad=2)
    torch.manual_seed(0)
    out, labels = get_batch(dataset, torch.arange(5))
    assert out.shape == images.shape and labels.tolist() == list(range(5))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(5):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_get_batch_collates_plain_datasets():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((2,), float(i)), i

    x, y = get_batch(Plain(), torch.tensor([3, 1]))
    assert x.tolist() == [[3.0, 3.0], [1.0, 1.0]] and y.tolist() == [3, 1]


# ------------------------------------------------------------------ the user's files (divergent.data.user_data)


def _features(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype(np.float32) * 5 + 7, np.arange(n) % 2


def test_npz_split_array_by_name_or_code_gives_exactly_those_splits(tmp_path):
    from divergent.data.user_data import load_user_data

    x, y = _features()
    names = np.array(["train"] * 24 + ["val"] * 8 + ["test"] * 8)
    codes = np.array([0] * 24 + [1] * 8 + [2] * 8)
    np.savez(tmp_path / "names.npz", X=x, y=y, split=names)
    np.savez(tmp_path / "codes.npz", X=x, y=y, split=codes)
    a = load_user_data(tmp_path / "names.npz", normalize=False)
    b = load_user_data(tmp_path / "codes.npz", normalize=False)
    for data in (a, b):
        assert torch.equal(data.train.tensors[0], torch.from_numpy(x[:24]))
        assert torch.equal(data.val.tensors[0], torch.from_numpy(x[24:32]))
        assert torch.equal(data.test.tensors[1], torch.from_numpy(y[32:]))
    assert a.fingerprint != b.fingerprint  # different files
    np.savez(tmp_path / "bad.npz", X=x, y=y, split=np.array(["train", "dev"] * 20))
    with pytest.raises(ValueError, match=r"split holds dev; expected 'train', 'val', 'test' \(or 0, 1, 2\)"):
        load_user_data(tmp_path / "bad.npz")


def test_npz_test_arrays_keep_their_order_and_a_quarter_of_the_rest_is_val(tmp_path):
    from divergent.data.user_data import load_user_data

    x, y = _features(40)
    x_test, y_test = _features(10, seed=1)
    np.savez(tmp_path / "d.npz", X=x, y=y, X_test=x_test, y_test=y_test)
    data = load_user_data(tmp_path / "d.npz", normalize=False)
    assert torch.equal(data.test.tensors[0], torch.from_numpy(x_test))
    assert (len(data.train), len(data.val)) == (30, 10)
    assert torch.bincount(data.val.tensors[1]).tolist() == [5, 5]  # stratified


def test_normalisation_uses_the_training_split_only(tmp_path):
    from divergent.data.user_data import load_user_data

    x, y = _features(50)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    raw, scaled = load_user_data(tmp_path / "d.npz", normalize=False), load_user_data(tmp_path / "d.npz")
    train = raw.train.tensors[0]
    mean, std = train.mean(0), train.std(0)
    torch.testing.assert_close(scaled.test.tensors[0], (raw.test.tensors[0] - mean) / std)
    torch.testing.assert_close(scaled.train.tensors[0].mean(0), torch.zeros(3), atol=1e-5, rtol=0)


def test_image_layouts_are_detected_as_documented(tmp_path):
    from divergent.data.user_data import load_user_data

    y = np.arange(30) % 3
    rng = np.random.default_rng(0)
    cases = {
        "grey.npz": (rng.random((30, 5, 7)).astype(np.float32), (1, 5, 7)),
        "chw.npz": (rng.random((30, 3, 5, 7)).astype(np.float32), (3, 5, 7)),
        "hwc_uint8.npz": (rng.integers(0, 255, (30, 5, 7, 3), dtype=np.uint8), (3, 5, 7)),
        # float [n, H, W, C] is NOT transposed: only uint8 is taken as channels-last.
        "float_hwc.npz": (rng.random((30, 5, 7, 3)).astype(np.float32), (5, 7, 3)),
        "chw_uint8.npz": (rng.integers(0, 255, (30, 3, 5, 7), dtype=np.uint8), (3, 5, 7)),
    }
    for name, (x, shape) in cases.items():
        np.savez(tmp_path / name, X=x, y=y)
        assert load_user_data(tmp_path / name).input_shape == shape, name


def test_an_empty_split_is_named_not_a_bare_torch_error():
    import torch
    from torch.utils.data import TensorDataset

    from divergent.data.vision import ClassificationData

    some = TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    none = TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="tiny: the val split has no examples"):
        ClassificationData("tiny", some, none, some, 2, (3,))
