"""`divergent compare` on the user's own data and teacher: every file kind end to end, every mistake one line.

Each kind of file is written here in tmp (features and images as .npz, an ImageFolder of PNGs
written with Pillow, a .csv with a text label column; a TorchScript teacher, a torch.export
teacher, a module:factory teacher and student) and a 2-epoch comparison runs through the CLI.
The teacher's test accuracy in the results is checked against the teacher run directly here,
on the test arrays of the file.
"""

import csv
import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from divergent.cli import app
from divergent.data.user_data import load_user_data
from divergent.experiments.compare import NO_TEACHER

# Three separable blobs in 5 dimensions, string labels; the test split given in the file.
CLASSES = np.array(["cat", "dog", "emu"])


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 5)).astype(np.float32) + 2.0 * np.eye(3, 5, dtype=np.float32)[y]
    return x, y


def _trained_mlp(x, y, outputs=3, hidden=16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture
def blobs_file(tmp_path):
    x, y = _blobs(90, 0)
    x_test, y_test = _blobs(30, 1)
    path = tmp_path / "blobs.npz"
    np.savez(path, X=x, y=CLASSES[y], X_test=x_test, y_test=CLASSES[y_test])
    return path, (x, y, x_test, y_test)


def _compare(tmp_path, *args):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", "--epochs", "2", "--seeds", "0", "-d", "forward_kl", "--teacher-epochs", "2",
                                      "--set", "labelled_fraction=1.0", "--set", "batch_size=16", "-o", str(out), *args])
    return result, out


def _finished(result, out):
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    assert {r["name"] for r in rows} == {NO_TEACHER, "forward_kl"}
    assert all(r["status"] == "finished" for r in rows)
    return run_dir, json.loads((run_dir / "results.json").read_text())


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean()


def test_npz_features_with_a_torchscript_teacher_used_as_given(tmp_path, blobs_file):
    path, (x, y, x_test, y_test) = blobs_file
    teacher = _trained_mlp(x, y)
    torch.jit.save(torch.jit.script(teacher), tmp_path / "teacher.ts")
    result, out = _compare(tmp_path, "--data", str(path), "--teacher", str(tmp_path / "teacher.ts"), "--set", "normalize=false")
    run_dir, results = _finished(result, out)
    expected = _accuracy(teacher, x_test, y_test)
    assert 0.8 < expected < 1.0  # a real teacher, not a trivial one
    assert results["teacher"]["test"]["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert results["teacher"]["name"] == str(tmp_path / "teacher.ts")
    assert run_dir.name.startswith("compare-blobs.npz-")
    # The table's first row is the given teacher with its own accuracy; titles name the user's file.
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# divergent compare — blobs.npz")
    teacher_line = next(line for line in report.splitlines() if line.startswith(f"| teacher {tmp_path / 'teacher.ts'} |"))
    assert f"| {expected:.4f} |" in teacher_line and "| given |" in teacher_line
    assert "digits" not in report.split("## Settings")[0]


def test_npz_features_with_a_torch_export_teacher_of_fixed_batch(tmp_path, blobs_file):
    """Exported with a batch of 1, the program still runs on batches of any size (in chunks)."""
    path, (x, y, x_test, y_test) = blobs_file
    teacher = _trained_mlp(x, y)
    program = torch.export.export(teacher, (torch.zeros(1, 5),))
    torch.export.save(program, tmp_path / "teacher.pt2")
    result, out = _compare(tmp_path, "--data", str(path), "--teacher", str(tmp_path / "teacher.pt2"), "--set", "normalize=false")
    _, results = _finished(result, out)
    assert results["teacher"]["test"]["accuracy"] == pytest.approx(_accuracy(teacher, x_test, y_test), abs=1e-6)


@pytest.mark.parametrize("weights_format", ["torch", "safetensors"])
def test_module_factory_teacher_with_weights_and_factory_student(tmp_path, blobs_file, monkeypatch, weights_format):
    path, (x, y, x_test, y_test) = blobs_file
    module = f"user_models_{weights_format}"
    (tmp_path / f"{module}.py").write_text(
        "import torch\n"
        "def make_teacher(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(input_shape[0], 16), torch.nn.ReLU(), torch.nn.Linear(16, num_classes))\n"
        "def make_student():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 3))\n"
    )
    teacher = _trained_mlp(x, y)
    if weights_format == "torch":
        weights = tmp_path / "teacher.pt"
        torch.save(teacher.state_dict(), weights)
    else:
        from safetensors.torch import save_file

        weights = tmp_path / "teacher.safetensors"
        save_file(teacher.state_dict(), str(weights))
    monkeypatch.chdir(tmp_path)  # module:factory imports from the current folder
    monkeypatch.setattr(sys, "path", list(sys.path))
    result, out = _compare(tmp_path, "--data", str(path), "--teacher", f"{module}:make_teacher", "--teacher-weights",
                           str(weights), "--student-model", f"{module}:make_student", "--set", "normalize=false",
                           "-m", "dml")
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["teacher"]["test"]["accuracy"] == pytest.approx(_accuracy(teacher, x_test, y_test), abs=1e-6)
    # dml trains a fresh teacher from the factory alongside the student.
    assert {r["name"] for r in results["runs"]} == {NO_TEACHER, "forward_kl", "dml"}


def test_npz_channels_last_uint8_images_train_a_cnn_teacher(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    images = rng.integers(0, 60, size=(60, 6, 6, 3), dtype=np.uint8)
    images[np.arange(60), :, :, y] += 150  # the class is the bright channel
    path = tmp_path / "images.npz"
    np.savez(path, X=images, y=y)
    data = load_user_data(path, normalize=False)
    assert data.input_shape == (3, 6, 6) and data.class_names == ("0", "1", "2")
    first = data.test.tensors[0][0]
    assert float(first.min()) >= 0 and float(first.max()) <= 1
    # [n, H, W, C] uint8 read as channels-last and scaled to [0, 1]: some image of the file, transposed.
    candidates = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    assert any(torch.equal(first, c) for c in candidates)
    result, out = _compare(tmp_path, "--data", str(path), "--teacher-model", "cnn-4", "--student-model", "mlp-8")
    _, results = _finished(result, out)
    assert results["teacher"]["name"] == "cnn-4" and results["teacher"]["test"]["accuracy"] > 0.5


def _image_folder(root, sizes=((6, 6),) * 6 + ((8, 8),), classes=("zebra", "ant", "moth")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            pixels = rng.integers(0, 80, size=(size[1], size[0]), dtype=np.uint8) + 60 * k
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    (root / "ant" / "notes.txt").write_text("not an image: ignored, as torchvision does")
    return root


def test_image_folder_of_pngs_end_to_end(tmp_path):
    folder = _image_folder(tmp_path / "pictures")
    data = load_user_data(folder)
    assert data.class_names == ("ant", "moth", "zebra")  # sorted folder names, as torchvision
    assert data.input_shape == (1, 6, 6)  # grey, resized to the most common size
    assert len(data.train) + len(data.val) + len(data.test) == 21
    train = data.train.tensors[0]
    assert abs(float(train.mean())) < 1e-5 and abs(float(train.std()) - 1) < 0.05  # normalised with train statistics
    assert load_user_data(folder, image_size=4).input_shape == (1, 4, 4)
    result, out = _compare(tmp_path, "--data", str(folder), "--teacher-model", "cnn-4", "--student-model", "mlp-8")
    _finished(result, out)


def test_csv_with_a_text_label_column(tmp_path):
    x, y = _blobs(60, 2)
    path = tmp_path / "table.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["f0", "f1", "species", "f2", "f3", "f4"])
        for row, label in zip(x, y):
            writer.writerow([*row[:2], CLASSES[label], *row[2:]])
    data = load_user_data(path, label_column="species")
    assert data.input_shape == (5,) and data.class_names == ("cat", "dog", "emu")
    train = data.train.tensors[0]
    torch.testing.assert_close(train.mean(0), torch.zeros(5), atol=1e-5, rtol=0)  # standardised on train only
    assert not torch.allclose(data.test.tensors[0].mean(0), torch.zeros(5), atol=1e-5)
    # The default teacher cnn-32 becomes the MLP mlp-256x128 on feature vectors.
    result, out = _compare(tmp_path, "--data", str(path), "--label-column", "species", "--student-model", "mlp-8")
    _, results = _finished(result, out)
    assert results["teacher"]["name"] == "mlp-256x128"


# ------------------------------------------------------------------------------ mistakes


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _error_cases(tmp_path, monkeypatch):
    x, y = _blobs(30, 0)
    bad = tmp_path / "bad"
    bad.mkdir()
    nan_x = x.copy()
    nan_x[3, 1] = np.nan
    (bad / "garbage.npz").write_bytes(b"this is not a zip file")
    (bad / "data.txt").write_text("1,2,3")
    with open(bad / "mixed.csv", "w") as handle:
        handle.write("a,colour,label\n" + "".join(f"{i},red,{i % 2}\n" for i in range(20)))
    empty_class = _image_folder(bad / "folder")
    (empty_class / "empty").mkdir()
    blobs = _write(bad / "ok.npz", X=x, y=y)
    torch.jit.save(torch.jit.script(_trained_mlp(x, y, outputs=4)), bad / "four.ts")
    torch.jit.save(torch.jit.script(torch.nn.Linear(7, 3)), bad / "seven.ts")
    return [
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere")], [str(tmp_path / "nowhere"), "does not exist"]),
        (["--data-dir", str(tmp_path)], ["data_dir", "only for dataset cifar10 or cifar100"]),
        (["--data", str(bad / "missing.npz")], [str(bad / "missing.npz"), "does not exist"]),
        (["--data", str(bad / "data.txt")], ["unknown kind '.txt'", ".npz", ".csv", "ImageFolder"]),
        (["--data", str(bad / "garbage.npz")], [str(bad / "garbage.npz"), "could not be read as a .npz"]),
        (["--data", _write(bad / "nox.npz", inputs=x, y=y)], ["has no array 'X'", "found: inputs, y"]),
        (["--data", _write(bad / "short.npz", X=x, y=y[:-1])], ["X has 30 examples but y has 29 labels"]),
        (["--data", _write(bad / "nan.npz", X=nan_x, y=y)], ["1 example(s) have NaN or infinite inputs"]),
        (["--data", _write(bad / "one.npz", X=x, y=np.zeros(30))], ["1 class", "at least 2 classes"]),
        (["--data", _write(bad / "few.npz", X=x[:22], y=np.r_[np.zeros(20), [1, 1]])],
         ["class '1.0' has 2 example(s)", "too few"]),
        (["--data", str(empty_class)], ["class folder 'empty' holds no images"]),
        (["--data", str(bad / "mixed.csv"), "--label-column", "label"], ["column 'colour' is not numeric", "'red'"]),
        (["--data", str(bad / "mixed.csv")], ["--label-column", "columns: a, colour, label"]),
        (["--data", str(bad / "mixed.csv"), "--label-column", "labl"], ["no column 'labl'", "did you mean 'label'"]),
        (["--data", blobs, "--teacher", str(bad / "four.ts")], ["outputs 4 classes", "has 3 classes", "ok.npz"]),
        (["--data", blobs, "--teacher", str(bad / "seven.ts")], ["cannot run on the data ok.npz", "shape (5,)"]),
        (["--data", blobs, "--teacher", str(bad / "four.ts"), "-d", "forward_kl,nd", "--baseline", "forward_kl"],
         ["row 'nd'", "TorchScript"]),
        (["--data", blobs, "--teacher", str(bad / "four.ts"), "-m", "dml"], ["row 'dml'", "module:factory"]),
        (["--data", blobs, "--teacher", "no_such_module_xyz:make"], ["cannot import module 'no_such_module_xyz'"]),
        (["--data", blobs, "--teacher", str(bad / "ok.npz")], ["could not be read as a TorchScript file"]),
        (["--teacher-weights", str(bad / "w.pt")], ["teacher_weights", "needs teacher"]),
        (["--data", blobs, "--teacher-model", "resnet8"], ["needs images", "feature vectors of width 5"]),
    ]


def test_every_mistake_is_one_line_exit_2_and_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, fragments in _error_cases(tmp_path, monkeypatch):
        out = tmp_path / "out"
        result = CliRunner().invoke(app, ["compare", "--seeds", "0", "--epochs", "1", "-o", str(out), *args])
        shown = result.stderr.strip()
        assert result.exit_code == 2, (args, result.output)
        assert len(shown.splitlines()) == 1 and shown.startswith("error:") and "Traceback" not in shown, (args, shown)
        for fragment in fragments:
            assert fragment in shown, (args, fragment, shown)
        assert not out.exists() or not any(out.iterdir()), (args, list(out.iterdir()))


def test_a_trained_teacher_is_cached_per_data_content(tmp_path):
    """Same file, same teacher from the cache; the same name with other contents trains a new one."""
    from rich.console import Console

    from divergent.experiments.compare import CompareConfig, get_teacher, load_dataset

    x, y = _blobs(60, 0)
    path = tmp_path / "blobs.npz"
    config = CompareConfig(data=str(path), teacher_model="mlp-8", teacher_epochs=1, batch_size=16,
                           output_dir=str(tmp_path / "runs"))
    quiet = Console(file=open("/dev/null", "w"))
    teachers = tmp_path / "cache" / "teachers"
    np.savez(path, X=x, y=y)
    _, first = get_teacher(config, load_dataset(config), console=quiet)
    _, again = get_teacher(config, load_dataset(config), console=quiet)
    assert (first["cached"], again["cached"]) == (False, True) and len(list(teachers.glob("*.pt"))) == 1
    np.savez(path, X=x + 1.0, y=y)  # new contents, same path and settings
    _, changed = get_teacher(config, load_dataset(config), console=quiet)
    assert changed["cached"] is False and len(list(teachers.glob("*.pt"))) == 2
