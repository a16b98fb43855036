"""Compile the Triton kernel variants a workload needs in parallel, ahead of running it.

Triton compiles a kernel variant at its first launch, one at a time, in the launching thread. ``compile_ahead()``
is a dry-run mode instead: inside it, a launch of a variant this process has not compiled yet does not run (its
outputs stay unwritten) and the variant is compiled in a pool of threads; leaving the block waits for them, and the
variants then sit in the kernels' in-memory caches (and Triton's on-disk cache), where the real launches find them.
Run one step of the real workload inside, on its real shapes and dtypes: its launches then name exactly the variants
the step needs, which no list kept by hand would. The dry step's results are garbage: it must not change anything
that outlives it (see training/precompile.py for a network's training step).

Workers: threads of this process, one per CPU. They overlap only partly (Triton's compiler passes, LLVM and ptxas
run without the GIL, its Python front end and the dry step hold it), yet on a 16-CPU GPU machine they finished well
before worker processes did, which each import torch first, and as soon as processes forked from this one, which
cost about a second to fork (docs/BENCHMARKS.md). A variant that fails to compile
here is left to its first launch, which raises the error there.

The GIL's switch interval is cut while the block is open: every torch operation of the dry step lets go of the GIL
and, with compile threads waiting for it, takes it back only when one of them yields, after up to the interpreter's
switch interval (5 ms by default). With the default the demo's pre-compile took 15-19 s on an H200, longer than
the dry step and the compiles one after the other (13.3 s); with 0.1 ms, 11-14 s (docs/BENCHMARKS.md).

How, and since which Triton (checked on the installed one; where anything is missing the block changes nothing and
every launch runs and compiles as usual):
- ``triton.knobs.runtime.jit_cache_hook`` (3.4+) is called before a variant compiles; returning True skips the
  compile and the launch. Its ``specialization_data`` describes the variant exactly.
- ``JITFunction.preload(specialization_data)`` (3.4+) compiles that variant into the kernel's in-memory cache under
  the key a launch looks up, and into the on-disk cache under the key a launch computes (checked for Triton 3.6).
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import torch

from nnunetv2_sa_umamba.ops.common import triton_importable, triton_interpreted
from nnunetv2_sa_umamba.ops.compile_stats import CompileRecord, record_compilations

# While the block is open (module docstring): how soon a compile thread hands the GIL back to the dry step.
DRY_STEP_SWITCH_INTERVAL_S = 1e-4


def compile_ahead_supported() -> bool:
    """Whether ``compile_ahead()`` compiles ahead here: Triton 3.4 or later, not its interpreter."""
    if not triton_importable() or triton_interpreted():
        return False
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return hasattr(knobs.runtime, "jit_cache_hook") and hasattr(JITFunction, "preload")


def default_workers() -> int:
    """One compile worker per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def compile_ahead(max_workers: int | None = None) -> Iterator[CompileRecord]:
    """Dry-run mode (module docstring): launches of variants not compiled yet are skipped and compiled by
    ``max_workers`` threads (``default_workers()``); on exit waits for them. Yields the ``CompileRecord`` of the
    compilations, filled when the block ends. Where not ``compile_ahead_supported()`` the block runs as usual
    (launches run) and the record holds what compiled meanwhile."""
    if not compile_ahead_supported():
        with record_compilations() as record:
            yield record
        return
    from triton import knobs

    workers = max_workers or default_workers()
    submitted: set[tuple[int, str]] = set()  # (kernel, launch key) of each variant handed to the threads
    compiles: list[Future] = []
    lock = threading.Lock()
    threads = _thread_pool(workers)
    previous = knobs.runtime.jit_cache_hook

    def hook(*, key, fn, compile, is_manual_warmup, **kwargs):
        if previous is not None and previous(key=key, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                                             **kwargs):
            return True
        if is_manual_warmup:  # preloads (ours, and explicit warmups) compile
            return None
        kernel, data = fn.jit_function, compile["specialization_data"]
        with lock:
            if (id(kernel), key) in submitted:
                return True
            submitted.add((id(kernel), key))
        compiles.append(threads.submit(kernel.preload, data))
        return True

    switch_interval = sys.getswitchinterval()
    with record_compilations() as record:
        knobs.runtime.jit_cache_hook = hook
        sys.setswitchinterval(min(switch_interval, DRY_STEP_SWITCH_INTERVAL_S))
        try:
            yield record
        finally:
            knobs.runtime.jit_cache_hook = previous
            sys.setswitchinterval(switch_interval)  # the threads alone now: fewer hand-overs
            threads.shutdown(wait=True)
    failures = [future.exception() for future in compiles if future.exception() is not None]
    if failures:
        warnings.warn(f"{len(failures)} of {len(submitted)} Triton kernel variants failed to compile ahead (first: "
                      f"{failures[0]!r}); each compiles, and raises, at its first launch instead.", RuntimeWarning,
                      stacklevel=3)


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    return ThreadPoolExecutor(workers, thread_name_prefix="triton-compile-ahead", initializer=_use_device,
                              initargs=(device,))


def _use_device(index: int | None) -> None:
    # Triton compiles for, and files the kernel under, the thread's current CUDA device
    if index is not None:
        torch.cuda.set_device(index)
