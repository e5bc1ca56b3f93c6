"""Compile the Triton kernels ahead of time for a GPU target, on any machine (no GPU needed).

A GPU path needs a check that runs without a GPU: the interpreter has no shared-memory limit,
so only a real compile shows whether a config fits. This compiles every config of every kernel
exactly as the JIT would on a device: the launchers run on CPU tensors of a ResNet stage-3 slot
(channels_last, 16-byte aligned, stride-1 channels) under ``triton_xconv.capture_launches``,
and each recorded launch goes through the JIT's own binder, so the signature carries the same
divisibility/equal-to-1 specialization (and hence the same software pipelining) as a launch on
an H100. ``python scripts/triton_smem.py`` compiles every config (``make test-aot``, run by CI
after the suite), prints the table and exits 1 on any problem :func:`check_rows` finds;
tests/test_kernels.py compiles the configs the default ``auto`` path launches (``"fixed"``).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch

__all__ = ["TARGETS", "check_rows", "compile_all", "compile_one", "recorded_launches"]

# (name, compute capability, opt-in shared memory per block in bytes)
TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def recorded_launches(dtype: torch.dtype) -> list[tuple[str, str, tuple, dict]]:
    """(case, kernel, args, constexprs) of the deploy forward, the PSSA forward and both PSSA
    backward kernels on a 256-channel 14x14 slot (batch 2), as the JIT would receive them."""
    from xvol.ops import triton_xconv as tx
    from xvol.ops.geometry import PSSAGeometry, pssa_offsets

    if tx.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time compiles need compiled mode")
    c, hw = 256, 14
    x = torch.randn(2, c, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    taps = tuple(pssa_offsets((1,)))
    w = torch.randn(c, c, 3, 3, dtype=dtype)
    wa = torch.randn(c, c * len(taps), 1, 1, dtype=dtype)
    bias = torch.randn(c, dtype=dtype)
    geom = PSSAGeometry(taps, 1, 0, (hw, hw), 1)
    gy = torch.randn_like(x)
    cases = []
    with tx.capture_launches() as launches:
        tx.xconv_deploy(x, w, wa, bias, taps, 1, 1, 1, 0, (hw, hw))
        cases.append("deploy 3x3+PSSA")
        tx.pssa_forward(x, wa, geom)
        cases.append("PSSA forward")
        tx.pssa_backward(x, wa, gy, geom, need_x=True, need_w=True)
        cases.extend(["PSSA dx", "PSSA dW"])
    return [(case, *launch) for case, launch in zip(cases, launches, strict=True)]


def compile_one(case: str, kernel: str, args: tuple, meta: dict, config: dict, arch: int) -> dict:
    """Compile one launch with one config for ``arch``; returns the compile's resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from xvol.ops import triton_xconv as tx

    jit = getattr(tx._kernels(), kernel).fn  # the JITFunction under the autotuner
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {
        **meta,
        **config["blocks"],
        "num_warps": config["num_warps"],
        "num_stages": config["num_stages"],
    }
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(
        backend, kwargs, bound, specialization, options
    )
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    return {
        "shared": int(compiled.metadata.shared),
        "n_regs": int(getattr(compiled, "n_regs", 0) or 0),
        "aligned_args": sum(1 for a in attrs.values() if a),
        "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
        "compile_s": round(time.perf_counter() - start, 2),
    }


@functools.cache  # per process: a pool worker records each dtype once
def _launches(dtype_name: str) -> list[tuple[str, str, tuple, dict]]:
    return recorded_launches(DTYPES[dtype_name])


def _job(job: tuple) -> dict:
    dtype_name, target_name, index, case, kernel, config_index = job
    from xvol.ops import triton_xconv as tx

    config = tx.CONFIGS[kernel][config_index]
    arch, limit = TARGETS[target_name]
    elem = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    row = {
        "case": case,
        "kernel": kernel,
        "config": {
            **config["blocks"],
            "warps": config["num_warps"],
            "stages": config["num_stages"],
        },
        "dtype": dtype_name,
        "target": target_name,
        "limit": limit,
        "estimate": tx.smem_estimate(kernel, config, elem),
    }
    if row["estimate"] > limit:  # the runtime prune never launches it on this target
        row["pruned"] = True
        return row
    _, _, args, meta = _launches(dtype_name)[index]
    try:
        row.update(compile_one(case, kernel, args, meta, config, arch))
    except Exception as err:  # a compile failure is a result to report, not a crash
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return row


def compile_all(
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    targets: tuple[str, ...] = ("sm_80", "sm_90"),
    workers: int | None = None,
    configs: str = "all",
) -> list[dict]:
    """Every (launch, config, dtype, target): its shared memory, registers and estimate; a
    config whose estimate is over the target's limit is not compiled (``pruned``: the runtime
    prune never launches it there). ``configs="fixed"``: per launch, dtype and target only the
    configs up to the first that fits, the one ``impl="auto"`` launches (triton_xconv.
    fixed_config); ``"all"``: the whole autotune grid of an explicit ``impl="triton"``."""
    from xvol.ops import triton_xconv as tx

    if configs not in ("all", "fixed"):
        raise ValueError(f"configs: expected 'all' or 'fixed', got {configs!r}")
    jobs = []
    for dtype_name in dtypes:
        launches = _launches(dtype_name)
        elem = DTYPES[dtype_name].itemsize
        for target_name in targets:
            limit = TARGETS[target_name][1]
            for index, (case, kernel, _, _) in enumerate(launches):
                for config_index, config in enumerate(tx.CONFIGS[kernel]):
                    jobs.append((dtype_name, target_name, index, case, kernel, config_index))
                    if configs == "fixed" and tx.smem_estimate(kernel, config, elem) <= limit:
                        break
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers == 1:
        return [_job(j) for j in jobs]
    # spawn, not fork: the parent holds torch/Triton threads, and a forked child can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_job, jobs))


def check_rows(rows: list[dict], full: bool = True) -> list[str]:
    """What is wrong with a :func:`compile_all` table, one line per problem (none: it passes).

    Every compiled config fits its target and the runtime prune's estimate bounds it (the prune
    never launches a config that does not fit); the JIT's divisibility specialization is in
    place; every launch has a config that fits each target in each dtype, and in bf16 the first
    config does; the GEMM kernels are pipelined through shared memory and use Hopper's wgmma on
    sm_90 in bf16. ``full`` (the whole grid): Hopper's bigger tiles (4 stages) compile for
    sm_90 in bf16, for the forward and the dW kernel.
    """
    from xvol.ops import triton_xconv as tx

    problems = []
    for r in rows:
        where = f"{r['case']} {r['kernel']} {r['config']} {r['dtype']} {r['target']}"
        if "error" in r:
            problems.append(f"{where}: compile failed: {r['error']}")
        elif r.get("pruned"):
            if not r["estimate"] > r["limit"]:
                problems.append(f"{where}: pruned, but its estimate {r['estimate']} fits")
        else:
            if not r["shared"] <= r["limit"]:
                problems.append(f"{where}: {r['shared']} B of shared memory > {r['limit']}")
            if not r["shared"] <= r["estimate"]:
                problems.append(f"{where}: {r['shared']} B > the estimate {r['estimate']}")
            if not r["aligned_args"] > 0:
                problems.append(f"{where}: no 16-byte aligned argument (JIT specialization)")
            if r["kernel"] != "pssa_bwd_x" and not r["shared"] > 0:
                problems.append(f"{where}: a GEMM kernel without shared-memory pipelining")
            gemm_sm90 = r["kernel"] != "pssa_bwd_x" and r["target"] == "sm_90"
            if gemm_sm90 and r["dtype"] == "bf16" and not r["wgmma"] > 0:
                problems.append(f"{where}: no wgmma on sm_90")
        first = tx.CONFIGS[r["kernel"]][0]["blocks"]
        if r["dtype"] == "bf16" and r.get("pruned") and all(
            r["config"][k] == v for k, v in first.items()
        ):
            problems.append(f"{where}: the first config is pruned in bf16")
    compiled = [r for r in rows if not r.get("pruned") and "error" not in r]
    for key in sorted({(r["case"], r["dtype"], r["target"]) for r in rows}):
        if not any((r["case"], r["dtype"], r["target"]) == key for r in compiled):
            problems.append(f"{' '.join(key)}: no config fits (the launch would fail)")
    if full:
        big = {r["kernel"] for r in compiled if r["target"] == "sm_90" and r["dtype"] == "bf16"
               and r["config"]["stages"] == 4}  # fmt: skip
        if big != {"xconv_fwd", "pssa_bwd_w"}:
            problems.append(f"4-stage bf16 tiles compile on sm_90 for {sorted(big)} only")
    return problems
