"""load_gpt_oss on the CPU: a small checkpoint in gpt-oss's on-disk format (sharded with an index, and one
file) against transformers' own loading of the same files (Mxfp4Config(dequantize=True)); no dense expert
weight; the experts range; every damaged checkpoint names the file and the tensor. Plus convert_gpt_oss
freeing the dense weights, and (GPU) the peak memory while loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mxfp4

transformers = pytest.importorskip("transformers")
from test_integrations_transformers import (  # noqa: E402
    ACCURACY,
    experts_modules,
    logits,
    pin_routing,
    relative_error,
    tiny_model,
)
from transformers import GptOssForCausalLM, Mxfp4Config  # noqa: E402

from benchmarks.gpt_oss_checkpoint import (  # noqa: E402
    checkpoint_bytes,
    ensure_checkpoint,
    model_config,
    write_checkpoint,
)
from mxfp4.format.shards import CheckpointError  # noqa: E402
from mxfp4.integrations.transformers import (  # noqa: E402
    IMPLEMENTATION,
    convert_gpt_oss,
    load_gpt_oss,
)

LAYERS, EXPERTS = 3, 4


def tiny_config(**overrides: object):
    return model_config("tiny", num_hidden_layers=LAYERS, num_local_experts=EXPERTS, **overrides)


@pytest.fixture
def checkpoint(tmp_path: Path, seed: int) -> Path:
    """Two shards and their index (the layers' tensors split across the files)."""
    config = tiny_config()
    write_checkpoint(tmp_path, config, seed=seed, shard_bytes=checkpoint_bytes(config) * 6 // 10, std=0.1, progress=False)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 2 and (tmp_path / "model.safetensors.index.json").is_file()
    return tmp_path


def on_disk(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def transformers_reference(path: Path, dtype: torch.dtype = torch.bfloat16) -> GptOssForCausalLM:
    return GptOssForCausalLM.from_pretrained(str(path), quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=dtype).eval()


def dense_expert_tensors(model: torch.nn.Module) -> list[str]:
    return [name for name, t in (*model.named_parameters(), *model.named_buffers())
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and t.is_floating_point() and t.numel() > 0]


def compare_with_transformers(path: Path) -> None:
    """Logits against transformers' own loading of the same files.

    In float32 (both models; our experts still compute in bf16) within ACCURACY. In bf16 two models
    differ by their own roundings (transformers' bf16 model is about 1.2e-2 from its float32 one), so
    there ours must be as close to the float32 reference as transformers' bf16 model is.
    """
    ids = torch.randint(0, 256, (2, 9))
    ours32, ours = (load_gpt_oss(path, device="cpu", dtype=dtype, progress=False) for dtype in (torch.float32, torch.bfloat16))
    reference, theirs = transformers_reference(path, torch.float32), transformers_reference(path)
    pin_routing(reference, ours32, ours, theirs)  # a near tie in a router must not decide the comparison
    ref = logits(reference, ids)
    assert relative_error(logits(ours32, ids), ref) <= ACCURACY
    assert relative_error(logits(ours, ids), ref) <= max(ACCURACY, 1.25 * relative_error(logits(theirs, ids), ref))
    assert ours.config._experts_implementation == IMPLEMENTATION and not dense_expert_tensors(ours)
    # The experts matter in these logits: without them the model is far off.
    for module in experts_modules(ours32):
        module.register_forward_hook(lambda module, args, output: output * 0)
    assert relative_error(logits(ours32, ids), ref) > 10 * ACCURACY


def test_sharded_checkpoint_matches_transformers(checkpoint: Path) -> None:
    compare_with_transformers(checkpoint)


def test_single_file_checkpoint_matches_transformers(tmp_path: Path, seed: int) -> None:
    write_checkpoint(tmp_path, tiny_config(), seed=seed, std=0.1, progress=False)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    compare_with_transformers(tmp_path)
    assert load_gpt_oss(tmp_path / "model.safetensors", device="cpu", progress=False).config.num_hidden_layers == LAYERS


def test_loaded_model_holds_the_checkpoint_bytes(checkpoint: Path) -> None:
    model = load_gpt_oss(checkpoint, device="cpu", progress=False)
    tensors = on_disk(checkpoint)
    for layer, module in enumerate(experts_modules(model)):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = mxfp4.integrations.transformers._packed(module, "gate_up_proj")
        assert isinstance(gate_up, mxfp4.PackedGateUp)  # paired: the fused kernels
        for name, back in (("gate_up_proj", mxfp4.unpack_gate_up(gate_up)),
                           ("down_proj", mxfp4.unpack(mxfp4.integrations.transformers._packed(module, "down_proj")))):
            assert torch.equal(back.blocks, tensors[f"{prefix}{name}_blocks"])
            assert torch.equal(back.scales, tensors[f"{prefix}{name}_scales"])
            assert torch.equal(getattr(module, f"{name}_bias"), tensors[f"{prefix}{name}_bias"])
            assert getattr(module, name).numel() == 0 and getattr(module, name).dtype == torch.bfloat16
    assert torch.equal(model.model.layers[1].self_attn.sinks, tensors["model.layers.1.self_attn.sinks"])
    assert model.lm_head.weight.dtype == torch.bfloat16 and not model.lm_head.weight.is_meta
    assert all(not t.is_meta for t in (*model.parameters(), *model.buffers()))


def test_dtype_and_the_model_moves(checkpoint: Path) -> None:
    model = load_gpt_oss(checkpoint, device="cpu", dtype=torch.float32, progress=False)
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.config.dtype == torch.float32
    module = experts_modules(model)[0]
    assert module.gate_up_proj_mxfp4.dtype == torch.uint8 and module.gate_up_proj_bias.dtype == torch.bfloat16  # as stored
    model.to(torch.bfloat16)  # .to() keeps working: the packed bytes stay uint8, the empty weights follow
    assert module.gate_up_proj_mxfp4.dtype == torch.uint8 and module.gate_up_proj.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.shape == (1, 7)


def test_expert_range(checkpoint: Path) -> None:
    model = load_gpt_oss(checkpoint, device="cpu", experts=(1, 3), progress=False)
    full = load_gpt_oss(checkpoint, device="cpu", progress=False)
    tensors = on_disk(checkpoint)
    for layer, module in enumerate(experts_modules(model)):
        prefix = f"model.layers.{layer}.mlp.experts."
        assert module.num_experts == 2 and model.model.layers[layer].mlp.router.weight.shape[0] == EXPERTS
        back = mxfp4.unpack(mxfp4.integrations.transformers._packed(module, "down_proj"))
        assert torch.equal(back.blocks, tensors[f"{prefix}down_proj_blocks"][1:3])
        assert torch.equal(module.gate_up_proj_bias, tensors[f"{prefix}gate_up_proj_bias"][1:3])
        # The module computes experts 1 and 2 (local ids 0 and 1) as the full model does.
        x = torch.randn(5, model.config.hidden_size).bfloat16()
        ids, weights = torch.tensor([[0, 1]] * 5), torch.full((5, 2), 0.5)
        with torch.no_grad():
            assert torch.equal(module(x, ids, weights), experts_modules(full)[layer](x, ids + 1, weights))
    for bad, error in (((3, 3), ValueError), ((0, EXPERTS + 1), ValueError), ((1.0, 2), TypeError), ([1], TypeError)):
        with pytest.raises(error, match="load_gpt_oss: experts"):
            load_gpt_oss(checkpoint, device="cpu", experts=bad, progress=False)


def test_tied_embeddings(tmp_path: Path, seed: int) -> None:
    write_checkpoint(tmp_path, tiny_config(tie_word_embeddings=True), seed=seed, std=0.1, progress=False)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["lm_head.weight"]  # a tied checkpoint stores the embedding once
    save_file(tensors, str(file), metadata={"format": "pt"})
    model = load_gpt_oss(tmp_path, device="cpu", progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_bad_options(checkpoint: Path) -> None:
    with pytest.raises(TypeError, match="load_gpt_oss: dtype must be a floating-point torch.dtype"):
        load_gpt_oss(checkpoint, device="cpu", dtype="bfloat16")
    with pytest.raises(TypeError, match="load_gpt_oss: device must be"):
        load_gpt_oss(checkpoint, device=3.5)
    with pytest.raises(ValueError, match="load_gpt_oss: device must hold memory"):
        load_gpt_oss(checkpoint, device="meta")


def test_progress_bar(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    load_gpt_oss(checkpoint, device="cpu")
    assert f"{LAYERS + 1}/{LAYERS + 1}" in capsys.readouterr().err
    load_gpt_oss(checkpoint, device="cpu", progress=False)
    assert "load_gpt_oss" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints: errors name the file and the tensor.


def shard_of(directory: Path, name: str) -> Path:
    return directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]


def rewrite(file: Path, change) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_files(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere' / 'config.json'} does not exist")):
        load_gpt_oss(tmp_path / "nowhere", device="cpu")
    shard = shard_of(checkpoint, "model.layers.1.mlp.experts.down_proj_blocks")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint file {shard} is missing")):
        load_gpt_oss(checkpoint, device="cpu")


def test_bad_config(checkpoint: Path) -> None:
    config = checkpoint / "config.json"
    config.write_text(config.read_text().replace('"gpt_oss"', '"llama"'))
    with pytest.raises(ValueError, match=re.escape(f"{config} describes model_type 'llama', not 'gpt_oss'")):
        load_gpt_oss(checkpoint, device="cpu")
    config.write_text("{")
    with pytest.raises(CheckpointError, match=re.escape(f"{config} is not valid JSON")):
        load_gpt_oss(checkpoint, device="cpu")


@pytest.mark.parametrize("cut", ["half", "header"])
def test_truncated_shard(checkpoint: Path, cut: str) -> None:
    shard = shard_of(checkpoint, "lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if cut == "half" else b"\xff" * 16)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard} is not a readable safetensors file")) as caught:
        load_gpt_oss(checkpoint, device="cpu")
    assert "corrupt or truncated" in str(caught.value)


def test_wrong_tensor_name(checkpoint: Path) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = shard_of(checkpoint, name)
    rewrite(shard, lambda t: t.update({"model.layers.1.self_attn.q_proj.weigth": t.pop(name)}))
    index = checkpoint / "model.safetensors.index.json"
    index.unlink()  # the headers alone say where each tensor is
    with pytest.raises(KeyError, match=re.escape(name) + r" not found in the checkpoint .*q_proj\.weigth \(in " + shard.name):
        load_gpt_oss(checkpoint, device="cpu")


def test_unexpected_tensor(checkpoint: Path) -> None:
    shard = shard_of(checkpoint, "lm_head.weight")
    (checkpoint / "model.safetensors.index.json").unlink()
    rewrite(shard, lambda t: t.update({"model.layers.7.mlp.router.weight": torch.zeros(2)}))
    with pytest.warns(RuntimeWarning, match=r"holds 1 tensor\(s\) this gpt-oss config does not have, left out: "
                      r"model\.layers\.7\.mlp\.router\.weight \(in " + shard.name):
        model = load_gpt_oss(checkpoint, device="cpu", progress=False)
    assert model.config.num_hidden_layers == LAYERS


@pytest.mark.parametrize("name, change, message", [
    ("model.layers.2.mlp.experts.gate_up_proj_blocks", lambda t: t[:, :, :1].contiguous(),
     r"has shape \[4, 128, 1, 16\]; expected \[E, N, K/32, 16\] = \[4, 128, 2, 16\]"),
    ("model.layers.0.mlp.experts.down_proj_scales", lambda t: t.to(torch.int8), "has dtype I8; expected U8"),
    ("model.layers.1.mlp.experts.down_proj_bias", lambda t: t[:-1].contiguous(), r"has shape \[3, 64\]; expected \[E, N\]"),
    ("model.layers.1.self_attn.sinks", lambda t: t.to(torch.int32), "has dtype I32; expected BF16 or F16 or F32 or F64"),
    ("model.embed_tokens.weight", lambda t: t[:, :-1].contiguous(), r"has shape \[256, 63\]; expected the model's shape"),
])
def test_wrong_shape_or_dtype(checkpoint: Path, name: str, change, message: str) -> None:
    shard = shard_of(checkpoint, name)
    rewrite(shard, lambda t: t.update({name: change(t[name])}))
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: {name} ") + message):
        load_gpt_oss(checkpoint, device="cpu")


# ------------------------------------------------------------------------------------------------
# convert_gpt_oss frees what it packs.


def test_convert_frees_the_dense_expert_weights(checkpoint: Path) -> None:
    model = tiny_model()
    assert len(dense_expert_tensors(model)) == 2 * len(experts_modules(model))
    ids = torch.randint(0, 128, (1, 6))
    convert_gpt_oss(model)
    assert not dense_expert_tensors(model)
    for module in experts_modules(model):
        assert module.gate_up_proj.numel() == 0 and module.gate_up_proj.dtype == torch.float32
        assert module.down_proj.numel() == 0 and module.gate_up_proj_mxfp4.numel() > 0
    assert torch.isfinite(logits(model, ids)).all()
    model.to(torch.bfloat16)  # .to() still works, and the forward too
    assert model.model.layers[0].mlp.experts.gate_up_proj_mxfp4.dtype == torch.uint8
    assert torch.isfinite(logits(model, ids)).all()
    assert convert_gpt_oss(model) is model  # again: nothing left to quantize, nothing breaks
    state = model.state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].numel() == 0


def test_converted_model_holds_what_load_gives(checkpoint: Path) -> None:
    loaded = load_gpt_oss(checkpoint, device="cpu", progress=False)
    reference = transformers_reference(checkpoint)
    convert_gpt_oss(reference, checkpoint=checkpoint)
    assert not dense_expert_tensors(reference)
    ours = dict(loaded.named_buffers())
    for name, value in reference.named_buffers():
        if name.endswith("_mxfp4"):
            assert torch.equal(value, ours[name]), name
    assert sum(t.numel() for t in reference.parameters()) == sum(t.numel() for t in loaded.parameters())


# ------------------------------------------------------------------------------------------------
# GPU: the peak memory while loading.


@pytest.mark.gpu
def test_peak_gpu_memory_while_loading(tmp_path: Path) -> None:
    """gpt-oss-20b-sized layers (E = 32, H = I = 2880): peak <= 1.1x the finished model."""
    # about 2 GB; a small vocabulary, so its special ids move inside it (nn.Embedding checks padding_idx)
    config = model_config("gpt-oss-20b", num_hidden_layers=4, vocab_size=32000, pad_token_id=31999, eos_token_id=31998)
    info = ensure_checkpoint(tmp_path, config, shard_bytes=600 * 10**6, progress=False)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_gpt_oss(tmp_path, device="cuda", progress=False)
    final = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    assert 0.95 * info["bytes"] <= final <= 1.05 * info["bytes"] and not dense_expert_tensors(model)  # packed = checkpoint bytes
    assert peak <= 1.1 * final, f"peak {peak / 1e9:.3f} GB vs finished {final / 1e9:.3f} GB"
    ids = torch.randint(0, 32000, (1, 4), device="cuda")
    assert model.generate(ids, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(ids)).shape == (1, 6)
