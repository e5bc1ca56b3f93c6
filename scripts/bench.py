"""Model-level throughput: resnet50 vs xresnet50 (each PSSA backend, deploy form), timm baseline.

Usage:
    python scripts/bench.py --device cpu                     # small CPU run (minutes)
    python scripts/bench.py --device cuda                    # one GPU: batch 256, 224 px, bf16
    python scripts/bench.py --device cuda --compile --batch 128 --iters 30
    python scripts/bench.py --device cuda --impls lean gemm --skip-ops
    python scripts/bench.py --device cpu --batch 2 --img-size 32 --iters 1 --warmup 0 --rounds 1
    python scripts/bench.py --device cuda --targets my_targets.json    # other goals, same bounds

Synthetic data already on the device, SGD (Nesterov momentum), same settings for every model in
one run: autocast (bf16 on CUDA by default, none on CPU), channels_last. Cases (img/s):

    train  timm resnet50            timm.create_model("resnet50"), a plain step
                                    (autocast forward, cross-entropy, backward, SGD step)
    train  resnet50 (xvol loop)     the same model trained by xvol.engine.loop.train_one_epoch
    train  xresnet50 IMPL           build_model("resnet50", xconv=XConv2d, stages=(3,)) with
                                    xvol.ops.dispatch.set_impl(model, IMPL), plain step; one case
                                    for auto (the headline) and one per --impls (CPU: reference
                                    lean gemm; CUDA: also triton)
    infer  timm resnet50            eval, inference_mode
    infer  xresnet50 deploy         xvol.reparam.reparameterize_model(xresnet50), --infer-impl
    infer  xresnet50 train-form     the training form in eval mode (BN running stats, 2 branches)

``--compile`` adds a torch.compile twin (" +compile") of the resnet50 and xresnet50 training
cases and of the resnet50 / deploy inference cases.

Trust: every case owns its model (built from one seeded pristine copy by ``copy.deepcopy``, before
any mode change), so no case can leave another in the wrong mode. A training case checks at its
first run that the model and every submodule are in train mode with autograd on, and runs that
first call under forward pre-hooks on every BatchNorm that raise ``TrainModeError`` if one runs in
eval mode while gradients are enabled; an inference case checks eval mode and runs under
``torch.inference_mode``. A case that raises (a backend not implemented yet, out of memory) is
reported as ``failed: <reason>`` and the rest go on; a TrainModeError stops the run.

Timing is interleaved: after warm-up, ``--rounds`` rounds each time ``--iters`` steps of every
case in turn. img/s and ratios use each case's fastest round (the least disturbed by other
processes; the median is recorded too); ratios are between cases of the same run. On CPU the
default is one thread (``--threads``) timed by process CPU time: on a shared machine,
multi-threaded runs of small ops stall on busy cores, and wall time counts other processes'
time slices; both vary several-fold between rounds.

Memory per case, in a separate untimed step after timing: on CUDA the allocator's peak during one
step (torch.cuda.max_memory_allocated after reset_peak_memory_stats) above what was allocated
before it, plus the case's own weights, buffers and optimizer state (the shared input batch is not
counted); on CPU, which has no allocator statistics, the bytes autograd saves for backward in one
training forward (activations; parameters excluded) and n/a for inference.

Ratios and their checks. A target (op ``>=`` or ``<=`` and a value: the GPU goals; on CPU they
are CPU ratios, reported against the same numbers) gives met / not met. The targets are goals,
not facts, so they are data: ``scripts/bench_targets.json`` by default, another file with
``--targets PATH``. It maps a ratio name (a "(label)" written "({})", as in ``RATIO_NAMES``) to
``{"op": ">=" | "<=", "value": <finite number>, "why": "<where the goal comes from>"}``; a ratio
it leaves out has no target (verdict n/a). The file is checked before anything runs: a name that
is not a ratio bench.py computes, another op, a value that is not a finite number, an unknown or
missing field, a duplicate name, bad JSON, or a target a physical bound makes unmeetable is
refused with one line naming the file and key (exit status 2, nothing written). The table and
the JSON record (``targets_file``, ``ratio_checks``) say which file the targets came from.

The headline training ratio is the one of the backend ``auto`` picks (the case ``train xresnet50
auto``, what a user trains with), every backend's row beside it. A physical bound
(``RATIO_BOUNDS``: facts of the computation, so code) gives IMPOSSIBLE (in the table, and under
"flags" in the JSON) when a value exceeds it by more than ``SLACK``: an xresnet50 does strictly
more work than its resnet50 (every op of the resnet plus the PSSA branch), so no xresnet50 /
resnet50 ratio can exceed 1.0; the xvol loop does the plain step's work plus bookkeeping, so it
cannot beat it either. No tighter bound is claimed: a MAC count is not one on a GPU, where a
ResNet-50 step is memory-bound (a roofline predicts 0.92 for fused training kernels).

The exit status is 1 when any case failed (its row says why), 0 otherwise.

An op-level section times the ResNet-50 stage-3 slot (256 ch, img/16 px) through each PSSA path
and reports the bytes autograd saves per slot, measured by scripts/bench_op.py's ``measure_slot``
(the one slot timer both scripts use). Prints tables; writes one JSON record to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from xvol.checks import is_number
from xvol.formats.files import write_json_atomic
from xvol.models import build_model
from xvol.ops import dispatch, pssa_lean
from xvol.ops.xconv import XConv2d
from xvol.reparam import reparameterize_model

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_op import failure_line, measure_slot, pick_clock  # noqa: E402

# An xresnet50 runs every op of its resnet50 plus the PSSA branch: it cannot be faster.
MORE_WORK_BOUND = 1.0
SLACK = 1.05  # measurement noise allowed above a physical bound before a result is impossible

TRAIN_RATIO = "xresnet50 train ({}) / resnet50 train"
MEMORY_RATIO = "train memory xresnet50 ({}) / resnet50"
DEPLOY_RATIO = "deploy infer / resnet50 infer"
DEPLOY_VS_EVAL = "deploy infer / train-form eval infer"
LOOP_RATIO = "xvol loop / timm step (resnet50 train)"
OP_DEPLOY_RATIO = "deploy op / nn.Conv2d (stage-3 slot, fwd)"
OP_SAVED_RATIO = "lean saved activations / nn.Conv2d (stage-3 slot)"


RATIO_NAMES = (TRAIN_RATIO, MEMORY_RATIO, DEPLOY_RATIO, DEPLOY_VS_EVAL, LOOP_RATIO,
               OP_DEPLOY_RATIO, OP_SAVED_RATIO)  # fmt: skip
TARGETS_FILE = Path(__file__).resolve().parent / "bench_targets.json"
TARGET_OPS = (">=", "<=")
TARGET_FIELDS = ("op", "value", "why")

# Physical bounds, keyed like RATIO_NAMES: (the largest possible value, why). Facts of the
# computation, not goals, so they stay here; the goals are in TARGETS_FILE.
_MORE_WORK = "xresnet50 does every op of resnet50 plus the PSSA branch"
RATIO_BOUNDS: dict[str, tuple[float, str]] = {
    TRAIN_RATIO: (MORE_WORK_BOUND, _MORE_WORK),
    DEPLOY_RATIO: (MORE_WORK_BOUND, _MORE_WORK),
    LOOP_RATIO: (1.0, "the xvol loop does the plain step's work plus bookkeeping"),
}


@dataclass(frozen=True)
class RatioCheck:
    """target: (op, value) the ratio should meet, from a targets file, and where it comes from;
    bound: the largest physically possible value, and why."""

    target: tuple[str, float] | None
    bound: float | None = None
    why: str = ""
    target_why: str = ""


class TargetsError(ValueError):
    """A targets file bench.py cannot use; the message is one line naming the file and key."""


def _no_duplicates(path: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise TargetsError(f"{path}: key {json.dumps(key)}: given twice")
            out[key] = value
        return out

    return hook


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_targets(path: Path) -> dict[str, tuple[str, float, str]]:
    """{ratio name: (op, value, why)} from a targets file, checked as untrusted input.

    Raises TargetsError (one line naming ``path`` and the key) for anything bench.py cannot use.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TargetsError(f"{path}: cannot read the targets file: {reason}") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except TargetsError:
        raise
    except json.JSONDecodeError as exc:
        raise TargetsError(
            f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # an int too long to convert, nesting too deep
        raise TargetsError(f"{path}: not usable JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise TargetsError(f"{path}: must be a JSON object of ratio name -> target")
    targets: dict[str, tuple[str, float, str]] = {}
    for name, entry in data.items():
        key = f"{path}: key {json.dumps(name)}"
        if name not in RATIO_NAMES:
            raise TargetsError(
                f"{key}: not a ratio bench.py computes (known: "
                + "; ".join(json.dumps(n) for n in RATIO_NAMES)
                + ")"
            )
        if not isinstance(entry, dict):
            raise TargetsError(f'{key}: must be an object with "op", "value" and "why"')
        unknown = [f for f in entry if f not in TARGET_FIELDS]
        missing = [f for f in TARGET_FIELDS if f not in entry]
        if unknown or missing:
            field_name = json.dumps((unknown or missing)[0])
            what = f"unknown field {field_name}" if unknown else f"no field {field_name}"
            raise TargetsError(f'{key}: {what} (fields: "op", "value", "why")')
        op, value, why = entry["op"], entry["value"], entry["why"]
        if op not in TARGET_OPS:
            raise TargetsError(f'{key}: "op" must be ">=" or "<=", got {_shown(op)}')
        if not is_number(value):
            raise TargetsError(f'{key}: "value" must be a finite number, got {_shown(value)}')
        if not isinstance(why, str) or not why.strip():
            raise TargetsError(f'{key}: "why" must be a non-empty string, got {_shown(why)}')
        bound = RATIO_BOUNDS.get(name)
        if op == ">=" and bound is not None and value > bound[0] * SLACK:
            raise TargetsError(
                f"{key}: >= {value} can never be met: its physical bound is {bound[0]} "
                f"(x{SLACK} slack; {bound[1]})"
            )
        targets[name] = (op, float(value), why.strip())
    return targets


def ratio_checks(targets: dict[str, tuple[str, float, str]]) -> dict[str, RatioCheck]:
    """Every ratio's check: its target from ``targets`` (if any) and its physical bound."""
    checks = {}
    for name in RATIO_NAMES:
        op, value, target_why = targets.get(name, (None, None, ""))
        bound, why = RATIO_BOUNDS.get(name, (None, ""))
        target = (op, value) if op is not None else None
        checks[name] = RatioCheck(target, bound, why, target_why)
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--batch", type=int, default=None, help="default: 256 cuda, 8 cpu")
    p.add_argument("--img-size", type=int, default=None, help="default: 224 cuda, 96 cpu")
    p.add_argument("--iters", type=int, default=None, help="steps per round (30 cuda, 1 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (10 cuda, 1 cpu)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (5 cuda, 12 cpu)")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="add torch.compile twins of the cases")
    p.add_argument(
        "--impls",
        nargs="+",
        choices=dispatch.CONCRETE_IMPLS,
        default=None,
        help="xresnet50 training cases besides auto's (default: reference lean gemm, + triton "
        "on cuda)",
    )
    p.add_argument(
        "--infer-impl", choices=dispatch.IMPLS, default="auto", help="deploy / eval-form path"
    )
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on cpu)")
    p.add_argument("--skip-ops", action="store_true", help="no op-level section")
    p.add_argument(
        "--targets",
        type=Path,
        default=TARGETS_FILE,
        help="JSON file of the ratios' targets (default: scripts/bench_targets.json)",
    )
    p.add_argument("--out", type=Path, default=Path("bench_results/bench.json"))
    args = p.parse_args(argv)
    try:  # checked before anything runs; one line, no usage, nothing written
        args.checks = ratio_checks(load_targets(args.targets))
    except TargetsError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
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
    if args.impls is None:
        args.impls = default_impls(args.device)
    return args


def default_impls(device: str) -> list[str]:
    """Every concrete backend that can run on ``device`` (Triton kernels need CUDA)."""
    return [i for i in dispatch.CONCRETE_IMPLS if device == "cuda" or i != "triton"]


# ---------------------------------------------------------------------------------------------
# Mode guards: a training case must train, an inference case must not


class TrainModeError(AssertionError):
    """A case ran in the wrong mode: its numbers would not measure what its name says."""


def check_train_mode(model: nn.Module) -> None:
    """Raise unless autograd is on and ``model`` and every submodule are in train mode."""
    if not torch.is_grad_enabled():
        raise TrainModeError("a training case runs with gradients disabled")
    evals = [name or "<model>" for name, m in model.named_modules() if not m.training]
    if evals:
        raise TrainModeError(
            f"a training case has {len(evals)} module(s) in eval mode: {', '.join(evals[:5])}"
        )


def check_eval_mode(model: nn.Module) -> None:
    """Raise if any module of an inference case is in train mode (BN would use batch stats)."""
    trains = [name or "<model>" for name, m in model.named_modules() if m.training]
    if trains:
        raise TrainModeError(
            f"an inference case has {len(trains)} module(s) in train mode: {', '.join(trains[:5])}"
        )


@contextlib.contextmanager
def batchnorm_guard(model: nn.Module) -> Iterator[list[int]]:
    """Forward pre-hooks on every BatchNorm of ``model`` while active: one that runs in eval mode
    with gradients enabled raises TrainModeError. Yields a one-item list counting BN calls."""
    calls = [0]

    def hook(module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and not module.training:
            raise TrainModeError(
                f"{type(module).__name__} ran in eval mode with gradients enabled "
                "(running statistics in a training step)"
            )
        calls[0] += 1

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def assert_own_models(cases: dict[str, Case]) -> None:
    """Raise if two cases share a model or a parameter (a mode change would leak between them)."""
    owners: dict[int, str] = {}
    for name, case in cases.items():
        for t in [case.model, *case.model.parameters(), *case.model.buffers()]:
            key = id(t) if isinstance(t, nn.Module) else t.untyped_storage().data_ptr()
            if key in owners and owners[key] != name:
                raise TrainModeError(f"cases {owners[key]!r} and {name!r} share a model")
            owners[key] = name


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    name: str
    kind: str  # "train" | "infer"
    model: nn.Module  # the eager module this case owns (compiled cases wrap it)
    run: Callable[[int], None]
    impl: str | None = None
    compiled: bool = False
    optimizer: torch.optim.Optimizer | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


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


def _first_run_guarded(model: nn.Module, compiled: bool, body: Callable[[int], None]):
    """Wrap a training ``body(n)``: its first call checks train mode and runs under the
    BatchNorm guard (an eager model must actually reach a BatchNorm)."""
    state = {"checked": False}

    def run(n: int) -> None:
        if state["checked"]:
            body(n)
            return
        check_train_mode(model)
        with batchnorm_guard(model) as calls:
            body(n)
        if n > 0:  # a zero-step call (no warm-up) leaves the guard to the first real step
            if not compiled and calls[0] == 0:
                raise TrainModeError("no BatchNorm ran during a training case's first step")
            state["checked"] = True

    return run


def plain_train_case(
    name: str, model: nn.Module, images, labels, device, amp, compiled=False, impl=None
) -> Case:
    """timm-train.py-style step: autocast forward + loss, backward, optimizer step."""
    model.train()
    opt = _optimizer(model)
    fn = torch.compile(model) if compiled else model

    def body(n: int) -> None:
        for _ in range(n):
            with _autocast(device, amp):
                loss = F.cross_entropy(fn(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)

    run = _first_run_guarded(model, compiled, body)
    return Case(name, "train", model, run, impl=impl, compiled=compiled, optimizer=opt)


def xvol_loop_case(name: str, model: nn.Module, images, labels, device, amp, channels_last) -> Case:
    """The same update through xvol.engine.loop.train_one_epoch (one call per timed block)."""
    from xvol.engine.loop import LoopSettings, TrainState, train_one_epoch

    model.train()
    opt = _optimizer(model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    opts = LoopSettings(amp_dtype=amp_dtype, channels_last=channels_last, progress_bar=False)

    def body(n: int) -> None:
        if n == 0:
            return
        train_one_epoch(
            model,
            [(images, labels)] * n,
            opt,
            F.cross_entropy,
            TrainState(),
            steps_per_epoch=n,
            device=device,
            opts=opts,
        )
        _sync(device)

    return Case(name, "train", model, _first_run_guarded(model, False, body), optimizer=opt)


def infer_case(name: str, model: nn.Module, images, device, amp, compiled=False) -> Case:
    model.eval()
    fn = torch.compile(model) if compiled else model
    state = {"checked": False}

    def run(n: int) -> None:
        if not state["checked"]:
            check_eval_mode(model)
            state["checked"] = True
        with torch.inference_mode(), _autocast(device, amp):
            for _ in range(n):
                fn(images)
        _sync(device)

    return Case(name, "infer", model, run, compiled=compiled)


def _record_failure(case: Case, exc: BaseException) -> None:
    if isinstance(exc, TrainModeError):
        raise exc
    case.error = failure_line(exc)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_interleaved(
    cases: dict[str, Case],
    iters: int,
    warmup: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per step of every case, one list entry per round, cases run in turn each round.

    A case that raises gets ``case.error`` and leaves the rotation (TrainModeError propagates).
    Not torch.utils.benchmark.Timer: it times one statement at a time, and the ratios this
    benchmark reports need the cases interleaved under the same load (and a CPU-time clock on a
    shared machine, see pick_clock).
    """
    for case in cases.values():
        try:
            case.run(warmup)
        except Exception as exc:
            _record_failure(case, exc)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            if case.error:
                continue
            try:
                tic = clock()
                case.run(iters)
                times[name].append((clock() - tic) / iters)
            except Exception as exc:
                _record_failure(case, exc)
    return {name: t for name, t in times.items() if t and not cases[name].error}


# ---------------------------------------------------------------------------------------------
# Memory


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def state_bytes(case: Case) -> int:
    """Weights, buffers and optimizer state the case holds between steps."""
    tensors = [*case.model.parameters(), *case.model.buffers()]
    if case.optimizer is not None:
        for s in case.optimizer.state.values():
            tensors += [v for v in s.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    return _tensor_bytes(tensors)


def memory_meaning(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "peak allocated during one step above the allocation before it (max_memory_allocated "
            "after reset_peak_memory_stats) + the case's weights, buffers and optimizer state"
        )
    return "bytes saved for backward by one training forward (activations; n/a for inference)"


def measure_memory(case: Case, images, labels, device, amp) -> int | None:
    """See ``memory_meaning``. Runs one extra, untimed step."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        case.run(1)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base + state_bytes(case)
    if case.kind != "train":
        return None
    owned = [*case.model.parameters(), *case.model.buffers()]

    def forward() -> torch.Tensor:
        with _autocast(device, amp):
            return F.cross_entropy(case.model(images), labels)

    return pssa_lean.saved_tensors_report(forward, owned).activation_bytes


# ---------------------------------------------------------------------------------------------
# Models


def _prepare(model: nn.Module, device: torch.device, args: argparse.Namespace) -> nn.Module:
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def pristine_models(args: argparse.Namespace, device: torch.device) -> dict[str, nn.Module]:
    """Seeded originals that cases deep-copy; nothing runs on or changes the mode of these."""
    torch.manual_seed(0)
    resnet = timm.create_model("resnet50", pretrained=False, num_classes=args.num_classes)
    xresnet = build_model("resnet50", args.num_classes, xconv=XConv2d, stages=(3,))
    # The eval-form / deploy pair comes from a model with non-trivial BN statistics (one
    # training-mode forward on a copy), so folding does real work.
    xresnet_stats = copy.deepcopy(xresnet)
    with torch.no_grad():
        xresnet_stats.train()(torch.randn(2, 3, 64, 64))
    deploy = reparameterize_model(xresnet_stats)  # a deep copy; xresnet_stats stays as it is
    for model in (xresnet_stats.eval(), deploy):
        dispatch.set_impl(model, args.infer_impl)
    models = {"resnet50": resnet, "xresnet50": xresnet, "xresnet50_eval": xresnet_stats}
    models["xresnet50_deploy"] = deploy
    return {name: _prepare(m, device, args) for name, m in models.items()}


def build_cases(args: argparse.Namespace, device: torch.device, images, labels) -> dict[str, Case]:
    """Every case with its own deep copy of a pristine model (no object shared between cases)."""
    pristine = pristine_models(args, device)

    def own(name: str) -> nn.Module:
        return copy.deepcopy(pristine[name])

    variants = [False, True] if args.compile else [False]
    amp = args.amp
    cases: list[Case] = []
    for compiled in variants:
        tag = " +compile" if compiled else ""
        cases.append(
            plain_train_case(
                f"train timm resnet50{tag}", own("resnet50"), images, labels, device, amp, compiled
            )
        )
        if not compiled:
            cases.append(
                xvol_loop_case(
                    "train resnet50 (xvol loop)",
                    own("resnet50"),
                    images,
                    labels,
                    device,
                    amp,
                    args.channels_last,
                )
            )
        for impl in ["auto", *(i for i in args.impls if i != "auto")]:
            model = own("xresnet50")
            n_set = dispatch.set_impl(model, impl)
            if n_set == 0:
                raise RuntimeError("set_impl found no X-volution module in xresnet50")
            cases.append(
                plain_train_case(
                    f"train xresnet50 {impl}{tag}", model, images, labels, device, amp, compiled,
                    impl,
                )
            )  # fmt: skip
    for compiled in variants:
        tag = " +compile" if compiled else ""
        cases.append(
            infer_case(f"infer timm resnet50{tag}", own("resnet50"), images, device, amp, compiled)
        )
        cases.append(
            infer_case(
                f"infer xresnet50 deploy{tag}", own("xresnet50_deploy"), images, device, amp,
                compiled,
            )
        )  # fmt: skip
    cases.append(
        infer_case("infer xresnet50 train-form eval", own("xresnet50_eval"), images, device, amp)
    )
    for case in cases:
        if case.kind == "infer" and case.name.startswith("infer xresnet50"):
            case.impl = args.infer_impl
    by_name = {c.name: c for c in cases}
    assert_own_models(by_name)
    return by_name


# ---------------------------------------------------------------------------------------------
# Ratios and their verdicts


def _label_key(name: str) -> str:
    """A ratio name with its "(label)" generalized: TRAIN_RATIO.format(x) -> TRAIN_RATIO."""
    for template in (TRAIN_RATIO, MEMORY_RATIO):
        head, tail = template.split("{}")
        if name.startswith(head) and name.endswith(tail):
            return template
    return name


def compute_ratios(
    cases: dict[str, Case], img_s: dict[str, float], memory: dict[str, int | None]
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Ratios between cases of one run (None where a case failed or a value is n/a)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ratios: dict[str, float | None] = {}
    info: dict[str, Any] = {}
    x_train = {n: c for n, c in cases.items() if c.kind == "train" and c.impl is not None}
    for name, case in x_train.items():
        label = case.impl + ("+compile" if case.compiled else "")
        base = "train timm resnet50" + (" +compile" if case.compiled else "")
        ratios[TRAIN_RATIO.format(label)] = ratio(img_s.get(name), img_s.get(base))
        ratios[MEMORY_RATIO.format(label)] = ratio(memory.get(name), memory.get(base))
    info["headline"] = TRAIN_RATIO.format("auto")
    ratios[DEPLOY_RATIO] = ratio(
        img_s.get("infer xresnet50 deploy"), img_s.get("infer timm resnet50")
    )
    if "infer xresnet50 deploy +compile" in cases:
        ratios[DEPLOY_RATIO + " (+compile)"] = ratio(
            img_s.get("infer xresnet50 deploy +compile"), img_s.get("infer timm resnet50 +compile")
        )
    ratios[DEPLOY_VS_EVAL] = ratio(
        img_s.get("infer xresnet50 deploy"), img_s.get("infer xresnet50 train-form eval")
    )
    ratios[LOOP_RATIO] = ratio(
        img_s.get("train resnet50 (xvol loop)"), img_s.get("train timm resnet50")
    )
    return ratios, info


def auto_picked(device: torch.device) -> str:
    """What ``auto`` trained xresnet50's slots with in this run (dispatch's first-sight
    verdicts: one per slot shape and dtype)."""
    if device.type != "cuda":
        return "lean (auto's CPU training path)"
    verdicts = [ok for key, ok in dispatch._TRITON_OK.items() if key[0] == "PSSA train"]
    if not verdicts:
        return "gemm (no slot was a Triton candidate)"
    return f"triton on {sum(verdicts)} of {len(verdicts)} slot shapes, gemm on the rest"


def judge_ratios(
    ratios: dict[str, float | None], checks: dict[str, RatioCheck] | None = None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Verdict per ratio (met / not met / IMPOSSIBLE / n/a / failed) and the list of flags.

    ``checks``: from :func:`ratio_checks` (default: the targets of TARGETS_FILE).
    IMPOSSIBLE: above the ratio's physical bound times SLACK; such a value is never "met".
    """
    if checks is None:
        checks = ratio_checks(load_targets(TARGETS_FILE))
    verdicts: dict[str, dict[str, Any]] = {}
    flags: list[str] = []
    for name, value in ratios.items():
        key = _label_key(name.removesuffix(" (+compile)"))
        check = checks.get(key, RatioCheck(None))
        limit = check.bound * SLACK if check.bound is not None else None
        if value is None:
            verdict = "failed"
        elif limit is not None and value > limit:
            verdict = "IMPOSSIBLE"
            flags.append(
                f"{name} = {value:.3f} is above its physical bound {check.bound:.3f} "
                f"(x{SLACK} slack: {limit:.3f}; {check.why}): the measurement is wrong"
            )
        elif check.target is None:
            verdict = "n/a"
        else:
            op, target = check.target
            met = value >= target if op == ">=" else value <= target
            verdict = "met" if met else "not met"
        verdicts[name] = {
            "value": value,
            "target": list(check.target) if check.target else None,
            "bound": check.bound,
            "verdict": verdict,
        }
    return verdicts, flags


# ---------------------------------------------------------------------------------------------
# Op level: the ResNet-50 stage-3 slot through each PSSA path


def op_level(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The stage-3 slot (256 ch, img/16 px): nn.Conv2d and each PSSA path's deploy form on a
    forward, nn.Conv2d + BN and each path's training form on forward + backward, and the bytes
    autograd saves per slot, all measured by bench_op.measure_slot."""
    hw = max(args.img_size // 16, 2)
    c = 256
    torch.manual_seed(0)
    x = torch.randn(args.batch, c, hw, hw, device=device)
    conv = nn.Conv2d(c, c, 3, 1, 1, bias=False).to(device)
    conv_bn = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)).to(device)
    ref = XConv2d(c, c, 3, 1, 1, impl="reference").to(device)
    grad_out = torch.randn(x.shape, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref.train()(x)  # non-trivial running statistics for the deploy fold
    slots, deploys = {}, {}
    deploy_ref = copy.deepcopy(ref).eval().reparameterize()
    for impl in args.impls:
        slots[impl], deploys[impl] = copy.deepcopy(ref).train(), copy.deepcopy(deploy_ref)
        dispatch.set_impl(slots[impl], impl)
        dispatch.set_impl(deploys[impl], impl)
    for m in [conv, conv_bn, *slots.values(), *deploys.values()]:
        if args.channels_last:
            m.to(memory_format=torch.channels_last)

    # measure_slot's keys -> this section's names (the JSON keys under "ops")
    fwd = {("conv", None): "fwd nn.Conv2d"}
    fwd |= {("deploy", impl): f"fwd deploy {impl}" for impl in deploys}
    fwd_bwd = {("conv+bn", None): "fwd+bwd nn.Conv2d+BN"}
    fwd_bwd |= {("train", impl): f"fwd+bwd train {impl}" for impl in slots}
    saved_names = {("conv", None): "nn.Conv2d", ("conv+bn", None): "nn.Conv2d+BN"}
    saved_names |= {("train", impl): f"XConv2d {impl}" for impl in slots}
    modules = {("conv", None): conv, ("conv+bn", None): conv_bn}
    modules |= {("deploy", impl): m for impl, m in deploys.items()}
    modules |= {("train", impl): m for impl, m in slots.items()}
    clock = pick_clock(device)[0]
    measure = measure_slot(modules, x, grad_out, device, fwd=fwd, fwd_bwd=fwd_bwd,
                           saved=saved_names, iters=args.rounds, warmup=max(args.warmup, 1),
                           number=max(args.iters, 3), clock=clock,
                           context=lambda: _autocast(device, args.amp))  # fmt: skip
    times = {**measure.fwd_ms, **measure.fwd_bwd_ms}
    names = {**fwd, **fwd_bwd}
    ms = {name: (times[key][0] if key in times else None) for key, name in names.items()}
    failed = {names[key]: e for key, e in {**measure.fwd_failed, **measure.fwd_bwd_failed}.items()}
    failed |= {f"saved {saved_names[key]}": e for key, e in measure.saved_failed.items()}
    saved = {
        saved_names[key]: {
            "activation_bytes": report.activation_bytes,
            "per_channel_bytes": report.per_channel_bytes,
            "parameter_bytes": report.parameter_bytes,
        }
        for key, report in measure.saved.items()
    }
    ok_deploys = [ms[f"fwd deploy {impl}"] for impl in deploys if ms[f"fwd deploy {impl}"]]
    conv_ms = ms["fwd nn.Conv2d"]
    lean, base = saved.get("XConv2d lean"), saved.get("nn.Conv2d")
    ratios: dict[str, float | None] = {
        OP_DEPLOY_RATIO: min(ok_deploys) / conv_ms if ok_deploys and conv_ms else None,
        OP_SAVED_RATIO: (
            lean["activation_bytes"] / base["activation_bytes"]
            if lean and base and base["activation_bytes"]
            else None
        ),
    }
    return {"input_shape": list(x.shape), "ms": ms, "failed": failed, "saved": saved,
            "ratios": ratios}  # fmt: skip


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


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


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

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    cases = build_cases(args, device, images, labels)

    tic = time.perf_counter()
    clock, clock_name = pick_clock(device)
    times = time_interleaved(cases, args.iters, args.warmup, args.rounds, clock)
    img_s = {name: args.batch / min(t) for name, t in times.items()}
    img_s_median = {name: args.batch / statistics.median(t) for name, t in times.items()}
    spread = {name: (max(t) - min(t)) / statistics.median(t) for name, t in times.items()}
    memory: dict[str, int | None] = {}
    for name, case in cases.items():
        if case.error:
            continue
        try:
            memory[name] = measure_memory(case, images, labels, device, args.amp)
        except Exception as exc:
            _record_failure(case, exc)
            for d in (img_s, img_s_median, spread):
                d.pop(name, None)
    status = {name: case.error and f"failed: {case.error}" or "ok" for name, case in cases.items()}

    ratios, ratio_info = compute_ratios(cases, img_s, memory)
    ratio_info["auto_picked"] = auto_picked(device)
    ops = None if args.skip_ops else op_level(args, device)
    if ops is not None:
        ratios.update(ops["ratios"])
    verdicts, flags = judge_ratios(ratios, args.checks)
    elapsed = time.perf_counter() - tic

    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("out", "checks")
    }
    print(
        f"# bench.py on {env.get('gpu', platform.processor() or 'cpu')} ({device}); "
        f"batch {args.batch}, {args.img_size} px, amp {args.amp}, channels_last "
        f"{args.channels_last}, compile {args.compile}, impls {' '.join(args.impls)}, "
        f"infer impl {args.infer_impl}; best of {args.rounds} interleaved rounds x {args.iters} "
        f"steps; threads {torch.get_num_threads()}; {clock_name}; load avg before {load_before}"
    )
    rows = []
    for name in cases:
        if name in img_s:
            rows.append([name, f"{img_s[name]:.1f}", f"{img_s_median[name]:.1f}",
                         f"{1e3 * args.batch / img_s[name]:.1f}", f"{100 * spread[name]:.0f}%",
                         _mib(memory.get(name)), "ok"])  # fmt: skip
        else:
            rows.append([name, "-", "-", "-", "-", "-", status[name]])
    print(_table(rows, ["case", "img/s", "img/s (median)", "ms/step", "round spread",
                        "memory MiB", "status"]))  # fmt: skip
    print(f"memory ({device.type}): {memory_meaning(device)}")
    print()
    rrows = []
    for name, v in verdicts.items():
        target = f"{v['target'][0]} {v['target'][1]}" if v["target"] else "-"
        bound = f"<= {v['bound']:.3f}" if v["bound"] is not None else "-"
        value = f"{v['value']:.3f}" if v["value"] is not None else "-"
        rrows.append([name, value, target, bound, v["verdict"]])
    print(_table(rrows, ["ratio", "value", "target (GPU)", "physical bound", "verdict here"]))
    print(f"targets: {args.targets}")
    head = verdicts.get(ratio_info["headline"], {})
    head_value = f"{head['value']:.3f}" if head.get("value") is not None else "-"
    print(f"headline: {ratio_info['headline']} = {head_value} ({head.get('verdict', 'failed')}); "
          f"auto trained with {ratio_info['auto_picked']}")  # fmt: skip
    for flag in flags:
        print(f"IMPOSSIBLE: {flag}")
    if ops is not None:
        print()
        print(f"op level: stage-3 slot, input {ops['input_shape']}")
        orows = [
            [k, f"{v:.2f}" if v is not None else f"failed: {ops['failed'].get(k)}"]
            for k, v in ops["ms"].items()
        ]
        print(_table(orows, ["op", "ms/call (best)"]))
        base = ops["saved"]["nn.Conv2d"]["activation_bytes"]
        srows = [
            [k, v["activation_bytes"], v["per_channel_bytes"], v["parameter_bytes"],
             f"{v['activation_bytes'] / base:.2f}"]
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
        "cases": {
            name: {
                "kind": case.kind,
                "impl": case.impl,
                "compiled": case.compiled,
                "status": status[name],
                "img_per_s": img_s.get(name),
                "img_per_s_median": img_s_median.get(name),
                "ms_per_step_rounds": [1e3 * t for t in times.get(name, [])],
                "memory_bytes": memory.get(name),
            }
            for name, case in cases.items()
        },
        "img_per_s": img_s,
        "memory_meaning": memory_meaning(device),
        "ratios": ratios,
        "ratio_info": ratio_info,
        "verdicts": verdicts,
        "flags": flags,
        "targets_file": str(args.targets),
        "ratio_checks": {
            k: {
                "target": list(v.target) if v.target else None,
                "target_why": v.target_why,
                "bound": v.bound,
                "why": v.why,
            }
            for k, v in args.checks.items()
        },  # fmt: skip
        "slack": SLACK,
        "ops": ops,
        "elapsed_s": elapsed,
        "note": "ratios measured in one run; on CPU they are CPU ratios, not the GPU targets",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return record


def exit_status(record: dict[str, Any]) -> int:
    """1 when any case (or op-level measure) failed: a benchmark that could not measure a case
    did not pass."""
    failed_ops = (record.get("ops") or {}).get("failed")
    return 1 if failed_ops or any(c["status"] != "ok" for c in record["cases"].values()) else 0


if __name__ == "__main__":
    sys.exit(exit_status(main()))
