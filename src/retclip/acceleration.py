"""Throughput settings of the model passes: autocast precision and ``torch.compile``.

``--precision bf16|fp16`` runs the model passes (proposer, backbone, pooling) under
``torch.autocast``; everything that leaves them is float32 (features are normalised in float32,
scores and masks are float32 or bool), so a database's dtype and the scores' arithmetic do not
change. On CUDA both half types work; on a CPU bfloat16 autocast is allowed and float16 refused.
``--compile`` wraps a callable in ``torch.compile``; if compiling fails (no compiler, an
unsupported operation), it warns once and runs eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from retclip.errors import InputError

Precision = Literal["fp32", "bf16", "fp16"]
#: ``--precision`` → the autocast dtype (``None``: no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise :class:`InputError` unless ``precision`` can run on ``device`` (fp16: CUDA only)."""
    if precision not in AUTOCAST_DTYPES:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(AUTOCAST_DTYPES)}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise InputError(
            f"--precision fp16 needs a CUDA device (autocast to float16 is CUDA-only here), got "
            f"{kind}; use --precision bf16 or fp32"
        )
    if precision != "fp32" and kind not in ("cuda", "cpu"):
        raise InputError(f"--precision {precision} runs on cuda or cpu, got {kind}")


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` of ``precision`` on ``device``'s type, or a no-op for ``fp32``."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class Compiled:
    """``fn`` through ``torch.compile``, compiled on first call; falls back to ``fn`` (with one
    warning naming the cause) when ``torch.compile`` is missing or compiling fails."""

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn = fn
        self.what = what
        self.compiled: Callable[..., Any] | None = None
        self.failed = False
        compile_fn = getattr(torch, "compile", None)
        if compile_fn is None:
            self._fail("this torch has no torch.compile")
        else:
            self.compiled = compile_fn(fn)

    def _fail(self, why: str) -> None:
        self.failed = True
        warnings.warn(
            f"--compile: torch.compile of the {self.what} is not available ({why}); running it "
            "uncompiled",
            RuntimeWarning,
            stacklevel=3,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed and self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # compiler faults of any kind: run eagerly
                if not _is_compile_error(exc):
                    raise
                self._fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return self.fn(*args, **kwargs)


def _is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from dynamo / inductor rather than from the model itself."""
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or "inductor" in str(exc)
