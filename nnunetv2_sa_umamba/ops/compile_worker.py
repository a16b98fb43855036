"""A worker process of ops/compile_ahead.py: compiles Triton kernel variants into Triton's on-disk cache.

Started as ``python -m nnunetv2_sa_umamba.ops.compile_worker TARGET`` (TARGET: the GPU target as JSON, e.g.
{"backend": "cuda", "arch": 90, "warp_size": 32}); reads one job per line on stdin, {"id", "module", "name",
"data"}: the kernel's module and qualified name and Triton's specialization data of the variant; answers one line per
job on stdout, {"id", "ok", "error", "compilations"}. It compiles with ``JITFunction.preload``, as the parent would,
so the variant lands in the on-disk cache (``TRITON_CACHE_DIR``, inherited) under the key a launch looks up. It never
touches the GPU: a stand-in driver gives Triton the parent's target.
"""
from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict


class _StandInDriver:
    """What preloading asks of Triton's driver: a device index and the target to compile for."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_target(self):
        return self.target


def _kernel(module: str, name: str):
    kernel = importlib.import_module(module)
    for part in name.split("."):
        kernel = getattr(kernel, part)
    return kernel


def _compile(job: dict) -> dict:
    from nnunetv2_sa_umamba.ops.compile_stats import record_compilations

    try:
        with record_compilations() as record:
            _kernel(job["module"], job["name"]).preload(job["data"])
    except Exception as error:  # noqa: BLE001 - reported to the parent, which compiles the variant itself
        return {"id": job["id"], "ok": False, "error": repr(error), "compilations": []}
    return {"id": job["id"], "ok": True, "error": "", "compilations": [asdict(c) for c in record.compilations]}


def main(argv: list[str]) -> int:
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    driver.set_active(_StandInDriver(GPUTarget(**json.loads(argv[0]))))
    for line in sys.stdin:
        print(json.dumps(_compile(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
