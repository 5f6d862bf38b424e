"""The accelerator this process trains on, whatever its vendor, and the collective backend that goes with it.

torch's accelerator API (torch.accelerator) names the device type a build can drive: cuda (NVIDIA, and AMD ROCm
builds, which present themselves as cuda), xpu (Intel), npu (Ascend, once the torch_npu plugin is imported), hpu
(Gaudi, with habana_frameworks), mps. Vendor plugins that register a device type are imported here when installed,
so that the rest of the trainer never names a vendor. Without an accelerator the trainer runs on the CPU with gloo.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

log = logging.getLogger(__name__)

# Collective backend per device type (what torch.distributed calls it).
BACKENDS = {"cuda": "nccl", "npu": "hccl", "hpu": "hccl", "xpu": "xccl", "mlu": "cncl", "musa": "mccl", "cpu": "gloo"}
# Plugins that register their device type with torch on import.
PLUGINS = ("torch_npu", "habana_frameworks.torch")


@functools.cache
def load_vendor_plugins() -> tuple[str, ...]:
    """Import the installed device plugins (once per process); returns the ones imported."""
    loaded = []
    for name in PLUGINS:
        try:
            present = importlib.util.find_spec(name.split(".")[0]) is not None
        except (ImportError, ValueError):
            present = False
        if present:
            try:
                importlib.import_module(name)
                loaded.append(name)
            except Exception as exc:  # a broken vendor install: train on what torch itself sees
                log.warning("could not import the device plugin %s: %s", name, exc)
    return tuple(loaded)


def device_type() -> str:
    """cuda, npu, xpu, hpu, ... for the accelerator torch sees, cpu when there is none."""
    import torch

    load_vendor_plugins()
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        current = accelerator.current_accelerator()
        if current is not None:
            return str(current.type)
    return "cuda" if torch.cuda.is_available() else "cpu"


def collective_backend(kind: str | None = None) -> str:
    """The torch.distributed backend for `kind` (default: this process's device type); gloo when unknown."""
    return BACKENDS.get(kind or device_type(), "gloo")
