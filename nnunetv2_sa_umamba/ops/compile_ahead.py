"""Compile the Triton kernel variants a workload needs in parallel, ahead of running it.

Triton compiles a kernel variant at its first launch, one at a time, in the launching thread. ``compile_ahead()``
is a dry-run mode instead: inside it, a launch of a variant this process has not compiled yet does not run (its
outputs stay unwritten) and the variant is handed to parallel workers; leaving the block waits for them and loads
every variant into the kernels' in-memory caches, where the real launches find them. Run one step of the real
workload inside, on its real shapes and dtypes: its launches then name exactly the variants the step needs, which no
list kept by hand would. The dry step's results are garbage: it must not change anything that outlives it (see
training/precompile.py for a network's training step).

Workers: by default threads of this process, which overlap only partly (Triton's compiler passes, LLVM and ptxas
run without the GIL, its Python front end and the dry step hold it), or processes (``processes=True``;
ops/compile_worker.py, one per CPU) that compile into Triton's on-disk cache, from which this process then loads each
variant. Threads are the default: on a 16-CPU GPU machine they finished well before the processes, which each import
torch first (docs/BENCHMARKS.md). A variant a worker could not compile is compiled here instead, and one that fails
here too is left to its first launch, which raises the error there.

How, and since which Triton (checked on the installed one; where anything is missing the block changes nothing and
every launch runs and compiles as usual):
- ``triton.knobs.runtime.jit_cache_hook`` (3.4+) is called before a variant compiles; returning True skips the
  compile and the launch. Its ``specialization_data`` describes the variant exactly.
- ``JITFunction.preload(specialization_data)`` (3.4+) compiles that variant into the kernel's in-memory cache under
  the key a launch looks up, and into the on-disk cache under the key a launch computes (checked for Triton 3.6).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import torch

from nnunetv2_sa_umamba.ops.common import triton_importable, triton_interpreted
from nnunetv2_sa_umamba.ops.compile_stats import Compilation, CompileRecord, record_compilations

WORKER_MODULE = "nnunetv2_sa_umamba.ops.compile_worker"


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
def compile_ahead(max_workers: int | None = None, processes: bool = False) -> Iterator[CompileRecord]:
    """Dry-run mode (module docstring): launches of variants not compiled yet are skipped and compiled by
    ``max_workers`` workers (``default_workers()``), processes or threads; on exit waits for them and loads every
    variant. Yields the ``CompileRecord`` of the compilations (the workers' and this process's loads from the
    on-disk cache), filled when the block ends. Where not ``compile_ahead_supported()`` the block runs as usual
    (launches run) and the record holds what compiled meanwhile."""
    if not compile_ahead_supported():
        with record_compilations() as record:
            yield record
        return
    from triton import knobs

    workers = max_workers or default_workers()
    variants: dict[tuple[int, str], tuple] = {}  # (kernel, key) -> (kernel, specialization data)
    loads: list[Future] = []  # each variant's compile or load in this process
    lock = threading.Lock()
    processes_pool = _WorkerProcesses(workers) if processes else None
    threads = None if processes else _thread_pool(workers)
    previous = knobs.runtime.jit_cache_hook

    def hook(*, key, fn, compile, is_manual_warmup, **kwargs):
        if previous is not None and previous(key=key, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                                             **kwargs):
            return True
        if is_manual_warmup:  # preloads (ours, and explicit warmups) compile
            return None
        kernel, data = fn.jit_function, compile["specialization_data"]
        with lock:
            if (id(kernel), key) in variants:
                return True
            variants[id(kernel), key] = (kernel, data)
            if processes_pool is not None:
                processes_pool.submit(kernel, data)
        if threads is not None:
            loads.append(threads.submit(kernel.preload, data))
        return True

    with record_compilations() as record:
        knobs.runtime.jit_cache_hook = hook
        try:
            yield record
        finally:
            knobs.runtime.jit_cache_hook = previous
            if processes_pool is not None:
                record.compilations.extend(processes_pool.finish())
                # from the on-disk cache; those the workers failed to compile compile here
                threads = _thread_pool(workers)
                loads += [threads.submit(kernel.preload, data) for kernel, data in variants.values()]
            if threads is not None:
                threads.shutdown(wait=True)
    failures = [future.exception() for future in loads if future.exception() is not None]
    if failures:
        warnings.warn(f"{len(failures)} of {len(variants)} Triton kernel variants failed to compile ahead (first: "
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


class _WorkerProcesses:
    """Up to ``count`` compile_worker processes, started as variants come (the first ones import Triton while the
    dry step goes on), each fed variants in turn. Never raises: a variant no worker took is compiled by the parent
    when it loads the variants."""

    def __init__(self, count: int):
        self.count = count
        self.workers: list[tuple[subprocess.Popen, threading.Thread, list[str]]] = []
        self.jobs = 0
        self.broken = False

    def submit(self, kernel, data: str) -> None:
        if self.broken:
            return
        try:
            if len(self.workers) < self.count:
                self.workers.append(self._start())
            worker = self.workers[self.jobs % len(self.workers)][0]
            job = {"id": self.jobs, "module": kernel.fn.__module__, "name": kernel.fn.__qualname__, "data": data}
            self.jobs += 1
            worker.stdin.write(json.dumps(job) + "\n")
            worker.stdin.flush()
        except (OSError, ValueError):  # no worker could start, or one died
            self.broken = not self.workers

    @staticmethod
    def _start() -> tuple[subprocess.Popen, threading.Thread, list[str]]:
        from triton.runtime.driver import driver

        target = json.dumps(vars(driver.active.get_current_target()))
        # the parent's import path, which may hold this package through a script's folder rather than installed;
        # compiling, never Triton's interpreter
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path), "TRITON_INTERPRET": "0"}
        worker = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, target], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        # answers read as they come, so that a full pipe never blocks the worker
        answers: list[str] = []
        reader = threading.Thread(target=answers.extend, args=(worker.stdout,), daemon=True)
        reader.start()
        return worker, reader, answers

    def finish(self) -> list[Compilation]:
        """Waits for every worker; the compilations they report."""
        compilations = []
        for worker, reader, answers in self.workers:
            try:
                worker.stdin.close()
            except OSError:
                pass
            worker.wait()
            reader.join()
            for line in answers:
                try:
                    compilations += [Compilation(**c) for c in json.loads(line)["compilations"]]
                except (ValueError, KeyError, TypeError):
                    continue
        return compilations
