"""How many layers of a gpt-oss model an e2e run writes and loads (``--layers``): all of them, a count given,
or ``fit``, the most whose synthetic checkpoint fits the room at ``--dir`` / ``--spill-dir`` and whose packed
weights fit the GPU (CPU only, tested). A run of fewer layers keeps the real dimensions of every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .gpt_oss_checkpoint import SHARD_BYTES, checkpoint_bytes, full_layers, model_config, place_shards, plan_shards, tensor_specs

GPU_HEADROOM = 4 * 10**9  # bytes beside the weights: KV cache, activations, CUDA graphs, the load's packing temporaries
FIT = "fit"


@dataclass(frozen=True)
class LayerPlan:
    """The layers a run measures (``layers`` of the model's ``full``) and why that many."""

    layers: int
    full: int
    why: str

    @property
    def reduced(self) -> bool:
        return self.layers < self.full


def label(model: str, layers: int, full: int) -> str:
    """The model's name in every table and log line: a reduced run says so."""
    return model if layers >= full else f"{model} ({layers} of {full} layers)"


def _room_text(places: Sequence[str], rooms: Sequence[int]) -> str:
    return ", ".join(f"{place}: {room / 1e9:.1f} GB free" for place, room in zip(places, rooms))


def why_not(model: str, layers: int, places: Sequence[str], rooms: Sequence[int], gpu_bytes: int | None,
            shard_bytes: int = SHARD_BYTES) -> str | None:
    """Why ``layers`` layers of ``model`` cannot run here (None: they can): the checkpoint's shards placed in
    order into ``places`` (free bytes ``rooms``), and the packed weights + headroom on the GPU."""
    config = model_config(model, num_hidden_layers=layers)
    sizes = [sum(spec.nbytes for spec in specs) for specs in plan_shards(tensor_specs(config), shard_bytes).values()]
    what = f"{layers} of {full_layers(model)} layers"
    if place_shards(sizes, rooms) is None:
        return (f"its checkpoint ({what}) needs {sum(sizes) / 1e9:.1f} GB (shards up to {max(sizes) / 1e9:.1f} GB) "
                f"and the room is {_room_text(places, rooms)}")
    if gpu_bytes is not None and checkpoint_bytes(config) + GPU_HEADROOM > gpu_bytes:
        return (f"its weights ({what}) need {checkpoint_bytes(config) / 1e9:.1f} GB + {GPU_HEADROOM / 1e9:.0f} GB "
                f"on the GPU, which has {gpu_bytes / 1e9:.1f} GB")
    return None


def largest_fit(model: str, places: Sequence[str], rooms: Sequence[int], gpu_bytes: int | None,
                shard_bytes: int = SHARD_BYTES) -> int | None:
    """The most layers of ``model`` that fit (None: not even one)."""
    for layers in range(full_layers(model), 0, -1):
        if why_not(model, layers, places, rooms, gpu_bytes, shard_bytes) is None:
            return layers
    return None


def plan_layers(model: str, requested: int | str | None, places: Sequence[str], rooms: Sequence[int],
                gpu_bytes: int | None, shard_bytes: int = SHARD_BYTES) -> LayerPlan:
    """The layer count of this run: ``requested`` (None: all; ``"fit"``: the most that fit); ValueError for a
    count the model does not have, OSError naming the places, their room and the bytes needed when it does not
    fit."""
    full = full_layers(model)
    if requested == FIT:
        best = largest_fit(model, places, rooms, gpu_bytes, shard_bytes)
        if best is None:
            raise OSError(f"{model}: not even one layer fits: {why_not(model, 1, places, rooms, gpu_bytes, shard_bytes)}")
        if best == full:
            return LayerPlan(full, full, f"all {full} layers fit")
        reason = why_not(model, best + 1, places, rooms, gpu_bytes, shard_bytes)
        return LayerPlan(best, full, f"--layers fit: {best + 1} layers do not fit ({reason})")
    layers = full if requested is None else int(requested)
    if not 1 <= layers <= full:
        raise ValueError(f"--layers {layers}: {model} has {full} layers (give 1..{full} or {FIT})")
    reason = why_not(model, layers, places, rooms, gpu_bytes, shard_bytes)
    if reason is not None:
        best = largest_fit(model, places, rooms, gpu_bytes, shard_bytes)
        hint = f"--layers {FIT} would run {best} of {full}" if best else "not even one layer fits"
        raise OSError(f"{model}: {reason}; {hint}, or choose other places with --dir / --spill-dir")
    return LayerPlan(layers, full, f"all {full} layers" if layers == full else f"--layers {layers}")
