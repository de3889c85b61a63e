"""Your own model with fewbits: a ResNet-18 with binary weights, trained in a plain PyTorch loop.

The network is torchvision's ResNet-18, module names included (``conv1``, ``layer1.0.conv1``,
``fc`` ...), defined below because the torchvision wheel on the package index is a CUDA build
that fails to import on CPU-only machines. fewbits then

1. converts it in one call: binary weights with a per-channel scale (XNOR-Net BWN) everywhere,
   except the first convolution and the classifier, which keep 8-bit fixed-point weights as
   most binary networks do; the classifier also quantizes its input features to 8 bits
   (min-max), whose range ``calibrate`` sets from data;
2. trains it with an ordinary PyTorch loop on an image folder (``train/<class>/*.jpg``,
   ``test/<class>/*.jpg``, or a ``.tar.gz`` of that; all images of one size);
3. calibrates, exports the packed file (1 bit per binary weight), reloads it into a fresh float
   ResNet-18 and evaluates it: the reloaded network computes the same logits.

    python examples/resnet18_binary.py --data-dir cifar10-jpeg.tar.gz --epochs 1
    OMP_NUM_THREADS=1 python examples/resnet18_binary.py --speed   # deployment speed
    fewbits info resnet18_binary.fewbits
    fewbits eval resnet18_binary.fewbits --dataset imagefolder --data-dir cifar10-jpeg.tar.gz \\
        --model examples.resnet18_binary:resnet18_10

(``resnet18_10``: the factory of a 10-class ResNet-18, as CIFAR-10 has; ``--model`` takes a
function of no arguments, so a dataset with another number of classes needs its own.)
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fewbits
from fewbits.data import load_dataset
from fewbits.export import export_packed, load_packed
from fewbits.train import evaluate

# --------------------------------------------------------------------------- ResNet-18
# torchvision.models.resnet18, same module names and initialisation.


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes)


# --------------------------------------------------------------------------- the fewbits part

EIGHT_BIT = fewbits.family_config("fp_connect", bit_width=8, delta=2**-8)  # weights in +-0.5
CLASSIFIER = {**EIGHT_BIT, "input": {"name": "min_max", "mode": "batch"}}  # + 8-bit features


def resnet18_10() -> ResNet:
    """A 10-class float ResNet-18 (CIFAR-10), the factory ``fewbits eval --model`` takes."""
    return resnet18(10)


def binary_resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 with binary weights; first conv and classifier in 8-bit fixed point."""
    model = resnet18(num_classes)
    return fewbits.quantize_(model, lambda name, layer: {"conv1": EIGHT_BIT, "fc": CLASSIFIER}
                             .get(name, "binary_weight"))


def binary_net_resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 as BinaryNet (binary weights and activations, ``quantize_(model,
    "binary_net")``), the first conv and the classifier in 8-bit fixed point."""
    return fewbits.quantize_(resnet18(num_classes), lambda name, layer: EIGHT_BIT
                             if name in ("conv1", "fc") else "binary_net")


def _cpu_model() -> str:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown CPU (lscpu failed)"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")), "unknown CPU")


def speed(rounds: int = 20, image: int = 32) -> dict[str, Any]:
    """Batch-1 speed of the binary_net ResNet-18 through ``compile_for_cpu`` against ONNX
    Runtime on the float ResNet-18, one thread, timed interleaved (median of per-round
    ratios); prints the CPU, the load average, the backend the planner picked and why it
    dropped the others."""
    import os
    import statistics
    import time

    from fewbits.export.onnx import onnx_session, to_onnx
    from fewbits.runtime import compile_for_cpu

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = (3, image, image)
    float_net = resnet18(10).eval()
    sess = onnx_session(to_onnx(float_net, torch.rand(1, *shape))[0], threads=1)
    net = binary_net_resnet18(10).train()
    with torch.no_grad():  # batch-norm statistics as training leaves them: at initialisation
        for _ in range(4):  # every binary threshold is exactly 0, and on 8-bit pixels a stem
            net(torch.rand(16, *shape))  # sum is then exactly 0 at times, its sign PyTorch's
    net.eval()  # float order's (the engine's differs: ~3 % of top-1 answers)
    fast = compile_for_cpu(net, input_shape=shape, batch_size=1, threads=1)
    x = torch.rand(1, *shape)
    runs = {"ort float": lambda: sess.run(None, {sess.get_inputs()[0].name: x.numpy()}),
            f"fewbits binary_net ({fast.backend})": lambda: fast(x)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds + 1):
        for k, f in runs.items():
            t0 = time.process_time()  # CPU time: stable on a shared, busy machine
            f()
            times[k].append(time.process_time() - t0)
    base, mine = (times[k][1:] for k in runs)
    ratio = statistics.median(b / max(m, 1e-9) for b, m in zip(base, mine, strict=True))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"CPU: {_cpu_model()}; load average {load}; 1 thread, batch 1, {shape}; CPU time")
    for k, v in times.items():
        print(f"  {k}: {1e3 * statistics.median(v[1:]):.2f} ms")
    print(f"  ratio (ONNX Runtime float time / fewbits time): {ratio:.2f}x")
    for n in fast.notes:
        print(f"  planner: {n}")
    return {"backend": fast.backend, "ratio": ratio, "notes": fast.notes, "load": load}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed", action="store_true", help="only time the binary_net ResNet-18 "
                   "through compile_for_cpu against ONNX Runtime float (batch 1, 1 thread)")
    p.add_argument("--data-dir", help="image folder or .tar.gz (train/, test/)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("-o", "--output", default="resnet18_binary.fewbits")
    args = p.parse_args(argv)
    if args.speed:
        return speed()
    if args.data_dir is None:
        p.error("--data-dir is required (or --speed)")

    train = load_dataset("imagefolder", "train", args.data_dir)  # uint8 (N, C, H, W)
    test = load_dataset("imagefolder", "test", args.data_dir)
    loader = DataLoader(TensorDataset(train.images, train.labels), args.batch_size, shuffle=True)
    model = binary_resnet18(num_classes=len(train.classes))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x.float() / 255), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, "
              f"test accuracy {evaluate(model, test).accuracy:.3f}")

    fewbits.calibrate(model, (x.float() / 255 for x, _ in itertools.islice(loader, 8)))
    report = export_packed(model, args.output)
    reloaded = load_packed(args.output, model=resnet18(len(train.classes)))  # a float ResNet

    x = test.images[:64].float() / 255
    with torch.no_grad():
        same = torch.equal(model.eval()(x), reloaded(x))
    acc = evaluate(reloaded, test).accuracy  # fewbits' evaluation loop (as `fewbits eval`)
    print(f"{args.output}: {report.file_bytes:,} bytes, fp32 {report.fp32_bytes:,} bytes "
          f"({report.ratio:.1f}x smaller, {report.bits_per_weight:.2f} bits per quantized "
          f"weight); reloaded: identical logits {same}, test accuracy {acc:.3f}")
    return {"file_bytes": report.file_bytes, "fp32_bytes": report.fp32_bytes,
            "ratio": report.ratio, "identical_logits": same, "accuracy": acc}


if __name__ == "__main__":
    main()
