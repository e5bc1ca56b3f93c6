"""Benchmark one X-volution slot against the nn.Conv2d it replaces.

Usage::

    python scripts/bench_op.py                       # auto device, defaults sized for the device
    python scripts/bench_op.py --device cpu --iters 3 --warmup 1 --slots stage3 --impl reference
    python scripts/bench_op.py --device cuda --dtype bfloat16 --iters 50 --out bench_results/x.json

Two ResNet-50 slots (3x3 conv, stride 1, C -> C): stage 3 (N x 256 x 14 x 14) and stage 2
(N x 128 x 28 x 28). For each, four operators:

    conv2d        nn.Conv2d(C, C, 3, padding=1, bias=False), the baseline
    xconv-train   XConv2d training form in train mode (conv + BN, PSSA + BN, batch statistics)
    xconv-eval    XConv2d training form in eval mode (running statistics), forward only
    deploy        XConv2d.reparameterize(): the single deploy operator

are timed on forward (under no_grad) and forward+backward (grad w.r.t. input and weights), the
operators' calls interleaved round by round, and measured for memory in a separate, untimed
pass. Every number is also given as a ratio to conv2d. The table is printed; one JSON record
(environment, config, rows) goes to --out.
``--impl`` is passed to XConv2d (its PSSA path); the default leaves the choice to the module.

Memory means: on CUDA, the allocator's peak (torch.cuda.max_memory_allocated) during the call
minus what was allocated before it; on CPU, the peak of live bytes of the tensors created during
the call, followed through a dispatch mode (CPU has no allocator statistics). Either way the input
and weights are excluded and the output and gradients included. "saved" is the size of the
tensors autograd keeps for backward (saved_tensors_hooks; parameters left out), the activation
memory a training step holds per slot; it is measured the same way on every device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from xvol.ops import pssa_lean
from xvol.ops.xconv import XConv2d

SLOTS = {"stage3": (256, 14), "stage2": (128, 28)}  # name -> (channels, spatial size)
OPS = ("conv2d", "xconv-train", "xconv-eval", "deploy")
FWD_ONLY = {"xconv-eval"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = {"cpu": {"iters": 3, "warmup": 1}, "cuda": {"iters": 50, "warmup": 10}}
MEMORY_MEANING = {
    "cpu": "peak live bytes of tensors created during the call (dispatch-mode tracker)",
    "cuda": "torch.cuda.max_memory_allocated during the call minus memory allocated before it",
}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created by ops while active, freed ones subtracted.

    Storages are followed through weak references (a view shares its base's storage and is
    counted once), so the peak includes temporaries that a saved-tensor count misses.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                storage = leaf.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    nbytes = storage.nbytes()
                    self.live[key] = weakref.ref(
                        storage, lambda r, k=key, b=nbytes: self._free(k, b, r)
                    )
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base
    with LiveBytes() as tracker:
        out = fn()
        del out
    return tracker.peak


def time_ms(
    fns: dict[str, Callable[[], object]], iters: int, warmup: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """{name: (min, median) wall time in ms}, the device synchronized around each call.

    The calls are interleaved (one of each per round), so load from other processes falls on
    every operator alike and the ratios stay fair. The table reports the min, as timeit advises:
    on a shared machine the spread above it is interference, not the operator.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def build_ops(
    channels: int, device: torch.device, dtype: torch.dtype, impl: str = "auto"
) -> dict[str, nn.Module]:
    # impl picks XConv2d's PSSA path; "auto" (the default) is left to the module's own default.
    kw = {} if impl == "auto" else {"impl": impl}
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    xconv = XConv2d(channels, channels, 3, padding=1, **kw)
    with torch.no_grad():  # non-trivial BN statistics, so folding does real work
        for bn in (xconv.bn, xconv.pssa_bn):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    xconv_eval = xconv.eval()
    deploy = xconv_eval.reparameterize()
    xconv_train = XConv2d(channels, channels, 3, padding=1, **kw).train()
    xconv_train.load_state_dict(xconv.state_dict())
    ops = {"conv2d": conv, "xconv-train": xconv_train, "xconv-eval": xconv_eval, "deploy": deploy}
    return {name: m.to(device=device, dtype=dtype) for name, m in ops.items()}


def bench_slot(
    slot: str,
    batch: int,
    iters: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    impl: str = "auto",
) -> list[dict]:
    channels, size = SLOTS[slot]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device=device, dtype=dtype)
    grad_out = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    ops = build_ops(channels, device, dtype, impl)
    with torch.no_grad():
        max_diff = (ops["deploy"](x) - ops["xconv-eval"](x)).abs().max().item()
    forwards, forward_backwards, saved_fns = {}, {}, {}
    for name, module in ops.items():
        x_req = x.detach().requires_grad_()

        def forward(module: nn.Module = module) -> Tensor:
            with torch.no_grad():
                return module(x)

        def forward_backward(module: nn.Module = module, x_req: Tensor = x_req) -> Tensor:
            for p in module.parameters():
                p.grad = None
            x_req.grad = None
            y = module(x_req)
            y.backward(grad_out)
            return y

        forwards[name] = forward
        if name not in FWD_ONLY:
            forward_backwards[name] = forward_backward
            saved_fns[name] = lambda module=module, x_req=x_req: module(x_req)

    fwd_times = time_ms(forwards, iters, warmup, device)
    fwd_bwd_times = time_ms(forward_backwards, iters, warmup, device)
    rows = []
    for name, module in ops.items():
        row = {"slot": slot, "shape": list(x.shape), "op": name}
        row["fwd_ms"], row["fwd_ms_median"] = fwd_times[name]
        row["fwd_mem_bytes"] = peak_bytes(forwards[name], device)
        row["fwd_bwd_ms"], row["fwd_bwd_ms_median"] = fwd_bwd_times.get(name, (None, None))
        row["fwd_bwd_mem_bytes"] = row["saved_bytes"] = None
        if name in forward_backwards:
            row["fwd_bwd_mem_bytes"] = peak_bytes(forward_backwards[name], device)
            report = pssa_lean.saved_tensors_report(saved_fns[name], owned=module.parameters())
            row["saved_bytes"] = report.total_bytes
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_mem_bytes", "fwd_bwd_mem_bytes", "saved_bytes"):
            ok = row[key] is not None and base[key]
            row[key.rsplit("_", 1)[0] + "_ratio"] = row[key] / base[key] if ok else None
        row["deploy_vs_eval_max_abs_diff"] = max_diff if row["op"] == "deploy" else None
    return rows


def format_table(rows: list[dict], device: torch.device) -> str:
    def ms(v: float | None, r: float | None) -> str:
        return f"{v:9.1f} {r:5.2f}x" if v is not None else f"{'-':>9} {'':>6}"

    def mb(v: int | None, r: float | None) -> str:
        return f"{v / 2**20:8.1f} {r:5.2f}x" if v is not None else f"{'-':>8} {'':>6}"

    head = (
        f"{'slot':<7} {'op':<12} {'fwd ms':>16} {'fwd+bwd ms':>16} "
        f"{'fwd MiB':>15} {'fwd+bwd MiB':>15} {'saved MiB':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['slot']:<7} {r['op']:<12} {ms(r['fwd_ms'], r['fwd_ratio'])} "
            f"{ms(r['fwd_bwd_ms'], r['fwd_bwd_ratio'])} "
            f"{mb(r['fwd_mem_bytes'], r['fwd_mem_ratio'])} "
            f"{mb(r['fwd_bwd_mem_bytes'], r['fwd_bwd_mem_ratio'])} "
            f"{mb(r['saved_bytes'], r['saved_ratio'])}"
        )
    lines.append("ratios (x) are to conv2d of the same slot; times: best of --iters calls")
    lines.append(f"memory ({device.type}): {MEMORY_MEANING[device.type]}")
    lines.append(
        "saved: bytes autograd keeps for backward, parameters excluded (activation memory)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, default=32, help="N of both slots (default 32)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default cpu 3, cuda 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (cpu 1, cuda 10)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--slots", nargs="+", choices=tuple(SLOTS), default=list(SLOTS))
    p.add_argument(
        "--impl",
        choices=("auto", "reference", "lean", "triton"),
        default="auto",
        help="XConv2d PSSA path (default auto: the module's own choice per call)",
    )
    p.add_argument("--out", type=Path, default=Path("bench_results/bench_op.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    iters = args.iters if args.iters is not None else DEFAULTS[device.type]["iters"]
    warmup = args.warmup if args.warmup is not None else DEFAULTS[device.type]["warmup"]
    if iters < 1 or warmup < 0 or args.batch < 1:
        raise SystemExit(f"need --iters >= 1, --warmup >= 0, --batch >= 1; got {vars(args)}")
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    rows = []
    for slot in args.slots:
        rows += bench_slot(slot, args.batch, iters, warmup, device, dtype, args.impl)
    print(
        f"bench_op: device={device.type} dtype={args.dtype} batch={args.batch} iters={iters} "
        f"warmup={warmup} impl={args.impl} threads={torch.get_num_threads()} "
        f"torch={torch.__version__}"
    )
    print(format_table(rows, device))

    record = {
        "tool": "bench_op",
        "version": 1,
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_threads": torch.get_num_threads(),
        },
        "config": {
            "device": device.type,
            "dtype": args.dtype,
            "batch": args.batch,
            "iters": iters,
            "warmup": warmup,
            "impl": args.impl,
            "slots": {s: {"channels": SLOTS[s][0], "size": SLOTS[s][1]} for s in args.slots},
        },
        "memory_meaning": MEMORY_MEANING[device.type],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
