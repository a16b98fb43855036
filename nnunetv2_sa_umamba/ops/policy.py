"""Which kernels SA-UMamba's modules run: one ``KernelPolicy``, resolved once when the network is built.

Every module takes the policy at construction and stores it; ``forward`` branches only on the stored choices,
never on the environment. Each operator still checks at every call whether its kernels can run on the tensors
it gets (dtype, device, deterministic mode, ...): that check sits beside the operator's code in ops/.

Choices, resolved from explicit arguments, else the environment, else the defaults:

- ``implementation``: "fast" (default) or "reference" (the released code's operations; its modules ignore the
  fused choices, its scan still follows ``scan``).
- ``scan``: the selective-scan backend, "auto" (default), "cuda", "triton" or "torch" (``SAUMAMBA_SCAN_BACKEND``),
  or "reference" (the sequential loop, for tests; only as an argument). See ops/scan/interface.py.
- ``rfaconv``, ``layernorm``, ``cross_scan``: each fused operator's Triton kernels, "auto" (default: on CUDA
  tensors when Triton is installed), "triton" (always) or "torch" (never).
- ``scan_forward``: the fast path's scan forward as our step-by-step Triton kernel beside mamba-ssm's backward
  (``cuda`` scan backend only), "auto" (default: on CUDA tensors when Triton is installed, for the scans with enough
  channels and steps for it to be faster; ``use_sequential_forward`` in ops/scan/interface.py), "triton" (always)
  or "torch" (never: mamba-ssm's forward).
- ``scan_backward``: the fast path's scan backward as our step-by-step Triton kernel instead of mamba-ssm's (``cuda``
  scan backend only), "auto" (default: on CUDA tensors when Triton is installed, for short scans with enough
  channels; ``use_sequential_backward`` in ops/scan/interface.py), "triton" (always) or "torch" (never).
- ``SAUMAMBA_FUSED_KERNELS`` sets the last five; a per-operator argument overrides it for that operator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

IMPLEMENTATIONS = ("fast", "reference")
SCAN_ENV_VAR = "SAUMAMBA_SCAN_BACKEND"
SCAN_ENV_CHOICES = ("auto", "cuda", "triton", "torch")
SCAN_BACKENDS = SCAN_ENV_CHOICES + ("reference",)
FUSED_ENV_VAR = "SAUMAMBA_FUSED_KERNELS"
FUSED_CHOICES = ("auto", "triton", "torch")
FUSED_OPERATORS = ("rfaconv", "layernorm", "cross_scan", "scan_forward", "scan_backward")
_ALLOWED = {"implementation": IMPLEMENTATIONS, "scan": SCAN_BACKENDS,
            **{name: FUSED_CHOICES for name in FUSED_OPERATORS}}


@dataclass(frozen=True)
class KernelPolicy:
    """The kernel choice of every operator; validated at construction. ``KernelPolicy()`` is the default policy,
    whatever the environment says; ``kernel_policy()`` reads the environment."""

    implementation: str = "fast"
    scan: str = "auto"
    rfaconv: str = "auto"
    layernorm: str = "auto"
    cross_scan: str = "auto"
    scan_forward: str = "auto"
    scan_backward: str = "auto"

    def __post_init__(self) -> None:
        for field in fields(self):
            _check(field.name, getattr(self, field.name), _ALLOWED[field.name])

    @property
    def fast(self) -> bool:
        """Whether modules run the fast path (the fused choices apply only there)."""
        return self.implementation == "fast"


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"kernel policy: {name} must be one of {', '.join(allowed)}, got {value!r}")


def _from_env(name: str, choices: tuple[str, ...], environ: Mapping[str, str]) -> str | None:
    """The environment variable's value (case and surrounding blanks ignored), None when unset or empty."""
    raw = environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return None
    if value not in choices:
        raise ValueError(f"environment variable {name}={raw!r} is not one of {', '.join(choices)}; set one of those "
                         f"or unset it.")
    return value


def kernel_policy(implementation: str | None = None, scan: str | None = None, fused: str | None = None, *,
                  rfaconv: str | None = None, layernorm: str | None = None, cross_scan: str | None = None,
                  scan_forward: str | None = None, scan_backward: str | None = None,
                  environ: Mapping[str, str] | None = None) -> KernelPolicy:
    """The policy for these arguments, with ``SAUMAMBA_SCAN_BACKEND`` and ``SAUMAMBA_FUSED_KERNELS`` filling in
    what is not given (``environ``: os.environ by default), and the defaults the rest.

    ``fused`` sets every fused operator; ``rfaconv``, ``layernorm``, ``cross_scan``, ``scan_forward`` and
    ``scan_backward`` override it for one.
    Raises ValueError naming the argument or environment variable and its allowed values.
    """
    environ = os.environ if environ is None else environ
    if fused is not None:
        _check("fused", fused, FUSED_CHOICES)
    scan = scan or _from_env(SCAN_ENV_VAR, SCAN_ENV_CHOICES, environ) or "auto"
    fused = fused or _from_env(FUSED_ENV_VAR, FUSED_CHOICES, environ) or "auto"
    return KernelPolicy(implementation=implementation or "fast", scan=scan, rfaconv=rfaconv or fused,
                        layernorm=layernorm or fused, cross_scan=cross_scan or fused,
                        scan_forward=scan_forward or fused, scan_backward=scan_backward or fused)
