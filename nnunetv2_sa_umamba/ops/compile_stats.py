"""Which Triton kernels this process compiles, with which specialisation, and how long each compile took.

Triton compiles a @triton.jit kernel once per specialisation: its constexpr values, its argument dtypes, whether an
int argument equals 1 or is divisible by 16 and whether a pointer is 16-byte aligned (unless the kernel lists the
argument in ``do_not_specialize``), and its launch options (num_warps, ...). A compiled kernel is kept in memory for
the process and on disk in Triton's cache (``TRITON_CACHE_DIR``, by default ~/.triton/cache), where a later process
finds it in milliseconds: on a fresh machine every variant is compiled once, for seconds.

``record_compilations()`` records every compilation of the process while it is open. It reads Triton's compilation
listener (``triton.knobs.compilation.listener``, Triton 3.4 and later), which Triton calls from whichever thread
compiles, for a compile and for a load from the on-disk cache alike; the time is Triton's own measurement of the
compile. Without Triton, with a Triton before 3.4, or under Triton's interpreter (``TRITON_INTERPRET=1``, which
compiles nothing) it records nothing.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from nnunetv2_sa_umamba.ops.common import triton_importable

_DIVISIBILITY = "tt.divisibility"


@dataclass(frozen=True)
class Compilation:
    """One kernel variant that Triton compiled, or loaded from its on-disk cache (``cache_hit``)."""

    kernel: str  # the @triton.jit function's name
    variant: str  # its specialisation in short form (``variant_description``)
    seconds: float  # Triton's measurement of the compile; near 0 for a cache hit
    cache_hit: bool


@dataclass
class CompileRecord:
    """The compilations seen while ``record_compilations()`` was open. ``observable``: whether this process could
    report them at all (False without Triton or with a Triton before 3.4, where the record stays empty)."""

    observable: bool
    compilations: list[Compilation] = field(default_factory=list)

    @property
    def compiled(self) -> list[Compilation]:
        """The variants compiled (not loaded from Triton's on-disk cache)."""
        return [c for c in self.compilations if not c.cache_hit]

    @property
    def seconds(self) -> float:
        """Seconds spent compiling, summed over the compilations (which may have overlapped in threads)."""
        return sum(c.seconds for c in self.compilations)

    def per_kernel(self) -> dict[str, dict[str, float]]:
        """{kernel name: {"compiled": count, "cache_hits": count, "seconds": total}}, slowest kernel first."""
        table: dict[str, dict[str, float]] = {}
        for c in self.compilations:
            row = table.setdefault(c.kernel, {"compiled": 0, "cache_hits": 0, "seconds": 0.0})
            row["cache_hits" if c.cache_hit else "compiled"] += 1
            row["seconds"] += c.seconds
        return dict(sorted(table.items(), key=lambda item: -item[1]["seconds"]))

    def summary(self) -> dict[str, Any]:
        """JSON-ready totals: observable, compiled, cache_hits, seconds, and ``per_kernel()``."""
        compiled = len(self.compiled)
        return {"observable": self.observable, "compiled": compiled,
                "cache_hits": len(self.compilations) - compiled, "seconds": round(self.seconds, 3),
                "per_kernel": {name: {**row, "seconds": round(row["seconds"], 3)}
                               for name, row in self.per_kernel().items()}}

    def format(self, variants: bool = False) -> str:
        """A small table: one line per kernel, and with ``variants`` one indented line per compilation."""
        if not self.observable:
            return "Triton compilations: not observable here (no Triton, or a Triton before 3.4)"
        lines = [f"Triton compilations: {len(self.compiled)} compiled, "
                 f"{len(self.compilations) - len(self.compiled)} from the on-disk cache, {self.seconds:.1f} s"]
        for name, row in self.per_kernel().items():
            lines.append(f"  {name:<28} {row['compiled']:>4} compiled {row['cache_hits']:>4} cached "
                         f"{row['seconds']:>7.2f} s")
            if variants:
                lines += [f"      {c.seconds:6.2f} s{' (cached)' if c.cache_hit else ''}  {c.variant}"
                          for c in self.compilations if c.kernel == name]
        return "\n".join(lines)


def variant_description(signature: dict, constants: dict, attrs: dict, num_warps: int | None = None) -> str:
    """A compiled variant in short form, from Triton's description of it (``ASTSource``'s ``signature``: argument
    name -> type or "constexpr"; ``constants``: (index,) -> value; ``attrs``: (index,) -> [[attribute, value]]):
    ``x_ptr:*fp16/16, rows:i32, C=96, ... [8 warps]``, where /16 marks a pointer or int that Triton took as divisible
    by 16 and ``name=value`` a constexpr (an int argument equal to 1 becomes one too)."""
    parts = []
    for index, (name, kind) in enumerate(signature.items()):
        if kind == "constexpr":
            parts.append(f"{name}={constants.get((index,), '?')}")
            continue
        divisible = any(attr and attr[0] == _DIVISIBILITY for attr in attrs.get((index,), ()))
        parts.append(f"{name}:{kind}{'/16' if divisible else ''}")
    return ", ".join(parts) + (f" [{num_warps} warps]" if num_warps is not None else "")


def _compilation(src, metadata: dict, times, cache_hit: bool) -> Compilation:
    fn = getattr(src, "fn", None)
    name = getattr(fn, "__name__", None) or str(getattr(src, "name", "?"))
    if isinstance(getattr(src, "signature", None), dict):
        variant = variant_description(src.signature, getattr(src, "constants", {}), getattr(src, "attrs", {}),
                                      metadata.get("num_warps"))
    else:  # a kernel compiled from IR text
        variant = str(getattr(src, "name", "?"))
    microseconds = (getattr(times, "ir_initialization", 0) + sum(t for _, t in getattr(times, "lowering_stages", ()))
                    + getattr(times, "store_results", 0))
    return Compilation(name, variant, microseconds / 1e6, bool(cache_hit))


@contextmanager
def record_compilations() -> Iterator[CompileRecord]:
    """Records every Triton compilation of this process (any thread) while open, into the ``CompileRecord`` it
    yields; a listener set before is still called. Nestable; not for two threads opening it at once.

        with record_compilations() as record:
            train_step()
        print(record.format())
    """
    knobs = _knobs()
    if knobs is None or not hasattr(knobs.compilation, "listener"):
        yield CompileRecord(observable=False)
        return
    record = CompileRecord(observable=True)
    lock = threading.Lock()
    previous = knobs.compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit, **kwargs):
        compilation = _compilation(src, metadata, times, cache_hit)
        with lock:
            record.compilations.append(compilation)
        if previous is not None:
            previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit,
                     **kwargs)

    knobs.compilation.listener = listener
    try:
        yield record
    finally:
        knobs.compilation.listener = previous


def _knobs():
    """``triton.knobs`` (Triton 3.4 and later), else None."""
    if not triton_importable():
        return None
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs
