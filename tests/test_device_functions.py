"""codegen.runtime.device_functions: each (device, entry) of a runtime cubin is loaded once, on first use."""

from __future__ import annotations

import threading

import torch

from codegen.runtime import launch
from codegen.runtime.device_functions import DeviceFunctions


def test_each_device_and_entry_loads_once(monkeypatch):
    loads: list[tuple[bytes, str, int, int, str]] = []
    lock = threading.Lock()

    def fake_load(cubin, entry, device, shared_memory, name):
        with lock:
            loads.append((cubin, entry, device.index, shared_memory, name))
            return object(), 1000 + len(loads)

    monkeypatch.setattr(launch, "load_function", fake_load)
    cubins = []
    functions = DeviceFunctions("glue", lambda: cubins.append(1) or b"cubin", shared_memory=48)
    zero, one = torch.device("cuda", 0), torch.device("cuda", 1)

    threads = [threading.Thread(target=functions.get, args=(zero, "gather")) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = functions.get(zero, "gather")
    assert loads == [(b"cubin", "gather", 0, 48, "glue")] and first == 1001  # eight racing callers, one load
    assert functions.get(zero, "sum") == 1002 and functions.get(one, "gather") == 1003  # each key its own handle
    assert functions.get(zero, "gather") == first and len(loads) == 3 and len(cubins) == 3
