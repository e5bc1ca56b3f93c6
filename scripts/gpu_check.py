"""The one GPU check: every step in its own process, in the order of what it decides.

Usage:
    bash scripts/gpu_check.sh                 # one H100/H200 (installs .whl/ first if present)
    python scripts/gpu_check.py               # the same, when hydra-core/omegaconf are installed
    python scripts/gpu_check.py --dry-run     # CPU rehearsal: the same steps at tiny sizes
    python scripts/gpu_check.py --steps bench,train_resnet50    # rerun only these
    python scripts/gpu_check.py --dry-run --break train_resnet50 --steps train_resnet50
                                              # rehearse a failure (the check must say FAILED)

Steps (``STEPS``), each with a wall-clock cap:
    1. kernels         the GPU tests (pytest -m gpu): Triton against the PyTorch backends with
                       gradient checks relative to magnitude, auto's dispatch, xresnet50's
                       gradients per backend; fixed kernel configs (XVOL_TRITON_AUTOTUNE=0), no
                       autotune sweep. Rehearsal: the CPU proofs that the xresnet gradient
                       check fails on a zeroed or perturbed backward (tests/test_kernels.py
                       also proves the Triton checks, in the interpreter).
    2. train_xresnet50 1-GPU torchrun of scripts/train.py, synthetic data, 60 steps + evaluation
    3. train_resnet50  the same for the baseline
    4. reparam         xvol-reparam of the xresnet50 checkpoint, verified on the device
       eval_train      xvol-eval of the training checkpoint on the device
       eval_deploy     xvol-eval of the deploy form on the device
    5. bench           scripts/bench.py: img/s, peak memory (with temporaries), ratios with the
                       backend auto trains with as the headline
    6. science         the CIFAR-10 comparison, bounded: ../shared/data/cifar10-jpeg.tar.gz
                       (or XVOL_CIFAR10_TAR) unpacked, then scripts/compare.py: resnet18 vs
                       xresnet18 with the CIFAR stem, seeds 0,1,2, 5 epochs, one GPU; per-seed
                       top-1 of both arms, the paired 95% interval, the time. Rehearsal: a small
                       generated CIFAR-like folder, 2 seeds, 1 epoch, 2 CPU ranks (the
                       pipeline, the multi-rank sweep and the statistics, not accuracy).

Truth rules: a step that fails, times out or is skipped (its input missing, or not selected) is
not a pass. PASSED means every step ran and passed; otherwise FAILED (something failed) or
INCOMPLETE (what ran passed, but not every step ran); the summary names each step's status. The
caps must fit the budget before anything starts (``check_plan``), with a stated margin. A CUDA
fault in one step (an illegal memory access in a kernel) ends that process only; the next step
still runs. The JSON record is rewritten after every step, so a run cut short still brings back
what it measured.

Output: ``$OUT/gpu_check.json`` when OUT is set (the device tool brings $OUT back), else
bench_results/gpu_check.json; bench.json and gpu_check.log (every step's output) beside it.
Exit status: 0 PASSED, 1 FAILED or INCOMPLETE, 2 a plan that does not fit or a bad argument.
Environment: XVOL_PYTHON (the interpreter steps run with; default this one),
XVOL_GPU_CHECK_WORK (scratch folder; default a new temporary one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One H100/H200, one device call of at most 10 minutes: the steps up to bench within 6 minutes
# (what decides whether the GPU path works), the science run last, all of it within 9.
FIRST_STEPS_BUDGET_S = 360
GPU_BUDGET_S = 540
MARGIN_S = 30  # process start-up between steps, the summary, copying $OUT back


@dataclass
class Step:
    name: str
    cap_s: int  # on one H100/H200
    cpu_cap_s: int  # in the CPU rehearsal (tiny sizes)
    command: Callable[[Context], list[str]]
    needs: tuple[str, ...] = ()  # files (relative to the work folder) it reads
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    cpu: bool
    py: str
    work: Path
    results: Path

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"


def _kernels(ctx: Context) -> list[str]:
    junit = str(ctx.work / "kernels.xml")
    base = [ctx.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if ctx.cpu:  # a GPU test's check, proven to fail on a broken backward
        return [*base, "tests/test_kernels.py", "-k", "model_gradient_check_fails_on_a_broken"]
    return [*base, "-m", "gpu", "tests/test_kernels.py"]


def _train(model: str) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        if ctx.cpu:
            sizes = ["trainer.device=cpu", "data.img_size=32", "data.batch_size=2",
                     "data.length=3", "data.val_length=1", "optim.lr=0.001"]  # fmt: skip
        else:
            sizes = ["trainer.device=cuda", "data.img_size=224", "data.batch_size=128",
                     "data.length=60", "data.val_length=4", "optim.lr=0.02"]  # fmt: skip
        return [
            ctx.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "scripts/train.py", f"model={model}", "data=synthetic", "data.num_classes=10",
            *sizes, "trainer.epochs=1", "trainer.ema=null", "trainer.progress_bar=false",
            "trainer.log_interval=20", "trainer.checkpoint.keep_top_k=1",
            "sched.warmup_epochs=0", "resume=null", "logger.wandb.enabled=false",
            f"run_name=gpu_check_{model}", f"paths.output_dir={ctx.work / 'runs'}",
        ]  # fmt: skip

    return command


CKPT = "runs/gpu_check_xresnet50/last.pt"


def _eval_args(ctx: Context) -> list[str]:
    if ctx.cpu:
        return ["--device", "cpu", "--precision", "fp32", "--batch-size", "8", "--workers", "0",
                "--bench", "--bench-iters", "1", "--bench-warmup", "0"]  # fmt: skip
    return ["--device", "cuda", "--precision", "bf16", "--channels-last", "--batch-size", "64",
            "--workers", "2", "--bench", "--bench-batch-size", "256", "--bench-iters", "10",
            "--bench-warmup", "3"]  # fmt: skip


def _reparam(ctx: Context) -> list[str]:
    return [ctx.py, "tools/reparam.py", str(ctx.work / CKPT), "--out", str(ctx.work / "deploy"),
            "--data", str(ctx.work / "val"), "--verify-images", "16",
            "--device", ctx.device]  # fmt: skip


def _eval(what: str) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        return [ctx.py, "tools/eval.py", str(ctx.work / what), "--json", "--no-progress",
                "--data", str(ctx.work / "val"), *_eval_args(ctx),
                "--results-dir", str(ctx.work / "results")]  # fmt: skip

    return command


def _bench(ctx: Context) -> list[str]:
    if ctx.cpu:
        sizes = ["--device", "cpu", "--batch", "2", "--img-size", "32", "--iters", "1",
                 "--warmup", "0", "--rounds", "1", "--num-classes", "10"]  # fmt: skip
    else:
        sizes = ["--device", "cuda", "--iters", "5", "--warmup", "2", "--rounds", "2"]
    return [ctx.py, "scripts/bench.py", *sizes, "--skip-ops", "--out",
            str(ctx.results / "bench.json")]  # fmt: skip


def _science(ctx: Context) -> list[str]:
    """Unpack CIFAR-10 (GPU) or write a small CIFAR-like folder (rehearsal), then compare."""
    data, out = ctx.work / "data" / "cifar10", ctx.work / "science"
    if ctx.cpu:
        prepare = [ctx.py, "-c", f"import sys; sys.path.insert(0, 'scripts'); import gpu_check; "
                   f"gpu_check.make_cifar_like({str(data)!r})"]  # fmt: skip
        # 2 gloo ranks, as `make compare` on a CPU: the rehearsal also runs the multi-rank sweep
        compare = ["--seeds", "0,1", "--epochs", "1", "--device", "cpu", "--nproc", "2", "--",
                   "data.batch_size=8", "data.workers=2"]  # fmt: skip
    else:
        tar = os.environ.get("XVOL_CIFAR10_TAR") or str(
            ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
        )
        prepare = ["bash", "-c", f"test -f {tar!r} || {{ echo 'no CIFAR-10 tarball at {tar} "
                   f"(set XVOL_CIFAR10_TAR)' >&2; exit 1; }}; mkdir -p {str(data)!r} && "
                   f"tar -xzf {tar!r} -C {str(data)!r}"]  # fmt: skip
        compare = ["--seeds", "0,1,2", "--epochs", "5", "--device", "cuda", "--nproc", "1", "--",
                   "data.workers=16", "trainer.log_interval=50"]  # fmt: skip
    # one command line: the step's cap covers both parts
    script = " ".join(_quote(a) for a in prepare) + " && " + " ".join(_quote(a) for a in [
        ctx.py, "scripts/compare.py", "--data", "cifar10", "--root", str(data), "--out", str(out),
        "--fresh", *compare,
    ])  # fmt: skip
    return ["bash", "-c", script]


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def make_cifar_like(root: str | Path) -> None:
    """10 classes x (8 train, 3 val) 32 px JPEGs: the rehearsal's stand-in for CIFAR-10 (a
    colour per class under noise). numpy and PIL only: importing xvol (timm) costs seconds."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c in range(10):
            tint = ((c * 25) % 256, (c * 77) % 256, (c * 151) % 256)
            _noise_jpegs(Path(root) / split / f"class{c}", n, 32, rng, tint)


# Ordered by what they decide: kernels first, then training, deploy, speed. GPU caps: what one
# H200 took on 2026-12-04 (kernels 52 s, with the whole-model check then in bf16; its four fp32
# cases alone 44 s; train 38 and 26 s; reparam 17; evals 19 and 16; bench 29; science about
# 200 s, of which 6 x 15-25 s training) with some margin, within the budgets above.
STEPS: list[Step] = [
    Step("kernels", 95, 240, _kernels),
    Step("train_xresnet50", 50, 150, _train("xresnet50")),
    Step("train_resnet50", 35, 120, _train("resnet50")),
    Step("reparam", 25, 90, _reparam, needs=(CKPT, "val")),
    Step("eval_train", 25, 60, _eval(CKPT), needs=(CKPT, "val")),
    Step("eval_deploy", 25, 60, _eval("deploy"), needs=("deploy", "val")),
    Step("bench", 40, 240, _bench),
    Step("science", 215, 300, lambda ctx: _science(ctx)),
]
COMMON_ENV = {
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
    "XVOL_TRITON_AUTOTUNE": "0",  # fixed kernel configs: one compile per kernel and shape
}


def check_plan(
    steps: list[Step], budget_s: int, margin_s: int, first_budget_s: int | None = None
) -> str | None:
    """None when the caps fit the budget with the margin (and the steps before the science
    run fit ``first_budget_s``), else the reason."""
    if first_budget_s is not None:
        first = sum(s.cap_s for s in steps if s.name != "science")
        if first + margin_s > first_budget_s:
            return (f"the caps before the science run add up to {first} s (+{margin_s} s margin) "
                    f"> {first_budget_s} s")  # fmt: skip
    total = sum(s.cap_s for s in steps)
    if total + margin_s > budget_s:
        caps = ", ".join(f"{s.name} {s.cap_s}" for s in steps)
        return (f"step caps add up to {total} s (+{margin_s} s margin) > budget {budget_s} s "
                f"({caps})")  # fmt: skip
    return None


def make_val_folder(root: Path, size: int) -> None:
    """A val folder in the ImageNet layout whose class folders are the synthetic data's names."""
    import numpy as np

    rng = np.random.default_rng(0)
    for c in range(10):
        _noise_jpegs(root / str(c), 4, size, rng)


def _noise_jpegs(folder: Path, n: int, size: int, rng, tint: tuple | None = None) -> None:
    """``n`` size x size JPEGs of ``rng`` noise in ``folder``: uniform, or +-40 around ``tint``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if tint is None:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        else:
            noise = rng.integers(-40, 41, (size, size, 3))
            pixels = np.clip(np.array(tint) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)


def _junit_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def run_step(step: Step, ctx: Context, cap_s: int, broken: bool) -> dict:
    """Run one step in its own process within ``cap_s``; its status and output files."""
    log_out = ctx.work / "logs" / f"{step.name}.out"
    log_err = log_out.with_suffix(".err")
    missing = [n for n in step.needs if not (ctx.work / n).exists()]
    if missing:
        why = f"needs {', '.join(missing)} (an earlier step's output)"
        return {"status": "skipped", "why": why}
    argv = [ctx.py, "-c", "raise SystemExit('broken on purpose (--break)')"] if broken else (
        step.command(ctx)
    )
    env = dict(os.environ, **COMMON_ENV, **step.env)
    start = time.monotonic()
    with open(log_out, "w") as out, open(log_err, "w") as err:
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=err, timeout=cap_s)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.monotonic() - start, 1)
    row: dict = {"seconds": seconds, "cap_s": cap_s, "exit": rc}
    if rc is None:
        row["status"] = "timed out"
    elif rc != 0:
        row["status"] = f"failed (exit {rc})"
    else:
        row["status"] = "ok"
    if step.name == "kernels" and rc is not None:
        counts = _junit_counts(ctx.work / "kernels.xml")
        row["tests"] = counts
        if counts is None or counts["tests"] == 0:
            row["status"] = "failed (no tests ran)"
        elif counts["skipped"]:  # a skipped GPU test is not a passed one
            row["status"] = f"failed ({counts['skipped']} of {counts['tests']} tests skipped)"
    if row["status"] != "ok":
        row["log_tail"] = _tail(log_out, log_err)
    return row


def _tail(*paths: Path, n: int = 15) -> list[str]:
    lines: list[str] = []
    for p in paths:
        if p.exists():
            lines += p.read_text(errors="replace").splitlines()
    return lines[-n:]


def _json_from(path: Path) -> dict | None:
    """The JSON record a tool printed (from its first line that starts with '{')."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    if start == 0 and not text.startswith("{"):
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except ValueError:
        return None


def results_of(name: str, ctx: Context) -> tuple[str, dict | None]:
    """(one-line result, details for the record) of a step that ran."""
    logs = ctx.work / "logs"
    if name == "kernels":
        counts = _junit_counts(ctx.work / "kernels.xml") or {}
        line = (f"{counts.get('tests', 0)} tests, {counts.get('failures', 0)} failed, "
                f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped")
        return line, counts
    if name.startswith("train_"):
        metrics = ctx.work / "runs" / f"gpu_check_{name.removeprefix('train_')}" / "metrics.jsonl"
        epochs = []
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and r.get("kind") == "epoch":
                    epochs.append(r)
        if not epochs:
            return "", None
        ep = epochs[-1]
        return (f"{ep.get('global_step')} steps, {ep.get('img_s', 0):,.0f} img/s, val top-1 "
                f"{ep.get('val_top1')}"), ep  # fmt: skip
    if name == "reparam":
        rep = _json_from(logs / "reparam.out")
        ver = (rep or {}).get("verification", {})
        return (f"verified {ver.get('passed')}, max |logit diff| {ver.get('max_abs_diff')}"
                if rep else ""), rep  # fmt: skip
    if name.startswith("eval_"):
        ev = _json_from(logs / f"{name}.out")
        if not ev:
            return "", None
        speed = (ev.get("throughput") or {}).get("img_s")
        return (f"top-1 {ev.get('top1')} on {ev.get('num_images')} images"
                + (f", {speed:,.0f} img/s" if speed else "")), ev  # fmt: skip
    if name == "science":
        try:
            summary = json.loads((ctx.work / "science" / "compare.json").read_text())
        except (OSError, ValueError):
            return "", None
        base, xvol = summary["models"]
        parts = [f"{xvol} - {base} per seed: "
                 + ", ".join(f"{r['diff']:+.2f}" for r in summary["per_seed"])]  # fmt: skip
        for c in summary["paired"]:
            if c["lo"] is not None:
                parts.append(f"mean {c['mean']:+.2f}, 95% [{c['lo']:+.2f}, {c['hi']:+.2f}] "
                             f"(n={c['n']}, {c['backend']})")  # fmt: skip
        parts.append(f"{summary['seconds']['total']:.0f} s")
        return "; ".join(parts), summary
    if name == "bench":
        try:
            bench = json.loads((ctx.results / "bench.json").read_text())
        except (OSError, ValueError):
            return "", None
        info, verdicts = bench.get("ratio_info", {}), bench.get("verdicts", {})
        head = verdicts.get(info.get("headline"), {})
        value = "-" if head.get("value") is None else f"{head['value']:.3f}"
        deploy = verdicts.get("deploy infer / resnet50 infer", {})
        dvalue = "-" if deploy.get("value") is None else f"{deploy['value']:.3f}"
        line = (f"{info.get('headline')} {value} ({head.get('verdict')}; auto: "
                f"{info.get('auto_picked')}); deploy/resnet50 {dvalue}; "
                f"{len(bench.get('flags', []))} flag(s)")  # fmt: skip
        keep = {k: bench.get(k) for k in ("settings", "ratios", "verdicts", "flags", "ratio_info",
                                          "memory_meaning")}  # fmt: skip
        keep["cases"] = {n: {k: c.get(k) for k in ("status", "img_per_s", "memory_bytes")}
                         for n, c in bench.get("cases", {}).items()}  # fmt: skip
        return line, keep
    return "", None


def verdict(steps: dict[str, dict]) -> str:
    statuses = [s["status"] for s in steps.values()]
    if all(s == "ok" for s in statuses):
        return "PASSED"
    if all(s in ("ok", "not selected") for s in statuses):
        return "INCOMPLETE"
    return "FAILED"


def write_record(record: dict, results: Path) -> Path:
    """gpu_check.json, atomically (a run cut short leaves the last complete record)."""
    out = results / "gpu_check.json"
    fd, tmp = tempfile.mkstemp(dir=results, prefix=".gpu_check.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, out)
    return out


def table(steps: dict[str, dict]) -> str:
    rows = [["step", "status", "s", "cap", "result"]]
    for name, s in steps.items():
        rows.append([name, s["status"], str(s.get("seconds", "-")), str(s.get("cap_s", "-")),
                     s.get("result", s.get("why", ""))])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(fmt, rows[1:])])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--dry-run", "--cpu", dest="cpu", action="store_true",
                   help="CPU rehearsal: the same steps at tiny sizes")  # fmt: skip
    names = [s.name for s in STEPS]
    p.add_argument("--steps", default=",".join(names),
                   help=f"comma-separated steps to run (default: all: {','.join(names)})")
    p.add_argument("--break", dest="broken", default="", metavar="STEP",
                   help="make STEP fail on purpose (rehearses the failure path)")  # fmt: skip
    p.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's cap (rehearses a time-out)")  # fmt: skip
    p.add_argument("--budget", type=int, default=None,
                   help=f"seconds for all steps (default {GPU_BUDGET_S} on a GPU; the rehearsal "
                   "sums its own caps)")  # fmt: skip
    args = p.parse_args(argv)
    selected = [n.strip() for n in args.steps.split(",") if n.strip()]
    for n in [*selected, *([args.broken] if args.broken else [])]:
        if n not in names:
            p.error(f"unknown step {n!r} (steps: {', '.join(names)})")
    args.selected = selected
    args.caps = {}
    for item in args.cap:
        name, _, value = item.partition("=")
        if name not in names or not value.isdigit():
            p.error(f"--cap {item!r}: expected STEP=SECONDS with STEP one of {', '.join(names)}")
        args.caps[name] = int(value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    caps = {s.name: args.caps.get(s.name, s.cpu_cap_s if args.cpu else s.cap_s) for s in STEPS}
    plan = [Step(s.name, caps[s.name], s.cpu_cap_s, s.command, s.needs, s.env) for s in STEPS]
    budget = args.budget if args.budget is not None else (
        GPU_BUDGET_S if not args.cpu else sum(caps.values()) + MARGIN_S
    )
    problem = check_plan(plan, budget, MARGIN_S, None if args.cpu else FIRST_STEPS_BUDGET_S)
    if problem:
        print(f"gpu_check: error: {problem}; nothing was run", file=sys.stderr)
        return 2
    work = Path(os.environ.get("XVOL_GPU_CHECK_WORK") or tempfile.mkdtemp(prefix="xvol_gpu_check."))
    results = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench_results"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.cpu, os.environ.get("XVOL_PYTHON") or sys.executable, work, results)
    make_val_folder(work / "val", 32 if args.cpu else 160)
    os.environ["XVOL_DATA"] = str(work / "data")
    record = {
        "tool": "gpu_check", "version": 2, "mode": "cpu rehearsal" if args.cpu else "gpu",
        "budget_s": budget, "margin_s": MARGIN_S, "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": _device_name(ctx),
        "complete": False,
    }  # fmt: skip
    steps: dict[str, dict] = {
        s.name: {"status": "not selected" if s.name not in args.selected else "pending"}
        for s in plan
    }
    record["steps"] = steps
    print(f"# gpu_check ({record['mode']}) on {record['device']}: {len(args.selected)} of "
          f"{len(plan)} steps, caps {sum(caps[n] for n in args.selected)} s of a {budget} s "
          f"budget ({MARGIN_S} s margin)", flush=True)  # fmt: skip
    for step in plan:
        if step.name not in args.selected:
            continue
        print(f"== {step.name} (cap {step.cap_s} s)", flush=True)
        row = run_step(step, ctx, step.cap_s, broken=args.broken == step.name)
        if row["status"] not in ("skipped",):
            line, details = results_of(step.name, ctx)
            row["result"] = line
            if details is not None:
                record.setdefault("results", {})[step.name] = details
        steps[step.name] = row
        print(f"   {row['status']}" + (f" after {row['seconds']} s" if "seconds" in row else "")
              + (f": {row.get('result') or row.get('why', '')}" if row.get("result") or
                 row.get("why") else ""), flush=True)  # fmt: skip
        write_record(record, results)
    record["complete"] = True
    record["verdict"] = verdict(steps)
    record["ok"] = record["verdict"] == "PASSED"
    ran = [n for n, s in steps.items() if s["status"] not in ("not selected", "skipped")]
    record["ran"] = ran
    with open(results / "gpu_check.log", "w") as log:
        for name in ran:
            for ext in ("out", "err"):
                p = work / "logs" / f"{name}.{ext}"
                log.write(f"\n===== {name}: {ext} =====\n")
                log.write(p.read_text(errors="replace") if p.exists() else "")
    out = write_record(record, results)
    print(f"\n# gpu_check ({record['mode']}) on {record['device']}: {record['verdict']} "
          f"(ran: {', '.join(ran) or 'nothing'})")  # fmt: skip
    print(table(steps))
    print(f"wrote {out}")
    return 0 if record["ok"] else 1


def _device_name(ctx: Context) -> str:
    if ctx.cpu:
        return platform.processor() or "cpu"
    try:
        out = subprocess.run(
            [ctx.py, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return out.stdout.strip() or f"no CUDA device ({out.stderr.strip().splitlines()[-1:]})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"


if __name__ == "__main__":
    sys.exit(main())
