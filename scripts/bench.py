"""Model-level throughput: resnet50 vs xresnet50 (training and deploy forms), timm as reference.

Usage:
    python scripts/bench.py --device cpu                     # small CPU run (minutes)
    python scripts/bench.py --device cuda                    # one GPU: batch 256, 224 px, bf16
    python scripts/bench.py --device cuda --compile --batch 128 --iters 30
    python scripts/bench.py --device cpu --batch 2 --img-size 32 --iters 1 --warmup 0 --rounds 1

Synthetic data already on the device, SGD (Nesterov momentum), same settings for every model in
one run: autocast (bf16 on CUDA by default, none on CPU), channels_last, optional torch.compile.
Cases (img/s):

    train  timm resnet50            timm.create_model("resnet50"), a plain step
                                    (autocast forward, cross-entropy, backward, SGD step)
    train  resnet50 (xvol loop)     the same model trained by xvol.engine.loop.train_one_epoch
    train  xresnet50                build_model("resnet50", xconv=XConv2d, stages=(3,)), plain step
    infer  timm resnet50            eval, no_grad
    infer  xresnet50 deploy         xvol.reparam.reparameterize_model(xresnet50)
    infer  xresnet50 train-form     the training form in eval mode (BN running stats, 2 branches)

Timing is interleaved: after warm-up, ``--rounds`` rounds each time ``--iters`` steps of every
case in turn. img/s and ratios use each case's fastest round (the least disturbed by other
processes; the median is recorded too); ratios are between cases of the same run. On CPU the
default is one thread (``--threads``) timed by process CPU time: on a shared machine,
multi-threaded runs of small ops stall on busy cores, and wall time counts other processes'
time slices; both vary several-fold between rounds.

An op-level section times the ResNet-50 stage-3 slot (256 ch, img/16 px) through each PSSA path
(reference, lean, triton where it runs) and reports the bytes autograd saves per slot.
Prints tables; writes one JSON record to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from xvol.models import build_model
from xvol.ops import pssa_lean
from xvol.ops.xconv import XConv2d
from xvol.reparam import reparameterize_model

TARGETS = {
    "xresnet50 train / resnet50 train": (">=", 0.85),
    "deploy infer / resnet50 infer": (">=", 0.9),
    "deploy infer / train-form eval infer": (">=", 1.2),
    "xvol loop / timm step (resnet50 train)": (">=", 0.95),
    "deploy op / nn.Conv2d (stage-3 slot, fwd)": ("<=", 1.5),
    "lean saved activations / nn.Conv2d (stage-3 slot)": ("<=", 2.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--batch", type=int, default=None, help="default: 256 cuda, 8 cpu")
    p.add_argument("--img-size", type=int, default=None, help="default: 224 cuda, 96 cpu")
    p.add_argument("--iters", type=int, default=None, help="steps per round (30 cuda, 1 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (10 cuda, 1 cpu)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (5 cuda, 12 cpu)")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--impl", choices=pssa_lean.IMPLS, default="auto", help="XConv2d PSSA path")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on cpu)")
    p.add_argument("--skip-ops", action="store_true", help="no op-level section")
    p.add_argument("--out", type=Path, default=Path("bench_results/bench.json"))
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    defaults = {
        "batch": (256, 8),
        "img_size": (224, 96),
        "iters": (30, 1),
        "warmup": (10, 1),
        "rounds": (5, 12),
    }
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.amp is None:
        args.amp = "bf16" if gpu else "none"
    if args.threads is None and not gpu:
        args.threads = 1
    return args


# ---------------------------------------------------------------------------------------------
# Steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)


def plain_train_step(model: nn.Module, images, labels, device, amp) -> Callable[[int], None]:
    """timm-train.py-style step: autocast forward + loss, backward, optimizer step."""
    model.train()
    opt = _optimizer(model)

    def run(n: int) -> None:
        for _ in range(n):
            with _autocast(device, amp):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)

    return run


def xvol_loop_train_step(model, images, labels, device, amp, channels_last) -> Callable:
    """The same update through xvol.engine.loop.train_one_epoch (one call per timed block)."""
    from xvol.engine.loop import TrainOptions, TrainState, train_one_epoch

    opt = _optimizer(model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    opts = TrainOptions(amp_dtype=amp_dtype, channels_last=channels_last, progress_bar=False)

    def run(n: int) -> None:
        state = TrainState()
        train_one_epoch(
            model,
            [(images, labels)] * n,
            opt,
            F.cross_entropy,
            state,
            steps_per_epoch=n,
            device=device,
            opts=opts,
        )
        _sync(device)

    return run


def infer_step(model: nn.Module, images, device, amp) -> Callable[[int], None]:
    model.eval()

    def run(n: int) -> None:
        with torch.no_grad(), _autocast(device, amp):
            for _ in range(n):
                model(images)
        _sync(device)

    return run


def time_interleaved(
    cases: dict[str, Callable[[int], None]],
    iters: int,
    warmup: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per step of every case, one list entry per round, cases run in turn each round."""
    for run in cases.values():
        if warmup:
            run(warmup)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            tic = clock()
            run(iters)
            times[name].append((clock() - tic) / iters)
    return times


def pick_clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """Wall time, except single-threaded CPU runs: their process CPU time, which other processes
    time-slicing the same cores do not inflate (a shared machine's wall clock does)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time, "process CPU time (1 thread)"
    return time.perf_counter, "wall time"


# ---------------------------------------------------------------------------------------------
# Models


def _prepare(model: nn.Module, device: torch.device, args: argparse.Namespace) -> nn.Module:
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _maybe_compile(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    return torch.compile(model) if args.compile else model


def build_models(args: argparse.Namespace, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    xconv = partial(XConv2d, impl=args.impl)
    resnet = timm.create_model("resnet50", pretrained=False, num_classes=args.num_classes)
    resnet_loop = timm.create_model("resnet50", pretrained=False, num_classes=args.num_classes)
    xresnet = build_model("resnet50", args.num_classes, xconv=xconv, stages=(3,))
    # Deploy from a model with non-trivial BN statistics (one training-mode forward).
    xresnet_eval = build_model("resnet50", args.num_classes, xconv=xconv, stages=(3,))
    with torch.no_grad():
        xresnet_eval.train()(torch.randn(2, 3, 64, 64))
    deploy = reparameterize_model(xresnet_eval)
    return {
        name: _prepare(m, device, args)
        for name, m in {
            "resnet50": resnet,
            "resnet50_loop": resnet_loop,
            "xresnet50": xresnet,
            "xresnet50_eval": xresnet_eval.eval(),
            "xresnet50_deploy": deploy,
        }.items()
    }


# ---------------------------------------------------------------------------------------------
# Op level: the ResNet-50 stage-3 slot through each PSSA path


def op_level(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    hw = max(args.img_size // 16, 2)
    c = 256
    torch.manual_seed(0)
    x = torch.randn(args.batch, c, hw, hw, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(c, c, 3, 1, 1, bias=False).to(device)
    conv_bn = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)).to(device)
    impls = ["reference", "lean"]
    if device.type == "cuda" and pssa_lean.triton_supports(conv, x):
        from xvol.ops import triton_xconv

        if triton_xconv.available(x):
            impls.append("triton")
    slots = {impl: XConv2d(c, c, 3, 1, 1, impl=impl).to(device) for impl in impls}
    for m in [conv, conv_bn, *slots.values()]:
        if args.channels_last:
            m.to(memory_format=torch.channels_last)
    with torch.no_grad():
        slots["reference"].train()(x)  # non-trivial running statistics for the deploy fold
    for impl in impls[1:]:
        slots[impl].load_state_dict(slots["reference"].state_dict())
    deploys = {}
    for impl, m in slots.items():
        d = m.eval().reparameterize()
        d.impl = impl
        deploys[impl] = d
        m.train()

    def fwd(module: nn.Module) -> Callable[[int], None]:
        def run(n: int) -> None:
            with torch.no_grad(), _autocast(device, args.amp):
                for _ in range(n):
                    module(x)
            _sync(device)

        return run

    def fwd_bwd(module: nn.Module) -> Callable[[int], None]:
        xg = x.detach().requires_grad_()

        def run(n: int) -> None:
            for _ in range(n):
                with _autocast(device, args.amp):
                    out = module(xg)
                out.float().sum().backward()
            _sync(device)

        return run

    cases = {"fwd nn.Conv2d": fwd(conv)}
    cases.update({f"fwd deploy {impl}": fwd(d) for impl, d in deploys.items()})
    cases["fwd+bwd nn.Conv2d+BN"] = fwd_bwd(conv_bn)
    cases.update({f"fwd+bwd train {impl}": fwd_bwd(m) for impl, m in slots.items()})
    iters = max(args.iters, 3)
    times = time_interleaved(cases, iters, max(args.warmup, 1), args.rounds, pick_clock(device)[0])
    ms = {name: 1e3 * min(t) for name, t in times.items()}

    def owned(m: nn.Module) -> list[torch.Tensor]:
        return [*m.parameters(), *m.buffers()]

    xg = x.detach().requires_grad_()
    saved = {}
    for name, module in [("nn.Conv2d", conv), ("nn.Conv2d+BN", conv_bn)] + [
        (f"XConv2d {impl}", m) for impl, m in slots.items()
    ]:
        with _autocast(device, args.amp):
            report = pssa_lean.saved_tensors_report(lambda m=module: m(xg), owned(module))
        saved[name] = {
            "activation_bytes": report.activation_bytes,
            "per_channel_bytes": report.per_channel_bytes,
            "parameter_bytes": report.parameter_bytes,
        }
    best_deploy = min(ms[f"fwd deploy {impl}"] for impl in deploys)
    return {
        "input_shape": list(x.shape),
        "ms": ms,
        "saved": saved,
        "ratios": {
            "deploy op / nn.Conv2d (stage-3 slot, fwd)": best_deploy / ms["fwd nn.Conv2d"],
            "lean saved activations / nn.Conv2d (stage-3 slot)": saved["XConv2d lean"][
                "activation_bytes"
            ]
            / saved["nn.Conv2d"]["activation_bytes"],
        },
    }


# ---------------------------------------------------------------------------------------------


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    torch.backends.cudnn.benchmark = True
    env = environment(args, device)
    load_before = env["load_avg_1_5_15"]
    models = build_models(args, device)
    if args.compile:
        models = {name: _maybe_compile(m, args) for name, m in models.items()}

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)

    cases = {
        "train timm resnet50": plain_train_step(
            models["resnet50"], images, labels, device, args.amp
        ),
        "train resnet50 (xvol loop)": xvol_loop_train_step(
            models["resnet50_loop"], images, labels, device, args.amp, args.channels_last
        ),
        "train xresnet50": plain_train_step(models["xresnet50"], images, labels, device, args.amp),
        "infer timm resnet50": infer_step(models["resnet50"], images, device, args.amp),
        "infer xresnet50 deploy": infer_step(models["xresnet50_deploy"], images, device, args.amp),
        "infer xresnet50 train-form eval": infer_step(
            models["xresnet50_eval"], images, device, args.amp
        ),
    }
    tic = time.perf_counter()
    clock, clock_name = pick_clock(device)
    times = time_interleaved(cases, args.iters, args.warmup, args.rounds, clock)
    img_s = {name: args.batch / min(t) for name, t in times.items()}
    img_s_median = {name: args.batch / statistics.median(t) for name, t in times.items()}
    spread = {name: (max(t) - min(t)) / statistics.median(t) for name, t in times.items()}

    ratios = {
        "xresnet50 train / resnet50 train": img_s["train xresnet50"] / img_s["train timm resnet50"],
        "deploy infer / resnet50 infer": img_s["infer xresnet50 deploy"]
        / img_s["infer timm resnet50"],
        "deploy infer / train-form eval infer": img_s["infer xresnet50 deploy"]
        / img_s["infer xresnet50 train-form eval"],
        "xvol loop / timm step (resnet50 train)": img_s["train resnet50 (xvol loop)"]
        / img_s["train timm resnet50"],
    }
    ops = None if args.skip_ops else op_level(args, device)
    if ops is not None:
        ratios.update(ops["ratios"])
    elapsed = time.perf_counter() - tic

    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"
    }
    print(
        f"# bench.py on {env.get('gpu', platform.processor() or 'cpu')} ({device}); "
        f"batch {args.batch}, {args.img_size} px, amp {args.amp}, channels_last "
        f"{args.channels_last}, compile {args.compile}, impl {args.impl}; "
        f"best of {args.rounds} interleaved rounds x {args.iters} steps; threads "
        f"{torch.get_num_threads()}; {clock_name}; load avg before {load_before}"
    )
    rows = [
        [name, f"{img_s[name]:.1f}", f"{img_s_median[name]:.1f}",
         f"{1e3 * min(times[name]):.1f}", f"{100 * spread[name]:.0f}%"]
        for name in cases
    ]  # fmt: skip
    print(_table(rows, ["case", "img/s", "img/s (median)", "ms/step", "round spread"]))
    print()
    rrows = []
    for name, value in ratios.items():
        op, target = TARGETS[name]
        met = value >= target if op == ">=" else value <= target
        rrows.append([name, f"{value:.3f}", f"{op} {target}", "yes" if met else "no"])
    print(_table(rrows, ["ratio", "value", "target (GPU)", "met here"]))
    if ops is not None:
        print()
        print(f"op level: stage-3 slot, input {ops['input_shape']}")
        print(_table([[k, f"{v:.2f}"] for k, v in ops["ms"].items()], ["op", "ms/call (best)"]))
        srows = [
            [k, v["activation_bytes"], v["per_channel_bytes"], v["parameter_bytes"],
             f"{v['activation_bytes'] / ops['saved']['nn.Conv2d']['activation_bytes']:.2f}"]
            for k, v in ops["saved"].items()
        ]  # fmt: skip
        print(
            _table(
                srows,
                ["saved for backward", "activations B", "per-channel B", "params B", "x conv"],
            )
        )
    record = {
        "environment": env,
        "load_avg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": settings,
        "clock": clock_name,
        "img_per_s": img_s,
        "img_per_s_median": img_s_median,
        "ms_per_step_rounds": {k: [1e3 * t for t in v] for k, v in times.items()},
        "ratios": ratios,
        "targets": {k: list(v) for k, v in TARGETS.items()},
        "ops": ops,
        "elapsed_s": elapsed,
        "note": "ratios measured in one run; on CPU they are CPU ratios, not the GPU targets",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
