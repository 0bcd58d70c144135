#!/usr/bin/env python3
"""Cross-check of runtime/src/optim.rs and runtime/src/checkpoint.rs against PyTorch.

Runs torch.optim SGD / Adam / AdamW, the LR schedulers and clip_grad_norm_ on the
tiny cases of the Rust unit tests, prints PyTorch's numbers, and compares them with
the values the Rust tests expect (max abs difference must be <= 1e-6).

    python3 tools/check_torch_optim.py [--weights W.safetensors] [--write-torch OUT]

--weights checks that a cnnc weights file of the test net (c1: conv 1->4 k3,
bn1: batchnorm 4, fc: linear 4->3) loads with load_state_dict(strict=True);
--write-torch writes that net's PyTorch state_dict as safetensors for cnnc to load.

Needs torch, numpy and safetensors (e.g. in a venv outside the repo). No Rust test
depends on this script.
"""

import argparse
import math
import sys

import torch

P0 = [1.0, -2.0, 0.5]
G = [[0.5, 0.25, -1.0], [-1.0, 0.5, 2.0], [0.25, -0.75, 0.5]]

# What the Rust tests in runtime/src/optim.rs expect after each step.
EXPECTED = {
    "sgd": [[0.95, -2.025, 0.6], [1.05, -2.075, 0.4], [1.025, -2.0, 0.35]],
    "sgd momentum=0.9": [
        [0.95, -2.025, 0.6],
        [1.005, -2.0975, 0.49],
        [1.0295, -2.08775, 0.341],
    ],
    "sgd momentum=0.9 nesterov": [
        [0.905, -2.0475, 0.69],
        [1.0545, -2.16275, 0.391],
        [1.05155, -2.078975, 0.2069],
    ],
    "sgd momentum=0.9 weight_decay=0.1": [
        [0.94, -2.005, 0.595],
        [0.9766, -2.03945, 0.47455],
    ],
}


def adam_ref(wd, decoupled, steps):
    """The f64 reference the Rust tests use for Adam/AdamW."""
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    p = list(P0)
    m, v = [0.0] * 3, [0.0] * 3
    out = []
    for t, g in enumerate(G[:steps], start=1):
        for i in range(3):
            gi = g[i]
            if decoupled:
                p[i] *= 1 - lr * wd
            else:
                gi += wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mh = m[i] / (1 - b1**t)
            vh = v[i] / (1 - b2**t)
            p[i] -= lr * mh / (math.sqrt(vh) + eps)
        out.append(list(p))
    return out


EXPECTED["adam"] = adam_ref(0.0, False, 3)
EXPECTED["adam weight_decay=0.1"] = adam_ref(0.1, False, 3)
EXPECTED["adamw weight_decay=0.1"] = adam_ref(0.1, True, 3)


def run(make_opt, steps):
    p = torch.nn.Parameter(torch.tensor(P0, dtype=torch.float32))
    opt = make_opt([p])
    out = []
    for g in G[:steps]:
        opt.zero_grad()
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        out.append([float(x) for x in p.detach()])
    return out


def check_optimizers():
    SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
    cases = {
        "sgd": (lambda ps: SGD(ps, lr=0.1), 3),
        "sgd momentum=0.9": (lambda ps: SGD(ps, lr=0.1, momentum=0.9), 3),
        "sgd momentum=0.9 nesterov": (
            lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
            3,
        ),
        "sgd momentum=0.9 weight_decay=0.1": (
            lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
            2,
        ),
        "adam": (lambda ps: Adam(ps, lr=0.01), 3),
        "adam weight_decay=0.1": (lambda ps: Adam(ps, lr=0.01, weight_decay=0.1), 3),
        "adamw weight_decay=0.1": (
            lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1),
            3,
        ),
    }
    worst = 0.0
    for name, (make, steps) in cases.items():
        got = run(make, steps)
        diff = max(
            abs(a - b) for gs, ws in zip(got, EXPECTED[name]) for a, b in zip(gs, ws)
        )
        worst = max(worst, diff)
        print(f"{name}:")
        for t, row in enumerate(got, start=1):
            print(f"  step {t}: " + ", ".join(f"{x:.9g}" for x in row))
        print(f"  max |torch - expected| = {diff:.3g}")
    return worst


def check_schedules():
    """StepLR (per epoch) and CosineAnnealingLR (per step) at the Rust tests' points:
    base 0.1, 10 steps per epoch, 10 epochs."""
    worst = 0.0
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(p, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for epoch in range(10):
        lr = opt.param_groups[0]["lr"]
        want = 0.1 * 0.5 ** (epoch // 3)
        worst = max(worst, abs(lr - want))
        opt.step()
        sched.step()
    opt = torch.optim.SGD(p, lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=0.001)
    for step in range(100):
        lr = opt.param_groups[0]["lr"]
        want = 0.001 + 0.099 * (1 + math.cos(math.pi * step / 100)) / 2
        worst = max(worst, abs(lr - want))
        opt.step()
        sched.step()
    print(f"schedules: max |torch - formula| = {worst:.3g}")
    return worst


def check_clip():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, -4.0])]
    ps = []
    for x in g:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = x.clone()
        ps.append(p)
    norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    got = [float(v) for p in ps for v in p.grad]
    want = [0.6, 0.0, 0.0, -0.8]
    diff = max(abs(a - b) for a, b in zip(got, want))
    print(f"clip_grad_norm_: norm {float(norm):.9g}, grads {got}, max diff {diff:.3g}")
    return diff


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights")
    ap.add_argument("--write-torch")
    args = ap.parse_args()
    worst = max(check_optimizers(), check_schedules(), check_clip())
    if args.weights:
        from safetensors.torch import load_file

        sd = load_file(args.weights)
        net = Net()
        net.load_state_dict(sd, strict=True)
        print(f"{args.weights}: load_state_dict(strict=True) ok")
        for k, v in sd.items():
            print(f"  {k}: {v.dtype} {list(v.shape)}")
    if args.write_torch:
        from safetensors.torch import save_file

        torch.manual_seed(0)
        net = Net()
        net.bn1.running_mean.fill_(0.25)
        net.bn1.num_batches_tracked.fill_(7)
        save_file(net.state_dict(), args.write_torch, metadata={"format": "pt"})
        print(f"wrote {args.write_torch}; c1.weight[0,0,0] = {net.c1.weight[0, 0, 0].tolist()}")
    print(f"worst difference: {worst:.3g}")
    # Clip: PyTorch divides by (norm + 1e-6), so its grads differ by ~1e-7 here.
    if worst > 1e-6:
        print("MISMATCH")
        sys.exit(1)


if __name__ == "__main__":
    main()
