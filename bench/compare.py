#!/usr/bin/env python3
# The cnnc-vs-PyTorch comparison of DESIGN.md's "Performance yardstick": runs
# `cnnc bench examples/bench/mK.cnn --json` and `torch_baseline.py --model MK
# --mode train --json` for M1, M2, M3 at 1 and 2 threads, alternating the two
# (which goes first flips every repeat), and prints a markdown table of median
# training-step times and the ratio cnnc/torch. See bench/README.md.
"""Compare cnnc's training step with PyTorch's on the benchmark networks.

Run with the Python that has torch installed, from anywhere:

    cargo build --release
    ~/.venvs/torch/bin/python bench/compare.py [--repeats 3] [--threads 1,2]

Each (network, threads) pair is measured --repeats times; one measurement is one
fresh process of each side, reporting the median of its timed steps. The table
shows the median over the repeats (and the range of the per-run medians), and
ratio = cnnc / torch (above 1: cnnc is slower).
"""
import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"M1": "examples/bench/m1.cnn", "M2": "examples/bench/m2.cnn", "M3": "examples/bench/m3.cnn"}


def machine():
    """CPU model, logical CPUs and the vector extensions that matter here."""
    name, flags = platform.processor() or platform.machine(), set()
    family = model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    name = value
                elif key == "cpu family" and family is None:
                    family = value
                elif key == "model" and model is None:
                    model = value
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ("avx", "avx2", "fma", "avx512f") if f in flags]
    desc = name
    if family is not None:
        desc += f" (family {family}, model {model})"
    return f"{desc}, {os.cpu_count()} logical CPUs, {'+'.join(isa) or 'no AVX'}"


def load_average():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def run_json(cmd, cwd):
    """Runs `cmd`; returns the JSON object of its first stdout line, and the
    child's CPU time over its wall time (well below the thread count means it
    waited for a CPU: another process was running)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr}")
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line), cpu / max(wall, 1e-9)
    sys.exit(f"no JSON from: {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="M1,M2,M3")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cnnc", default=str(ROOT / "target/release/cnnc"), help="the cnnc binary")
    ap.add_argument("--backend", default="jit", help="cnnc bench --backend")
    ap.add_argument("--cnnc-steps", default="M1=30,M2=10,M3=10",
                    help="timed steps per cnnc run, per network")
    ap.add_argument("--cnnc-warmup", type=int, default=1)
    ap.add_argument("--torch-steps", type=int, default=50)
    ap.add_argument("--torch-warmup", type=int, default=10)
    ap.add_argument("--torch-python", default=sys.executable, help="a Python with torch")
    ap.add_argument("--torch-script", default=str(ROOT / "bench/torch_baseline.py"))
    ap.add_argument("--torch-extra", default="",
                    help="more torch_baseline.py arguments, e.g. '--omp-wait-policy passive'")
    ap.add_argument("--raw", help="also write every measurement to this JSON-lines file")
    ap.add_argument("--explain", action="store_true",
                    help="compare one image's saliency and CAM (torch_baseline.py --mode saliency/cam, "
                         "cnnc bench --explain) instead of the training step")
    ap.add_argument("--explain-steps", type=int, default=200,
                    help="timed explanations per run (both sides) with --explain")
    args = ap.parse_args()

    if not Path(args.cnnc).is_file():
        sys.exit(f"no cnnc binary at {args.cnnc}: run `cargo build --release` first, or pass --cnnc")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            sys.exit(f"unknown network {m}; expected some of {', '.join(MODELS)}")
    threads = [int(t) for t in args.threads.split(",")]
    steps = dict(kv.split("=") for kv in args.cnnc_steps.split(","))
    raw = open(args.raw, "w") if args.raw else None

    print(f"machine: {machine()}", flush=True)
    print(f"load average at start: {load_average()}", flush=True)
    if args.explain:
        return compare_explain(args, models, threads, raw)
    results = {}  # (model, threads) -> {"cnnc": [...], "torch": [...]}
    t_start = time.time()
    for r in range(args.repeats):
        for m in models:
            for t in threads:
                cnnc_cmd = [args.cnnc, "bench", MODELS[m], "--json", "--backend", args.backend,
                            "--threads", str(t), "--steps", steps.get(m, "5"),
                            "--warmup", str(args.cnnc_warmup)]
                torch_cmd = [args.torch_python, args.torch_script, "--model", m, "--threads", str(t),
                             "--mode", "train", "--json", "--steps", str(args.torch_steps),
                             "--warmup", str(args.torch_warmup)] + shlex.split(args.torch_extra)
                order = [("cnnc", cnnc_cmd), ("torch", torch_cmd)]
                if r % 2 == 1:
                    order.reverse()
                for side, cmd in order:
                    res, busy = run_json(cmd, ROOT)
                    ms = res["train_step_ms"]["median"] if side == "cnnc" else res["median_ms"]
                    results.setdefault((m, t), {"cnnc": [], "torch": [], "cnnc_threads": None,
                                                "flops": None, "torch_version": None})
                    entry = results[(m, t)]
                    entry[side].append(ms)
                    if side == "cnnc":
                        entry["cnnc_threads"] = res["threads"]
                    else:
                        entry["flops"] = res["flops_step"]
                        entry["torch_version"] = res["torch"]
                    if raw:
                        raw.write(json.dumps(dict(side=side, model=m, threads=t, repeat=r, cpu_per_wall=busy,
                                             result=res)) + "\n")
                    print(f"  repeat {r + 1}/{args.repeats} {m} threads={t} {side:5s} {ms:9.2f} ms"
                          f"  (cpu/wall {busy:.2f}, load {load_average()})", flush=True)

    torch_version = next((e["torch_version"] for e in results.values() if e["torch_version"]), "?")
    print(f"load average at end: {load_average()}; {time.time() - t_start:.0f} s")
    print()
    print(f"cnnc {args.backend} backend vs PyTorch {torch_version} eager, batch 64, median training step "
          f"(forward, loss, backward, clip, SGD update), median of {args.repeats} alternating runs "
          f"(range of the per-run medians in brackets); best / best = fastest cnnc run over fastest "
          f"PyTorch run (less sensitive to other load on the machine); GFLOP/s from PyTorch's "
          f"train-step FLOP count at the median")
    print()
    print("| network | threads | cnnc ms | PyTorch ms | cnnc / torch | best / best | cnnc GFLOP/s | PyTorch GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in models:
        for t in threads:
            e = results[(m, t)]
            c, p = statistics.median(e["cnnc"]), statistics.median(e["torch"])
            tag = f"{t}" if e["cnnc_threads"] == t else f"{t} (cnnc: {e['cnnc_threads']})"
            gf = lambda ms: e["flops"] / (ms / 1e3) / 1e9
            print(f"| {m} | {tag} | {c:.1f} [{min(e['cnnc']):.1f}-{max(e['cnnc']):.1f}] "
                  f"| {p:.1f} [{min(e['torch']):.1f}-{max(e['torch']):.1f}] | {c / p:.2f} "
                  f"| {min(e['cnnc']) / min(e['torch']):.2f} "
                  f"| {gf(c):.1f} | {gf(p):.1f} |")
    if raw:
        raw.close()


def compare_explain(args, models, threads, raw):
    """One image's saliency and CAM (predicted class), cnnc vs PyTorch, alternating."""
    results = {}  # (model, threads, method) -> {"cnnc": [...], "torch": [...]}
    t_start = time.time()
    torch_version = "?"
    for r in range(args.repeats):
        for m in models:
            for t in threads:
                cnnc_cmd = [args.cnnc, "bench", MODELS[m], "--json", "--explain", "--backend", args.backend,
                            "--threads", str(t), "--steps", str(args.explain_steps), "--warmup", "10"]
                torch_cmds = [[args.torch_python, args.torch_script, "--model", m, "--threads", str(t),
                               "--mode", mode, "--json", "--steps", str(args.explain_steps),
                               "--warmup", str(args.torch_warmup)] + shlex.split(args.torch_extra)
                              for mode in ("saliency", "cam")]
                order = [("cnnc", cnnc_cmd), ("torch", torch_cmds)]
                if r % 2 == 1:
                    order.reverse()
                for side, cmd in order:
                    if side == "cnnc":
                        res, busy = run_json(cmd, ROOT)
                        got = {"saliency": res["explain"]["saliency_ms"]["median"],
                               "cam": res["explain"]["cam_ms"]["median"]}
                    else:
                        got = {}
                        for mode, c in zip(("saliency", "cam"), cmd):
                            res, busy = run_json(c, ROOT)
                            got[mode] = res["median_ms"]
                            torch_version = res["torch"]
                    for method, ms in got.items():
                        results.setdefault((m, t, method), {"cnnc": [], "torch": []})[side].append(ms)
                        if raw:
                            raw.write(json.dumps(dict(side=side, model=m, threads=t, repeat=r, method=method,
                                                      ms=ms)) + "\n")
                    print(f"  repeat {r + 1}/{args.repeats} {m} threads={t} {side:5s} "
                          + "  ".join(f"{k} {v:.3f} ms" for k, v in got.items())
                          + f"  (load {load_average()})", flush=True)
    print(f"load average at end: {load_average()}; {time.time() - t_start:.0f} s")
    print()
    print(f"cnnc {args.backend} backend vs PyTorch {torch_version} eager: one image, predicted class, "
          f"eval mode; saliency = forward, backward, |grad| max over channels; CAM = forward, weighted "
          f"sum of the last feature map, ReLU, bilinear upsampling; median of {args.repeats} alternating "
          f"runs (range in brackets)")
    print()
    print("| network | threads | method | cnnc ms | PyTorch ms | cnnc / torch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in models:
        for t in threads:
            for method in ("saliency", "cam"):
                e = results[(m, t, method)]
                c, p = statistics.median(e["cnnc"]), statistics.median(e["torch"])
                print(f"| {m} | {t} | {method} | {c:.3f} [{min(e['cnnc']):.3f}-{max(e['cnnc']):.3f}] "
                      f"| {p:.3f} [{min(e['torch']):.3f}-{max(e['torch']):.3f}] | {c / p:.2f} |")
    if raw:
        raw.close()


if __name__ == "__main__":
    main()
