"""Benchmark: classifier-distillation training throughput through the real trainer.

CPU (default): the default ``divergent compare`` pair on digits — teacher ``cnn-32``
(frozen, eval mode), student ``mlp-32``, batch 64 — trained with
:func:`divergent.train.classifier.train_classifier` for a few epochs per method.
``samples_per_s`` = training rows processed / training seconds (the trainer's own
clock; it includes the per-epoch validation pass, as a user's run does). Median of
``--repeats`` runs, for each thread count in ``--threads``.

GPU (``--gpu``, needs CUDA): resnet32x4 → resnet8x4 on synthetic CIFAR-100-shaped
data (``--gpu-rows`` random 3x32x32 images with the CIFAR augmentation, 100
classes, batch 64, SGD), seconds per epoch (the trainer's clock, including its
validation pass over 512 rows) and images/s. Without CUDA it says so and writes
nothing (``--device cpu`` runs the same code on CPU, to try the script).

    python benchmarks/bench_classifier_throughput.py                 # CPU, writes results/classifier_throughput_cpu.csv
    python benchmarks/bench_classifier_throughput.py --gpu           # GPU, writes results/classifier_epoch_gpu.csv
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402  (benchmarks/ is not a package)

from divergent.data.digits import load_digits_data  # noqa: E402
from divergent.data.vision import AugmentedImageDataset, ClassificationData  # noqa: E402
from divergent.models.classifiers import build_model  # noqa: E402
from divergent.train.classifier import ClassifierTrainConfig, method_kind, train_classifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CPU_METHODS = "ce,forward_kl,reverse_kl,js,tvd,skew_kl,alpha_beta,bdkd,sinkhorn-with-KD,dkd,nkd,dml,pskd"


def _train_once(method: str, data: ClassificationData, teacher: torch.nn.Module, student_name: str, config: ClassifierTrainConfig, seed: int):
    torch.manual_seed(seed)
    student = build_model(student_name, data.input_shape, data.num_classes)
    online_teacher = None
    if method_kind(method) == "online":
        online_teacher = build_model("cnn-32", data.input_shape, data.num_classes).to(config.device)
    result = train_classifier(student, data, config, teacher=online_teacher or teacher)
    return result.steps * config.batch_size / result.seconds, result.seconds


def bench_cpu(args) -> list[dict]:
    data = load_digits_data()
    torch.manual_seed(0)
    teacher = build_model("cnn-32", data.input_shape, data.num_classes).eval()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for method in args.methods:
            config = ClassifierTrainConfig(method=method, epochs=args.epochs, batch_size=64, lr=1e-2, temperature=2.0)
            _train_once(method, data, teacher, "mlp-32", ClassifierTrainConfig(method=method, epochs=1), 0)  # warm-up
            runs = [_train_once(method, data, teacher, "mlp-32", config, seed) for seed in range(args.repeats)]
            rate = statistics.median(r[0] for r in runs)
            rows.append({
                "method": method, "threads": threads, "teacher": "cnn-32", "student": "mlp-32", "batch_size": 64,
                "epochs": args.epochs, "samples_per_s": round(rate, 1),
                "seconds_per_epoch": round(statistics.median(r[1] for r in runs) / args.epochs, 4),
                "repeats": args.repeats,
                # Other work on a shared machine slows every row; the 1-minute load average says how much there was.
                "load_avg_1min": round(os.getloadavg()[0], 2),
            })
            print(rows[-1], flush=True)
    return rows


def bench_gpu(args) -> list[dict]:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU epoch-time benchmark (resnet32x4 -> resnet8x4) needs one; nothing written")
        return []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.gpu_rows, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 100, (args.gpu_rows,), generator=generator)
    val = torch.utils.data.TensorDataset(images[:512], labels[:512])
    data = ClassificationData("synthetic-cifar100", AugmentedImageDataset(images, labels), val, val, 100, (3, 32, 32))
    torch.manual_seed(0)
    teacher = build_model("resnet32x4", (3, 32, 32), 100).to(device).eval()
    rows = []
    for method in args.gpu_methods:
        config = ClassifierTrainConfig(method=method, epochs=1, batch_size=64, optimizer="sgd", lr=0.05,
                                       weight_decay=5e-4, temperature=4.0, device=device)
        torch.manual_seed(0)
        train_classifier(build_model("resnet8x4", (3, 32, 32), 100), data, config, teacher=teacher)  # warm-up (cuDNN autotune)
        sync()
        seconds = []
        for seed in range(args.repeats):
            torch.manual_seed(seed)
            result = train_classifier(build_model("resnet8x4", (3, 32, 32), 100), data, config, teacher=teacher)
            sync()
            seconds.append(result.seconds)
        epoch_seconds = statistics.median(seconds)
        rows.append({
            "method": method, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "teacher": "resnet32x4", "student": "resnet8x4", "rows": args.gpu_rows, "batch_size": 64,
            "seconds_per_epoch": round(epoch_seconds, 3), "images_per_s": round(args.gpu_rows / epoch_seconds, 1),
            "seconds_per_50k_epoch": round(epoch_seconds * 50_000 / args.gpu_rows, 2), "repeats": args.repeats,
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=CPU_METHODS, type=lambda s: s.split(","))
    parser.add_argument("--threads", default="1,2", type=lambda s: [int(t) for t in s.split(",")])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="run the CUDA epoch-time benchmark instead")
    parser.add_argument("--gpu-rows", type=int, default=10_000)
    parser.add_argument("--device", default="cuda", help="device of the --gpu benchmark (cpu only to try the script)")
    parser.add_argument("--gpu-methods", default="ce,forward_kl,dkd", type=lambda s: s.split(","))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.gpu:
        rows = bench_gpu(args)
        out = args.out or RESULTS / "classifier_epoch_gpu.csv"
    else:
        rows = bench_cpu(args)
        out = args.out or RESULTS / "classifier_throughput_cpu.csv"
    if rows:
        write_results(rows, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
