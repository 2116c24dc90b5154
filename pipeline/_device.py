"""What an accelerator's error means for the process that got it."""

from __future__ import annotations

import torch


def breaks_the_device(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, is an accelerator error other than
    running out of memory: a device-side assert, an illegal memory access. CUDA keeps such an
    error in the process's context, and every later call on the device fails with it.

    >>> breaks_the_device(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    True
    >>> breaks_the_device(torch.OutOfMemoryError("CUDA out of memory")), breaks_the_device(ValueError("x"))
    (False, False)
    """
    accelerator = getattr(torch, "AcceleratorError", None)  # torch 2.8 on; before, a RuntimeError
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return False
        if (isinstance(exc, accelerator) if accelerator is not None
                else isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
