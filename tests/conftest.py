import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # the fused Triton kernels run in Triton's CPU interpreter; it must be on before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


# --------------------------------------------------------------- tests of read-only files and folders
# Root writes into read-only folders (CAP_DAC_OVERRIDE), so there such a test would prove nothing. Where that is the
# case, a test marked `read_only` runs again in a child pytest that has dropped the capability (util-linux's
# setpriv) and passes or fails with it; one child runs all of the session's `read_only` tests.
_CHILD_FLAG = "SAUMAMBA_TEST_WITHOUT_DAC_OVERRIDE"
_DROP_DAC = ["--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]


@cache
def permissions_enforced() -> bool:
    """Whether this process is refused writes into a read-only folder."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            open(os.path.join(folder, "probe"), "w").close()
        except PermissionError:
            return True
        finally:
            os.chmod(folder, 0o755)
    return False


@cache
def _setpriv_drops_dac() -> str | None:
    """setpriv's path when it can drop the capability here, else None."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.environ.get(_CHILD_FLAG):
        return None
    probe = subprocess.run([setpriv, *_DROP_DAC, "true"], capture_output=True)
    return setpriv if probe.returncode == 0 else None


def pytest_runtest_setup(item):
    if "read_only" in item.keywords and not permissions_enforced() and _setpriv_drops_dac() is None:
        pytest.skip("this user writes into read-only folders and cannot drop that capability (setpriv)")


_child_runs: dict[str, subprocess.CompletedProcess] = {}  # node ID -> the child pytest that ran that test


def _child_run_without_dac(item) -> subprocess.CompletedProcess:
    """The child pytest without CAP_DAC_OVERRIDE that ran ``item``: at the first `read_only` test, one child runs
    every `read_only` test of the session not run yet (each child's start imports torch again)."""
    if item.nodeid not in _child_runs:
        nodeids = [i.nodeid for i in item.session.items if "read_only" in i.keywords and i.nodeid not in _child_runs]
        child = subprocess.run(
            [_setpriv_drops_dac(), *_DROP_DAC, sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
             *nodeids], cwd=item.config.rootpath, env=os.environ | {_CHILD_FLAG: "1"},
            capture_output=True, text=True, timeout=600)
        _child_runs.update(dict.fromkeys(nodeids, child))
    return _child_runs[item.nodeid]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if "read_only" not in pyfuncitem.keywords or permissions_enforced():
        return None
    child = _child_run_without_dac(pyfuncitem)
    # -rA lists each test that passed as "PASSED <node ID>"; a failed or skipped one is not
    passed = f"PASSED {pyfuncitem.nodeid}" in child.stdout.splitlines()
    assert passed, f"without CAP_DAC_OVERRIDE the test did not pass:\n{child.stdout[-3000:]}\n{child.stderr[-2000:]}"
    return True


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def benchmark_script():
    """A function that imports benchmarks/NAME.py as module NAME (registered in sys.modules, where the scripts'
    dataclasses look their module up), with benchmarks/ on sys.path while it loads, as when the script runs (they
    import their siblings); the modules are removed again after the test module."""
    loaded = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(BENCHMARKS))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(BENCHMARKS))
        loaded.append(name)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
