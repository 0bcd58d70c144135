#!/usr/bin/env python3
# Cross-check: a cnnc checkpoint in the equivalent PyTorch model gives cnnc's logits (max |diff| <= 1e-4).
"""Checks that a cnnc checkpoint gives the same logits in PyTorch as in cnnc.

    python3 tools/torch_check.py FILE.cnn CKPT.safetensors [--data mnist:PATH]
                                 [--cnnc PATH] [--tol 1e-4]

1. `cnnc dump --stage=checked FILE` gives the checked model (layers, ops, inputs
   as value ids, shapes);
2. the equivalent torch.nn.Module is built from it, one submodule per layer with
   parameters, at the layer's dotted name (`r2.shortcut` is child `shortcut` of
   module `r2`), so its state_dict keys are cnnc's tensor names; layers without
   parameters run as functions, wired by the layer inputs;
3. the checkpoint is loaded with safetensors.torch.load_file and
   load_state_dict(strict=True);
4. the model runs in eval mode (batchnorm on running statistics, dropout off) on
   the images cnnc evaluates: the file's MNIST test split (or --data mnist:PATH),
   pixels / 255, then the eval transform of the file's `augment` (centre crop of
   the zero-padded image for random_crop, no flip, every normalize in order);
5. `cnnc eval FILE --weights CKPT --logits TMP.npy --json` gives cnnc's logits
   and labels, which are compared with PyTorch's.

Prints the largest absolute logit difference and both accuracies; exits 1 when
the difference is above --tol (default 1e-4), when the labels differ, or when a
layer's PyTorch output shape is not cnnc's. Only MNIST (IDX) data is supported.

Needs torch, numpy and safetensors (e.g. in a venv outside the repo); not run in
CI. See tools/README.md.
"""

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent


# --- The model -------------------------------------------------------------


def op_kind(op):
    """(kind, attributes) of a serialized cnnc Op: "Relu" or {"Conv": {...}}."""
    if isinstance(op, str):
        return op, {}
    ((kind, attrs),) = op.items()
    return kind, attrs


class CnncModel(nn.Module):
    """The checked model of `cnnc dump --stage=checked` as a PyTorch module."""

    def __init__(self, model):
        super().__init__()
        self.input = list(model["input"])
        self.layers = []  # (name, kind, attrs, inputs, shape)
        for layer in model["layers"]:
            kind, attrs = op_kind(layer["op"])
            self.layers.append(
                (layer["name"], kind, attrs, list(layer["inputs"]), list(layer["shape"]))
            )
        # Modules with parameters, shortest names first so that a parent exists
        # before its children are added to it.
        leaves = {}
        for name, kind, attrs, inputs, _ in self.layers:
            m = self.make_module(kind, attrs, self.shape(inputs[0]))
            if m is not None:
                leaves[name] = m
        for name in sorted(leaves, key=lambda n: n.count(".")):
            self.place(name, leaves[name])
        self.leaves = leaves

    def shape(self, v):
        return self.input if v == 0 else self.layers[v - 1][4]

    @staticmethod
    def make_module(kind, a, in_shape):
        if kind == "Conv":
            return nn.Conv2d(
                in_shape[0],
                a["out"],
                kernel_size=tuple(a["kernel"]),
                stride=tuple(a["stride"]),
                padding=tuple(a["pad"]),
                dilation=tuple(a["dilation"]),
                groups=a["groups"],
                bias=a["bias"],
            )
        if kind == "Linear":
            return nn.Linear(in_shape[0], a["out"], bias=a["bias"])
        if kind == "BatchNorm":
            bn = nn.BatchNorm2d if len(in_shape) == 3 else nn.BatchNorm1d
            return bn(in_shape[0], eps=a["eps"], momentum=a["momentum"])
        if kind == "GroupNorm":
            return nn.GroupNorm(a["groups"], in_shape[0], eps=a["eps"])
        return None

    def place(self, name, module):
        parent = self
        *path, last = name.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        if last in parent._modules:
            raise SystemExit(f"error: two modules at `{name}`")
        parent.add_module(last, module)

    def forward(self, x):
        values = [x]
        for name, kind, a, inputs, shape in self.layers:
            xs = [values[v] for v in inputs]
            y = self.apply_op(name, kind, a, xs)
            if list(y.shape[1:]) != shape:
                raise ShapeError(
                    f"layer `{name}` ({kind}): PyTorch gives {list(y.shape[1:])}, "
                    f"cnnc {shape}"
                )
            values.append(y)
        return values[-1]

    def apply_op(self, name, kind, a, xs):
        x = xs[0]
        if name in self.leaves:
            return self.leaves[name](x)
        if kind == "Relu":
            return F.relu(x)
        if kind == "LeakyRelu":
            return F.leaky_relu(x, a["slope"])
        if kind == "Sigmoid":
            return torch.sigmoid(x)
        if kind == "Tanh":
            return torch.tanh(x)
        if kind == "Gelu":
            return F.gelu(x, approximate="none")
        if kind == "MaxPool":
            return F.max_pool2d(
                x, tuple(a["kernel"]), tuple(a["stride"]), tuple(a["pad"])
            )
        if kind == "AvgPool":
            return F.avg_pool2d(
                x,
                tuple(a["kernel"]),
                tuple(a["stride"]),
                tuple(a["pad"]),
                count_include_pad=True,
            )
        if kind == "GlobalAvgPool":
            return x.mean(dim=(2, 3))
        if kind == "Flatten":
            return x.flatten(1)
        if kind == "Dropout":
            return x  # eval mode
        if kind == "Add":
            y = xs[0]
            for t in xs[1:]:
                y = y + t
            return y
        if kind == "Concat":
            return torch.cat(xs, dim=1)
        if kind == "Detach":
            return x.detach()
        raise SystemExit(f"error: layer `{name}`: op {kind} is not known to this script")


class ShapeError(Exception):
    pass


# --- The data --------------------------------------------------------------

IDX_NAMES = {
    "images": ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
    "labels": ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
}


def read_idx(folder, which):
    """The MNIST test images (uint8 [n, 28, 28]) or labels (uint8 [n]) in `folder`,
    plain or gzip (told apart by the magic bytes, as cnnc does)."""
    for stem in IDX_NAMES[which]:
        for ext in ["", ".gz"]:
            p = folder / (stem + ext)
            if p.is_file():
                raw = p.read_bytes()
                if raw[:2] == b"\x1f\x8b":
                    raw = gzip.decompress(raw)
                ndim = raw[3]
                dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
                data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
                return data.reshape(dims)
    raise SystemExit(f"error: no {IDX_NAMES[which][0]}[.gz] in {folder}")


def eval_transform(images, augment):
    """cnnc's evaluation transform (runtime/src/data/augment.rs) on float32
    [n, C, H, W] images: centre crops in order, then every normalize in order."""
    x = images
    norms = []
    for aug in augment:
        kind, a = op_kind(aug)
        if kind == "RandomCrop":
            size, pad = a["size"], a["pad"]
            padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            top = (padded.shape[2] - size) // 2
            left = (padded.shape[3] - size) // 2
            x = padded[:, :, top : top + size, left : left + size]
        elif kind == "HFlip":
            pass  # never at evaluation
        elif kind == "Normalize":
            norms.append((a["mean"], a["std"]))
        else:
            raise SystemExit(f"error: augmentation {kind} is not known to this script")
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = x.shape[1]
    for mean, std in norms:
        m = np.array(mean * c if len(mean) == 1 else mean, dtype=np.float32)
        s = np.array(std * c if len(std) == 1 else std, dtype=np.float32)
        x = (x - m[None, :, None, None]) / s[None, :, None, None]
    return x


def test_data(checked, cnn_file, spec):
    """The folder of the MNIST files cnnc evaluates on."""
    if spec is not None:
        kind, _, path = spec.partition(":")
        if kind != "mnist" or not path:
            raise SystemExit(f"error: --data `{spec}`: this script reads only mnist:PATH")
        return Path(path)
    train = checked.get("train")
    if not train:
        raise SystemExit("error: the file has no train section; give --data mnist:PATH")
    kind, a = op_kind(train["data"])
    if kind != "Mnist":
        raise SystemExit(f"error: the file's data is {kind}; this script reads only MNIST")
    return cnn_file.resolve().parent / a["path"]


# --- Main ------------------------------------------------------------------


def find_cnnc(given):
    if given:
        return given
    for p in [REPO / "target" / "release" / "cnnc", REPO / "target" / "debug" / "cnnc"]:
        if p.is_file():
            return str(p)
    found = shutil.which("cnnc")
    if found:
        return found
    raise SystemExit("error: no cnnc binary; run `cargo build --release` or give --cnnc")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", type=Path, help="the .cnn file")
    ap.add_argument("weights", type=Path, help="a cnnc weights file (.safetensors)")
    ap.add_argument("--data", help="mnist:PATH instead of the file's test data")
    ap.add_argument("--cnnc", help="the cnnc binary (default: target/release/cnnc)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed |Δlogit|")
    ap.add_argument("--batch", type=int, default=250, help="PyTorch batch size")
    args = ap.parse_args()
    cnnc = find_cnnc(args.cnnc)

    dump = subprocess.run(
        [cnnc, "dump", "--stage=checked", str(args.file)], capture_output=True, text=True
    )
    if dump.returncode != 0:
        sys.stderr.write(dump.stderr)
        raise SystemExit(f"error: cnnc dump failed (exit {dump.returncode})")
    checked = json.loads(dump.stdout)

    torch.manual_seed(0)
    model = CnncModel(checked["model"])
    state = load_file(str(args.weights))
    model.load_state_dict(state, strict=True)
    model.eval()
    print(f"model `{checked['model']['name']}`: {len(state)} tensors loaded (strict)")

    folder = test_data(checked, args.file, args.data)
    images = read_idx(folder, "images")
    labels = read_idx(folder, "labels").astype(np.int64)
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    train = checked.get("train") or {}
    x = eval_transform(x, train.get("augment", []))

    outs = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), args.batch):
                outs.append(model(torch.from_numpy(x[i : i + args.batch])))
    except ShapeError as e:
        print(f"FAIL: {e}")
        return 1
    torch_logits = torch.cat(outs).numpy()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        cmd = [cnnc, "eval", str(args.file), "--weights", str(args.weights)]
        cmd += ["--logits", str(out), "--json"]
        if args.data:
            cmd += ["--data", args.data]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.stderr.write(run.stderr)
            raise SystemExit(f"error: cnnc eval failed (exit {run.returncode})")
        report = json.loads(run.stdout.strip().splitlines()[-1])
        cnnc_logits = np.load(out)
        cnnc_labels = np.load(Path(tmp) / "logits.labels.npy")

    ok = True
    if cnnc_logits.shape != torch_logits.shape:
        print(f"FAIL: logits shape cnnc {cnnc_logits.shape}, PyTorch {torch_logits.shape}")
        return 1
    if not np.array_equal(cnnc_labels, labels):
        print("FAIL: cnnc's labels are not the test labels in file order")
        ok = False
    diff = np.abs(cnnc_logits.astype(np.float64) - torch_logits.astype(np.float64))
    worst = float(diff.max()) if diff.size else 0.0
    if not math.isfinite(worst):
        worst = math.inf
    where = np.unravel_index(int(np.nanargmax(diff)), diff.shape) if diff.size else (0, 0)
    torch_acc = float((torch_logits.argmax(1) == labels).mean())
    cnnc_acc = float((cnnc_logits.argmax(1) == cnnc_labels).mean())
    agree = int((torch_logits.argmax(1) == cnnc_logits.argmax(1)).sum())
    scale = float(np.abs(torch_logits).max())
    print(f"images: {len(labels)} from {folder}")
    print(
        f"max |logit difference|: {worst:.3e} (image {where[0]}, class {where[1]}; "
        f"largest |logit| {scale:.3g}; tolerance {args.tol:g})"
    )
    print(
        f"accuracy: cnnc {100 * cnnc_acc:.2f}% (cnnc eval says "
        f"{100 * report['accuracy']:.2f}%), PyTorch {100 * torch_acc:.2f}%; "
        f"same top class on {agree}/{len(labels)}"
    )
    if not worst <= args.tol:
        print(f"FAIL: logits differ by {worst:.3e} > {args.tol:g}")
        ok = False
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
