"""The fused MoE layer's five kernels emulated on the CPU, from their packed parameter blocks.

A launch recorded by benchmarks.fake_sm90 carries the bytes a kernel would receive; this module unpacks
them with the same ParamBlocks the launcher packed them with and does what the kernel does, reading and
writing CPU memory at the addresses they hold. So a CPU test sees whether the host path wires each
kernel to the right buffers (and, for graph replays, whether each node had the call's addresses), not
only whether it launched something.
"""

from __future__ import annotations

import ctypes
import struct

import torch

from benchmarks.fake_sm90 import Launch
from codegen.build.params import PARAM_FIELDS, PARAMS_STRUCT
from codegen.runtime.moe_glue import GATHER_PARAMS, TOPK_SUM_PARAMS
from codegen.runtime.routing import ROUTING_PARAMS
from mxfp4.format.codec import dequantize
from mxfp4.format.layout import PackedMXFP4, unpack


def memory(address: int, dtype: torch.dtype, count: int) -> torch.Tensor:
    """``count`` values of ``dtype`` at host ``address``, as a tensor that writes through."""
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * max(nbytes, 1)).from_address(address), dtype=dtype, count=count)


def _fields(block, params: bytes) -> dict:
    names = [f.name for f in block.fields]
    return dict(zip(names, block.struct.unpack_from(params)))


class Emulator:
    """``weights``: the packed weights the layer is called with (looked up by address)."""

    def __init__(self, *weights: PackedMXFP4) -> None:
        self.decoded = {w.data.data_ptr(): dequantize(unpack(w), torch.float32) for w in weights}

    def __call__(self, launch: Launch) -> None:
        kind = {"moe_routing": self.routing, "moe_gather": self.gather, "moe_topk_sum": self.topk_sum}
        kind.get(launch.name, self.grouped_mm)(launch)

    def routing(self, launch: Launch) -> None:
        p = _fields(ROUTING_PARAMS, launch.params)
        routed, e = p["routed"], p["num_experts"]
        ids = memory(p["topk_ids"], torch.int64 if p["ids_int64"] else torch.int32, routed).long()
        weights = memory(p["topk_weights"], torch.bfloat16 if p["weights_bf16"] else torch.float32, routed).float()
        valid = (ids >= 0) & (ids < e)
        order = torch.sort(torch.where(valid, ids, e), stable=True).indices[: int(valid.sum())]
        counts = torch.bincount(ids[valid], minlength=e)
        offsets = memory(p["offsets"], torch.int32, e + 1)
        offsets.copy_(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
        memory(p["row_dest"], torch.int32, len(order)).copy_(order)
        memory(p["row_token"], torch.int32, len(order)).copy_(order // p["top_k"])
        memory(p["row_scale"], torch.float32, len(order)).copy_(weights[order])

    def gather(self, launch: Launch) -> None:
        p = _fields(GATHER_PARAMS, launch.params)
        if p["zero_words"]:
            memory(p["zero"], torch.int32, p["zero_words"]).zero_()
        placed = int(memory(p["offsets"], torch.int32, p["num_experts"] + 1)[-1])
        hidden = p["row_bytes"] // 2
        tokens = memory(p["row_token"], torch.int32, placed).long()
        x = memory(p["x"], torch.bfloat16, (int(tokens.max()) + 1 if placed else 0) * hidden).view(-1, hidden)
        memory(p["rows"], torch.bfloat16, placed * hidden).view(placed, hidden).copy_(x[tokens])

    def grouped_mm(self, launch: Launch) -> None:
        """The SwiGLU or scale-scatter epilogue, by the kernel's name (its config's)."""
        names = [f.name for f in PARAM_FIELDS]
        p = dict(zip(names, PARAMS_STRUCT.unpack_from(launch.params)))
        x_address, rows, k, _ = struct.unpack_from("<4Q", p["x_map"])
        assert rows == p["total_rows"], "the tensor map and the parameter block disagree on the rows"
        w = self.decoded[p["w"]]  # [E, N, K] in stored (paired) row order
        e = p["num_experts"]
        offsets = memory(p["rows"], torch.int32, e + 1).tolist()
        x = memory(x_address, torch.bfloat16, rows * k).view(rows, k).float()
        for expert in range(e):
            lo, hi = offsets[expert], offsets[expert + 1]
            if hi > lo:
                acc = x[lo:hi] @ w[expert].T
                if launch.name.endswith("_swiglu"):
                    self._swiglu(p, expert, lo, acc)
                else:
                    self._scatter(p, expert, lo, acc)

    @staticmethod
    def _bias(p: dict, expert: int, count: int) -> torch.Tensor:
        if not p["bias"]:
            return torch.zeros(count)
        return memory(p["bias"] + 2 * expert * p["bias_stride"], torch.bfloat16, count).float()

    def _swiglu(self, p: dict, expert: int, lo: int, acc: torch.Tensor) -> None:
        n = acc.shape[1]
        blocks = acc.view(-1, n // 16, 2, 8)  # paired: in each block of 16 rows, 8 gate rows then their 8 up rows
        gate, up = blocks[:, :, 0].reshape(-1, n // 2), blocks[:, :, 1].reshape(-1, n // 2)
        bias = self._bias(p, expert, n)  # interleaved order: gate 2c, up 2c + 1
        gate = (gate + bias[0::2]).clamp(max=p["limit"])
        up = (up + bias[1::2]).clamp(-p["limit"], p["limit"])
        value = (up + 1) * gate * torch.sigmoid(p["alpha"] * gate)
        memory(p["out"] + 2 * lo * p["out_cols"], torch.bfloat16, value.numel()).copy_(value.reshape(-1))

    def _scatter(self, p: dict, expert: int, lo: int, acc: torch.Tensor) -> None:
        count, n = acc.shape
        scale = memory(p["row_scale"] + 4 * lo, torch.float32, count)
        dest = memory(p["row_dest"] + 4 * lo, torch.int32, count).tolist()
        value = (acc + self._bias(p, expert, n)) * scale[:, None]
        for row, slot in enumerate(dest):
            memory(p["out"] + 2 * slot * p["out_cols"], torch.bfloat16, n).copy_(value[row])

    def topk_sum(self, launch: Launch) -> None:
        p = _fields(TOPK_SUM_PARAMS, launch.params)
        t, k, h = p["tokens"], p["top_k"], p["cols"]
        slots = memory(p["slots"], torch.bfloat16, t * k * h).view(t, k, h).float()
        acc = torch.zeros(t, h)
        for j in range(k):  # slot order, fp32: the kernel's
            acc = acc + slots[:, j]
        memory(p["out"], torch.bfloat16, t * h).copy_(acc.reshape(-1))
