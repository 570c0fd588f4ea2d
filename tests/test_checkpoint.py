"""Checkpoint import/export: gpt-oss safetensors (file and shards) and ggml block_mxfp4, bit-exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mxfp4
from mxfp4.format.shards import CheckpointError
from mxfp4.format.tensor import MXFP4Tensor

E, HIDDEN, INTERMEDIATE = 4, 64, 96  # gate_up: [E, 2 * I, H], down: [E, H, I]


def expert_tensors(layer: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.mlp.experts."
    tensors = {}
    for name, (n, k) in {"gate_up_proj": (2 * INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}.items():
        tensors[f"{prefix}{name}_blocks"] = torch.randint(0, 256, (E, n, k // 32, 16), dtype=torch.uint8)
        tensors[f"{prefix}{name}_scales"] = torch.randint(100, 140, (E, n, k // 32), dtype=torch.uint8)
        tensors[f"{prefix}{name}_bias"] = torch.randn(E, n).bfloat16()
    return tensors


def check_layer(loaded: dict[str, MXFP4Tensor | torch.Tensor], tensors: dict[str, torch.Tensor], layer: int) -> None:
    prefix = f"model.layers.{layer}.mlp.experts."
    assert set(loaded) == {"gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"}
    assert loaded["gate_up_proj"].shape == (E, 2 * INTERMEDIATE, HIDDEN)
    assert loaded["down_proj"].shape == (E, HIDDEN, INTERMEDIATE)
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(loaded[name].blocks, tensors[f"{prefix}{name}_blocks"])
        assert torch.equal(loaded[name].scales, tensors[f"{prefix}{name}_scales"])
        bias = loaded[f"{name}_bias"]
        assert bias.dtype == torch.bfloat16 and torch.equal(bias, tensors[f"{prefix}{name}_bias"])


def test_load_from_single_file(tmp_path: Path, seed: int) -> None:
    tensors = {**expert_tensors(0), **expert_tensors(1)}
    file = tmp_path / "model.safetensors"
    save_file(tensors, str(file))
    check_layer(mxfp4.load_gpt_oss_experts(file, 1), tensors, 1)
    check_layer(mxfp4.load_gpt_oss_experts(str(file), 0), tensors, 0)


def test_load_from_sharded_directory(tmp_path: Path, seed: int) -> None:
    layer0, layer1 = expert_tensors(0), expert_tensors(1)
    # Split layer 1 across two shards to exercise the per-name lookup.
    names1 = sorted(layer1)
    shards = {
        "model-00001-of-00002.safetensors": {**layer0, **{n: layer1[n] for n in names1[:3]}},
        "model-00002-of-00002.safetensors": {n: layer1[n] for n in names1[3:]},
    }
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, str(tmp_path / file))
        weight_map.update({name: file for name in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    check_layer(mxfp4.load_gpt_oss_experts(tmp_path, 1), layer1, 1)
    (tmp_path / "model.safetensors.index.json").unlink()  # headers alone must do too
    check_layer(mxfp4.load_gpt_oss_experts(tmp_path, 0), layer0, 0)


def test_load_missing_layer_or_path(tmp_path: Path) -> None:
    save_file(expert_tensors(0), str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"model\.layers\.7\.mlp\.experts\.gate_up_proj_blocks"):
        mxfp4.load_gpt_oss_experts(tmp_path, 7)
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        mxfp4.load_gpt_oss_experts(tmp_path / "missing", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        mxfp4.load_gpt_oss_experts(tmp_path / "empty", 0)


def test_loaded_experts_pack_roundtrip(tmp_path: Path, seed: int) -> None:
    tensors = expert_tensors(0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    down = mxfp4.load_gpt_oss_experts(tmp_path, 0)["down_proj"]
    packed = mxfp4.pack(down)
    assert torch.equal(mxfp4.unpack(packed).blocks, down.blocks)


def test_load_without_biases(tmp_path: Path, seed: int) -> None:
    tensors = {name: t for name, t in expert_tensors(0).items() if not name.endswith("_bias")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert set(mxfp4.load_gpt_oss_experts(tmp_path, 0)) == {"gate_up_proj", "down_proj"}
    layer = mxfp4.load_gpt_oss_moe_layer(tmp_path, 0)
    assert layer.gate_up_bias is None and layer.down_bias is None


def test_load_moe_layer_packs_bit_exact(tmp_path: Path, seed: int) -> None:
    tensors = {**expert_tensors(0), **expert_tensors(1)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    layer = mxfp4.load_gpt_oss_moe_layer(tmp_path / "model.safetensors", 1)
    prefix = "model.layers.1.mlp.experts."
    assert layer.gate_up.shape == (E, 2 * INTERMEDIATE, HIDDEN) and layer.down.shape == (E, HIDDEN, INTERMEDIATE)
    assert isinstance(layer.gate_up, mxfp4.PackedGateUp)  # paired for the fused kernels
    for name, back in (("gate_up_proj", mxfp4.unpack_gate_up(layer.gate_up)), ("down_proj", mxfp4.unpack(layer.down))):
        assert torch.equal(back.blocks, tensors[f"{prefix}{name}_blocks"])
        assert torch.equal(back.scales, tensors[f"{prefix}{name}_scales"])
    assert torch.equal(layer.gate_up_bias, tensors[f"{prefix}gate_up_proj_bias"])
    assert torch.equal(layer.down_bias, tensors[f"{prefix}down_proj_bias"])
    assert layer.to("cpu").gate_up.n == 2 * INTERMEDIATE


def test_load_moe_layer_rejects_mismatched_shapes(tmp_path: Path, seed: int) -> None:
    tensors = expert_tensors(0)
    prefix = "model.layers.0.mlp.experts."
    tensors[f"{prefix}down_proj_blocks"] = tensors[f"{prefix}down_proj_blocks"][:, :, :1].contiguous()
    tensors[f"{prefix}down_proj_scales"] = tensors[f"{prefix}down_proj_scales"][:, :, :1].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"expected \[E, 2I, H\] and \[E, H, I\]"):
        mxfp4.load_gpt_oss_moe_layer(tmp_path, 0)


def test_checkpoint_orientation_matches_transformers(tmp_path: Path, seed: int) -> None:
    """transformers dequantizes the same bytes to its module weight [E, K, N]: ours is its transpose."""
    mxfp4_integration = pytest.importorskip("transformers.integrations.mxfp4")
    tensors = expert_tensors(0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = mxfp4.load_gpt_oss_experts(tmp_path, 0)
    prefix = "model.layers.0.mlp.experts."
    for name in ("gate_up_proj", "down_proj"):
        theirs = mxfp4_integration.convert_moe_packed_tensors(
            tensors[f"{prefix}{name}_blocks"], tensors[f"{prefix}{name}_scales"], dtype=torch.float32
        )
        ours = mxfp4.dequantize(loaded[name], torch.float32)
        assert theirs.shape == (ours.shape[0], ours.shape[2], ours.shape[1])
        assert torch.equal(theirs, ours.transpose(1, 2))


def test_from_gpt_oss_is_bit_exact_and_checks(seed: int) -> None:
    blocks = torch.randint(0, 256, (2, 8, 3, 16), dtype=torch.uint8)
    scales = torch.randint(0, 256, (2, 8, 3), dtype=torch.uint8)
    t = mxfp4.from_gpt_oss(blocks, scales)
    assert t.shape == (2, 8, 96)
    assert torch.equal(t.blocks, blocks) and torch.equal(t.scales, scales)
    # gpt-oss byte order: element 2j in the low nibble of byte j.
    assert int(t.codes()[0, 0, 0]) == int(blocks[0, 0, 0, 0]) & 0xF
    assert int(t.codes()[0, 0, 1]) == int(blocks[0, 0, 0, 0]) >> 4
    with pytest.raises(TypeError, match="blocks must be uint8"):
        mxfp4.from_gpt_oss(blocks.float(), scales)
    with pytest.raises(ValueError, match="scales must have shape"):
        mxfp4.from_gpt_oss(blocks, scales[:, :4])


def reference_ggml_block(codes: list[int], scale: int) -> bytes:
    """block_mxfp4 written from its definition: e, then qs[j] = x[j] | x[j + 16] << 4."""
    return bytes([scale] + [codes[j] | (codes[j + 16] << 4) for j in range(16)])


def test_ggml_matches_block_definition(seed: int) -> None:
    t = mxfp4.quantize(torch.randn(3, 64))
    codes, scales = t.codes().tolist(), t.scales.tolist()
    expected = b"".join(
        reference_ggml_block(codes[row][32 * b : 32 * b + 32], scales[row][b]) for row in range(3) for b in range(2)
    )
    raw = mxfp4.to_ggml(t)
    assert raw.dtype == torch.uint8 and raw.numel() == 3 * 2 * 17
    assert bytes(raw.tolist()) == expected
    back = mxfp4.from_ggml(expected, (3, 64))
    assert torch.equal(back.blocks, t.blocks) and torch.equal(back.scales, t.scales)


def test_ggml_roundtrip_both_ways(seed: int) -> None:
    raw = torch.randint(0, 256, (5 * 7 * 3 * 17,), dtype=torch.uint8)
    t = mxfp4.from_ggml(raw, (5, 7, 96))
    assert t.shape == (5, 7, 96)
    assert torch.equal(mxfp4.to_ggml(t), raw)
    assert torch.equal(mxfp4.from_ggml(raw.numpy(), (5, 7, 96)).blocks, t.blocks)
    assert torch.equal(mxfp4.to_ggml(mxfp4.from_ggml(bytes(raw.tolist()), [5, 7, 96])), raw)
    w = MXFP4Tensor(torch.randint(0, 256, (4, 2, 16), dtype=torch.uint8), torch.randint(0, 256, (4, 2), dtype=torch.uint8))
    again = mxfp4.from_ggml(mxfp4.to_ggml(w), w.shape)
    assert torch.equal(again.blocks, w.blocks) and torch.equal(again.scales, w.scales)
    assert torch.equal(mxfp4.dequantize(again, torch.float64).nan_to_num(), mxfp4.dequantize(w, torch.float64).nan_to_num())


def test_ggml_bad_input() -> None:
    with pytest.raises(ValueError, match=r"data has 33 bytes; shape \(2, 32\) needs 2 blocks x 17 = 34"):
        mxfp4.from_ggml(torch.zeros(33, dtype=torch.uint8), (2, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.from_ggml(torch.zeros(34, dtype=torch.uint8), (2, 31))
    with pytest.raises(TypeError, match="data must be uint8"):
        mxfp4.from_ggml(np.zeros(17, dtype=np.int16), (32,))
    with pytest.raises(TypeError, match="MXFP4Tensor"):
        mxfp4.to_ggml(torch.zeros(17, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"from_ggml: shape must be a tuple of ints such as \(E, N, K\), got int 32"):
        mxfp4.from_ggml(bytes(17), 32)
    with pytest.raises(TypeError, match="from_ggml: shape must be a tuple of ints"):
        mxfp4.from_ggml(bytes(17), (1.0, 32))
    with pytest.raises(ValueError, match="from_ggml: shape must not have negative sizes"):
        mxfp4.from_ggml(bytes(17), (-1, 32))


@pytest.mark.parametrize("data", [b"", bytearray(), torch.zeros(0, dtype=torch.uint8), np.zeros(0, dtype=np.uint8)])
def test_ggml_empty_tensor(data: object) -> None:
    """No rows is a valid tensor: an empty MXFP4Tensor that round-trips to no bytes."""
    t = mxfp4.from_ggml(data, (0, 32))
    assert t.shape == (0, 32) and t.blocks.shape == (0, 1, 16) and t.scales.shape == (0, 1)
    assert mxfp4.to_ggml(t).numel() == 0
    with pytest.raises(ValueError, match=r"data has 0 bytes; shape \(1, 32\) needs 1 blocks x 17 = 17"):
        mxfp4.from_ggml(data, (1, 32))


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints: every error names the file (and the tensor).


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> list[Path]:
    """Two shards (first half of the names, second half) and their index."""
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, chosen in files.items():
        save_file({name: tensors[name] for name in chosen}, str(directory / file))
    weight_map = {name: file for file, chosen in files.items() for name in chosen}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return [directory / file for file in files]


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
@pytest.mark.parametrize("loader", ["experts", "moe_layer"])
def test_corrupt_shard_names_the_file(tmp_path: Path, damage: str, loader: str) -> None:
    first, second = write_sharded(tmp_path, expert_tensors(0))
    data = second.read_bytes()
    second.write_bytes({"truncated": data[: len(data) // 2], "garbage header": b"\xff" * 64, "empty": b""}[damage])
    load = mxfp4.load_gpt_oss_experts if loader == "experts" else mxfp4.load_gpt_oss_moe_layer
    with pytest.raises(CheckpointError, match=re.escape(f"{second} is not a readable safetensors file")) as caught:
        load(tmp_path, 0)
    assert "corrupt or truncated" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_missing_shard_and_bad_index_name_the_file(tmp_path: Path) -> None:
    first, second = write_sharded(tmp_path, expert_tensors(0))
    second.unlink()
    with pytest.raises(FileNotFoundError, match=rf"checkpoint file {second} is missing; model.safetensors.index.json lists it"):
        mxfp4.load_gpt_oss_experts(tmp_path, 0)
    write_sharded(tmp_path, expert_tensors(0))
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    moved = sorted(weight_map)[0]
    weight_map[moved] = second.name  # the index points at the wrong shard
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"puts {moved} in {second.name}, but it is in {first.name}"):
        mxfp4.load_gpt_oss_moe_layer(tmp_path, 0)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a safetensors index"):
        mxfp4.load_gpt_oss_moe_layer(tmp_path, 0)


def test_wrong_dtype_or_shape_names_file_and_tensor(tmp_path: Path) -> None:
    prefix = "model.layers.0.mlp.experts."
    file = tmp_path / "model.safetensors"
    tensors = expert_tensors(0)
    tensors[f"{prefix}down_proj_scales"] = tensors[f"{prefix}down_proj_scales"].to(torch.int16)
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=rf"{file}: {prefix}down_proj_scales has dtype I16; expected U8"):
        mxfp4.load_gpt_oss_moe_layer(file, 0)
    tensors = expert_tensors(0)
    tensors[f"{prefix}gate_up_proj_bias"] = tensors[f"{prefix}gate_up_proj_bias"][:, :-1].contiguous()
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=rf"{prefix}gate_up_proj_bias has shape \[4, 191\]; expected \[E, N\] = \[4, 192\]"):
        mxfp4.load_gpt_oss_moe_layer(file, 0)


def test_moe_layer_expert_range(tmp_path: Path, seed: int) -> None:
    tensors = expert_tensors(0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    prefix = "model.layers.0.mlp.experts."
    part = mxfp4.load_gpt_oss_moe_layer(tmp_path, 0, experts=(1, 3))
    assert part.gate_up.shape == (2, 2 * INTERMEDIATE, HIDDEN) and part.down.shape == (2, HIDDEN, INTERMEDIATE)
    for name, back in (("gate_up_proj", mxfp4.unpack_gate_up(part.gate_up)), ("down_proj", mxfp4.unpack(part.down))):
        assert torch.equal(back.blocks, tensors[f"{prefix}{name}_blocks"][1:3])
        assert torch.equal(back.scales, tensors[f"{prefix}{name}_scales"][1:3])
        assert torch.equal(getattr(part, f"{name.removesuffix('_proj')}_bias"), tensors[f"{prefix}{name}_bias"][1:3])
    for bad, error in (((2, 2), ValueError), ((0, 5), ValueError), ((-1, 2), ValueError), ((0.0, 2), TypeError), (3, TypeError)):
        with pytest.raises(error, match="experts"):
            mxfp4.load_gpt_oss_moe_layer(tmp_path, 0, experts=bad)


def test_packing_in_chunks_matches_one_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Loading packs a few experts at a time; the bytes are those of packing the whole weight at once."""
    import mxfp4.format.checkpoint as checkpoint

    tensors = expert_tensors(0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(checkpoint, "_PACK_CHUNK_VALUES", 2 * INTERMEDIATE * HIDDEN)  # one gate_up expert per step
    layer = mxfp4.load_gpt_oss_moe_layer(tmp_path, 0)
    whole = mxfp4.load_gpt_oss_experts(tmp_path, 0)
    assert torch.equal(layer.gate_up.data, mxfp4.pack_gate_up(whole["gate_up_proj"]).data)
    assert torch.equal(layer.down.data, mxfp4.pack(whole["down_proj"]).data)


@pytest.mark.parametrize("layer, error", [(0.7, TypeError), (1.0, TypeError), ("0", TypeError), (True, TypeError), (-1, ValueError)])
def test_layer_must_be_a_non_negative_int(tmp_path: Path, layer: object, error: type) -> None:
    save_file(expert_tensors(0), str(tmp_path / "model.safetensors"))
    for load in (mxfp4.load_gpt_oss_experts, mxfp4.load_gpt_oss_moe_layer):
        with pytest.raises(error, match=r"layer must be"):
            load(tmp_path, layer)
    assert mxfp4.load_gpt_oss_moe_layer(tmp_path, np.int64(0)).gate_up.num_experts == E  # numpy ints are ints
