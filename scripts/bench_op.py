"""Benchmark one X-volution slot against the nn.Conv2d it replaces.

Usage::

    python scripts/bench_op.py                       # auto device, defaults sized for the device
    python scripts/bench_op.py --device cpu --iters 3 --warmup 1 --slots stage3 --impl reference
    python scripts/bench_op.py --device cpu --impl reference lean gemm   # one row set per path
    python scripts/bench_op.py --device cuda --dtype bfloat16 --iters 50 --out bench_results/x.json

Two ResNet-50 slots (3x3 conv, stride 1, C -> C): stage 3 (N x 256 x 14 x 14) and stage 2
(N x 128 x 28 x 28). For each, four operators:

    conv2d        nn.Conv2d(C, C, 3, padding=1, bias=False), the baseline
    xconv-train   XConv2d training form in train mode (conv + BN, PSSA + BN, batch statistics)
    xconv-eval    XConv2d training form in eval mode (running statistics), forward only
    deploy        XConv2d.reparameterize(): the single deploy operator

are timed on forward (under inference_mode) and forward+backward (grad w.r.t. input and
weights), the operators' calls interleaved round by round, and measured for memory in a separate,
untimed pass. Every number is also given as a ratio to conv2d. On CPU the default is one thread
(``--threads``) timed by process CPU time, as in bench.py: a shared machine's wall clock counts
other processes' time slices. The table is printed; one JSON record
(environment, config, rows) goes to --out.
``--impl`` sets the X-volution operators' PSSA path (xvol.ops.dispatch.set_impl); with several,
each gets its own rows (same weights), and a path that raises (a backend that does not run here or
is not implemented yet) is reported as ``failed: <reason>`` instead of stopping the run. The
default, auto, leaves the choice to the module.

Memory means: on CUDA, the allocator's peak (torch.cuda.max_memory_allocated) during the call
minus what was allocated before it; on CPU, the peak of live bytes of the tensors created during
the call, followed through a dispatch mode (CPU has no allocator statistics). Either way the input
and weights are excluded and the output and gradients included. "saved" is the size of the
tensors autograd keeps for backward (saved_tensors_hooks; parameters and buffers left out), the
activation memory a training step holds per slot; it is measured the same way on every device.

The measuring is :func:`measure_slot` (with :func:`time_ms`, :func:`pick_clock` and
:func:`failure_line`), importable: scripts/bench.py's op-level section calls the same function on
its stage-3 slot (``from bench_op import ...``), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from xvol.formats.files import write_json_atomic
from xvol.ops import dispatch, pssa_lean
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


def failure_line(exc: BaseException) -> str:
    """One line naming a failure: exception type and the first line of its message."""
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0]}" if msg else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def time_ms(
    fns: dict[str, Callable[[], object]],
    iters: int,
    warmup: int,
    device: torch.device,
    failed: dict[str, str] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    number: int = 1,
) -> dict[str, tuple[float, float]]:
    """{name: (min, median) ms per call by ``clock``} over ``iters`` samples of ``number`` calls
    each (their mean), the device synchronized around each sample.

    The calls are interleaved (one of each per round), so load from other processes falls on
    every operator alike and the ratios stay fair. The table reports the min, as timeit advises:
    on a shared machine the spread above it is interference, not the operator. A call that
    raises is left out from then on, its reason in ``failed`` (a backend that does not run here
    is reported, not fatal). Hand-written rather than torch.utils.benchmark.Timer, which times
    one statement at a time: run back to back, the backends would meet different load.
    """
    failed = {} if failed is None else failed
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)

    def attempt(name: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
            return True
        except Exception as exc:
            failed[name] = failure_line(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return False

    for name, fn in fns.items():
        for _ in range(max(warmup, 1)):  # at least one untimed call finds a broken backend
            if not attempt(name, fn):
                break
    times: dict[str, list[float]] = {name: [] for name in fns if name not in failed}
    for _ in range(iters):
        for name in list(times):
            sync(device)
            t0 = clock()
            if not all(attempt(name, fns[name]) for _ in range(number)):
                del times[name]
                continue
            sync(device)
            times[name].append((clock() - t0) * 1e3 / number)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def pick_clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """Wall time, except single-threaded CPU runs: their process CPU time, which other processes
    time-slicing the same cores do not inflate (a shared machine's wall clock does)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time, "process CPU time (1 thread)"
    return time.perf_counter, "wall time"


@dataclass
class SlotMeasure:
    """What :func:`measure_slot` found, by operator key. A key whose measurement raised is left
    out of that measurement's dict and its one-line reason is in the matching ``*_failed``."""

    fwd_ms: dict[Hashable, tuple[float, float]] = field(default_factory=dict)  # (min, median)
    fwd_bwd_ms: dict[Hashable, tuple[float, float]] = field(default_factory=dict)
    saved: dict[Hashable, pssa_lean.SavedTensorsReport] = field(default_factory=dict)
    fwd_mem: dict[Hashable, int] = field(default_factory=dict)  # peak_bytes, memory=True only
    fwd_bwd_mem: dict[Hashable, int] = field(default_factory=dict)
    fwd_failed: dict[Hashable, str] = field(default_factory=dict)
    fwd_bwd_failed: dict[Hashable, str] = field(default_factory=dict)
    saved_failed: dict[Hashable, str] = field(default_factory=dict)


def measure_slot(
    modules: Mapping[Hashable, nn.Module],
    x: Tensor,
    grad_out: Tensor,
    device: torch.device,
    *,
    fwd: Iterable[Hashable],
    fwd_bwd: Iterable[Hashable] = (),
    saved: Iterable[Hashable] = (),
    iters: int,
    warmup: int,
    number: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    memory: bool = False,
) -> SlotMeasure:
    """Time and measure the slot operators ``modules`` on input ``x``: the one implementation
    behind this script's rows and bench.py's op-level section.

    ``fwd``: keys timed on a forward under ``torch.inference_mode``; ``fwd_bwd``: keys timed on
    forward + backward (``grad_out`` into the output, gradients w.r.t. the input and weights,
    the module's gradients cleared first); each set interleaved by :func:`time_ms` (``iters``
    samples of ``number`` calls after ``warmup`` calls). ``saved``: keys whose training forward
    is measured by ``pssa_lean.saved_tensors_report`` (parameters and buffers counted apart),
    except those whose forward + backward already failed. ``context``: entered around every
    forward (bench.py's autocast). ``memory``: also each timed call's :func:`peak_bytes`.
    """
    result = SlotMeasure()
    forwards, forward_backwards, trains = {}, {}, {}
    for key, module in modules.items():
        x_req = x.detach().requires_grad_()

        def forward(module: nn.Module = module) -> Tensor:
            with torch.inference_mode(), context():
                return module(x)

        def forward_backward(module: nn.Module = module, x_req: Tensor = x_req) -> Tensor:
            for p in module.parameters():
                p.grad = None
            x_req.grad = None
            with context():
                y = module(x_req)
            y.backward(grad_out)
            return y

        def train(module: nn.Module = module, x_req: Tensor = x_req) -> Tensor:
            with context():
                return module(x_req)

        forwards[key], forward_backwards[key], trains[key] = forward, forward_backward, train
    fwd_fns = {key: forwards[key] for key in fwd}
    fwd_bwd_fns = {key: forward_backwards[key] for key in fwd_bwd}
    result.fwd_ms = time_ms(fwd_fns, iters, warmup, device, result.fwd_failed, clock, number)
    result.fwd_bwd_ms = time_ms(
        fwd_bwd_fns, iters, warmup, device, result.fwd_bwd_failed, clock, number
    )
    if memory:
        for key, fn in fwd_fns.items():
            if key not in result.fwd_failed:
                result.fwd_mem[key] = peak_bytes(fn, device)
        for key, fn in fwd_bwd_fns.items():
            if key not in result.fwd_bwd_failed:
                result.fwd_bwd_mem[key] = peak_bytes(fn, device)
    for key in saved:
        if key in result.fwd_bwd_failed:
            continue
        module = modules[key]
        try:
            owned = [*module.parameters(), *module.buffers()]
            result.saved[key] = pssa_lean.saved_tensors_report(trains[key], owned)
        except Exception as exc:
            result.saved_failed[key] = failure_line(exc)
    return result


def build_ops(
    channels: int, device: torch.device, dtype: torch.dtype, impl: str = "auto"
) -> dict[str, nn.Module]:
    """The slot's four operators, the X-volution ones on PSSA path ``impl`` (set_impl)."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    xconv = XConv2d(channels, channels, 3, padding=1)
    with torch.no_grad():  # non-trivial BN statistics, so folding does real work
        for bn in (xconv.bn, xconv.pssa_bn):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    xconv_eval = xconv.eval()
    deploy = xconv_eval.reparameterize()
    xconv_train = copy.deepcopy(xconv).train()
    ops = {"conv2d": conv, "xconv-train": xconv_train, "xconv-eval": xconv_eval, "deploy": deploy}
    for name in ("xconv-train", "xconv-eval", "deploy"):
        dispatch.set_impl(ops[name], impl)
    return {name: m.to(device=device, dtype=dtype) for name, m in ops.items()}


def bench_slot(
    slot: str,
    batch: int,
    iters: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    impls: Sequence[str] = ("auto",),
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """One row per operator: conv2d once, the X-volution operators once per PSSA path."""
    if isinstance(impls, str):
        impls = [impls]
    channels, size = SLOTS[slot]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device=device, dtype=dtype)
    grad_out = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    ops: dict[tuple[str, str | None], nn.Module] = {}
    max_diff: dict[str, float | None] = {}
    for impl in impls:
        torch.manual_seed(0)  # the same weights and statistics for every path
        built = build_ops(channels, device, dtype, impl)
        ops.setdefault(("conv2d", None), built.pop("conv2d"))
        ops.update({(name, impl): m for name, m in built.items()})
        try:
            with torch.no_grad():
                diff = built["deploy"](x) - built["xconv-eval"](x)
            max_diff[impl] = diff.abs().max().item()
        except Exception:
            max_diff[impl] = None  # the failure itself is reported by the timed calls
    trained = [key for key in ops if key[0] not in FWD_ONLY]
    measure = measure_slot(ops, x, grad_out, device, fwd=list(ops), fwd_bwd=trained,
                           saved=trained, iters=iters, warmup=warmup, clock=clock,
                           memory=True)  # fmt: skip
    rows = []
    for key in ops:
        name, impl = key
        errors = [e for e in (measure.fwd_failed.get(key), measure.fwd_bwd_failed.get(key),
                              measure.saved_failed.get(key)) if e]  # fmt: skip
        row = {"slot": slot, "shape": list(x.shape), "op": name, "impl": impl}
        row["status"] = f"failed: {errors[0]}" if errors else "ok"
        row["fwd_ms"], row["fwd_ms_median"] = measure.fwd_ms.get(key, (None, None))
        row["fwd_mem_bytes"] = measure.fwd_mem.get(key)
        row["fwd_bwd_ms"], row["fwd_bwd_ms_median"] = measure.fwd_bwd_ms.get(key, (None, None))
        row["fwd_bwd_mem_bytes"] = measure.fwd_bwd_mem.get(key)
        report = measure.saved.get(key)
        row["saved_bytes"] = report.total_bytes if report is not None else None
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_mem_bytes", "fwd_bwd_mem_bytes", "saved_bytes"):
            ok = row[key] is not None and base[key]
            row[key.rsplit("_", 1)[0] + "_ratio"] = row[key] / base[key] if ok else None
        row["deploy_vs_eval_max_abs_diff"] = (
            max_diff.get(row["impl"]) if row["op"] == "deploy" else None
        )
    return rows


def format_table(rows: list[dict], device: torch.device) -> str:
    def ms(v: float | None, r: float | None) -> str:
        return f"{v:9.1f} {r:5.2f}x" if v is not None else f"{'-':>9} {'':>6}"

    def mb(v: int | None, r: float | None) -> str:
        return f"{v / 2**20:8.1f} {r:5.2f}x" if v is not None else f"{'-':>8} {'':>6}"

    head = (
        f"{'slot':<7} {'op':<12} {'impl':<10} {'fwd ms':>16} {'fwd+bwd ms':>16} "
        f"{'fwd MiB':>15} {'fwd+bwd MiB':>15} {'saved MiB':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['slot']:<7} {r['op']:<12} {r['impl'] or '-':<10} "
            f"{ms(r['fwd_ms'], r['fwd_ratio'])} "
            f"{ms(r['fwd_bwd_ms'], r['fwd_bwd_ratio'])} "
            f"{mb(r['fwd_mem_bytes'], r['fwd_mem_ratio'])} "
            f"{mb(r['fwd_bwd_mem_bytes'], r['fwd_bwd_mem_ratio'])} "
            f"{mb(r['saved_bytes'], r['saved_ratio'])}"
            + ("" if r["status"] == "ok" else f"  {r['status']}")
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
        nargs="+",
        choices=dispatch.IMPLS,
        default=["auto"],
        help="XConv2d PSSA path(s), each its own rows (default auto: the module's choice per "
        "call); a path that raises is reported as failed",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on cpu)")
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
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    clock, clock_name = pick_clock(device)

    rows = []
    for slot in args.slots:
        rows += bench_slot(slot, args.batch, iters, warmup, device, dtype, args.impl, clock)
    print(
        f"bench_op: device={device.type} dtype={args.dtype} batch={args.batch} iters={iters} "
        f"warmup={warmup} impl={' '.join(args.impl)} threads={torch.get_num_threads()} "
        f"clock={clock_name} "
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
            "clock": clock_name,
            "slots": {s: {"channels": SLOTS[s][0], "size": SLOTS[s][1]} for s in args.slots},
        },
        "memory_meaning": MEMORY_MEANING[device.type],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
