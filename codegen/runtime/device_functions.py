"""CUfunction handles of the runtime's small kernel modules (the quantizer, the routing kernel, the MoE glue),
loaded into each device's context on first use."""

from __future__ import annotations

import threading
from typing import Callable

import torch


class DeviceFunctions:
    """One cubin's entry points, per device: each (device, entry) is loaded once, on the first call that needs it
    (thread-safe), and its module stays alive with the handle."""

    def __init__(self, name: str, cubin: Callable[[], bytes], shared_memory: int = 0) -> None:
        self.name, self._cubin, self._shared_memory = name, cubin, shared_memory
        self._functions: dict[tuple[int, str], int] = {}
        self._modules: list[object] = []
        self._lock = threading.Lock()

    def get(self, device: torch.device, entry: str) -> int:
        """The CUfunction handle of ``entry`` on ``device``."""
        key = (device.index, entry)
        handle = self._functions.get(key)
        if handle is None:
            with self._lock:
                if key not in self._functions:
                    from .launch import (
                        load_function,  # lazy: CPU machines never import cuda-python
                    )

                    module, function = load_function(self._cubin(), entry, device, self._shared_memory, self.name)
                    self._modules.append(module)
                    self._functions[key] = int(function)
                handle = self._functions[key]
        return handle
