"""What an accelerator's error means for the process that got it."""

from __future__ import annotations

import torch


def _chain(exc: BaseException | None):
    """``exc`` and the errors it was raised from."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, says the device ran out of memory:
    torch's error, or its message inside another (torchvision's GPU JPEG decoder wraps every
    error of its decoding in a plain ``RuntimeError``).

    >>> out_of_memory(RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2 GiB"))
    True
    """
    return any(isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))
               for e in _chain(exc))


def breaks_the_device(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, is an accelerator error other than
    running out of memory: a device-side assert, an illegal memory access. CUDA keeps such an
    error in the process's context, and every later call on the device fails with it.

    >>> breaks_the_device(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    True
    >>> breaks_the_device(RuntimeError("Error while decoding JPEG images: CUDA error: an illegal memory access"))
    True
    >>> breaks_the_device(torch.OutOfMemoryError("CUDA out of memory")), breaks_the_device(ValueError("x"))
    (False, False)
    """
    if out_of_memory(exc):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)  # torch 2.8 on; before, a RuntimeError
    return any((accelerator is not None and isinstance(e, accelerator))
               or (isinstance(e, RuntimeError) and "CUDA error" in str(e)) for e in _chain(exc))
