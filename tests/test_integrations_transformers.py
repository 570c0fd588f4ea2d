"""The transformers drop-in on the CPU: a tiny random GptOssForCausalLM, converted, against its MXFP4 round trip."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accuracy import relative_error
from safetensors.torch import save_file

import mxfp4

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402

import mxfp4.integrations.transformers as integration  # noqa: E402
from mxfp4.integrations.transformers import IMPLEMENTATION, convert_gpt_oss  # noqa: E402

ACCURACY = 1e-2
EXPERTS, HIDDEN, INTER, LAYERS, TOKENS = 4, 64, 64, 2, 12


def tiny_model() -> GptOssForCausalLM:
    config = GptOssConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=EXPERTS,
        num_experts_per_tok=2, max_position_embeddings=64, experts_implementation="eager",
    )
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GptOssExperts):
                for param in (module.gate_up_proj, module.down_proj, module.gate_up_proj_bias, module.down_proj_bias):
                    param.copy_(torch.randn_like(param) * 0.1)  # gain about 1 per GEMM (fan-in 64)
            elif type(module).__name__ == "GptOssTopKRouter":
                # Logit gaps of O(1) between experts; the error of the routing weights scales with
                # this too (softmax), so not more: bf16 rounding upstream should neither flip a
                # token's experts nor move its weights by much.
                module.weight.copy_(torch.randn_like(module.weight) * 0.3)
    return model


def pin_routing(*models: GptOssForCausalLM) -> None:
    """The first forward records each layer's routing; later forwards (of any of ``models``) replay it.

    A token whose top-k is a near tie could otherwise pick other experts after an upstream bf16
    rounding, which says nothing about the expert layer; pinned routing compares the layers alone.
    """
    slots: dict[int, tuple] = {}

    def hook_for(layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> tuple:
            return slots.setdefault(layer, output)
        return hook

    for model in models:
        for layer, decoder in enumerate(model.model.layers):
            decoder.mlp.router.register_forward_hook(hook_for(layer))


def experts_modules(model: torch.nn.Module) -> list[GptOssExperts]:
    return [m for m in model.modules() if isinstance(m, GptOssExperts)]


def round_trip(w: torch.Tensor) -> torch.Tensor:
    """A module weight [E, K, N] through MXFP4 along K and back."""
    return mxfp4.dequantize(mxfp4.quantize(w.transpose(1, 2)), w.dtype).transpose(1, 2)


def logits(model: GptOssForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def test_convert_quantizes_and_matches_round_trip(seed: int) -> None:
    model = tiny_model()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in experts_modules(reference):
            module.gate_up_proj.copy_(round_trip(module.gate_up_proj))
            module.down_proj.copy_(round_trip(module.down_proj))
    ids = torch.randint(0, 128, (1, TOKENS))
    pin_routing(reference, model)
    ref = logits(reference, ids)
    # The quantization is visible: without the round trip the reference differs by more.
    assert relative_error(logits(model, ids), ref) > 10 * ACCURACY
    assert convert_gpt_oss(model) is model
    assert model.config._experts_implementation == IMPLEMENTATION
    assert all(m.config._experts_implementation == IMPLEMENTATION for m in experts_modules(model))
    ours = logits(model, ids)
    assert relative_error(ours, ref) <= ACCURACY, f"seed {seed}"


def write_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.mlp.experts."
        for name, (n, k) in {"gate_up_proj": (2 * INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}.items():
            tensors[f"{prefix}{name}_blocks"] = torch.randint(0, 256, (EXPERTS, n, k // 32, 16), dtype=torch.uint8)
            tensors[f"{prefix}{name}_scales"] = torch.randint(120, 125, (EXPERTS, n, k // 32), dtype=torch.uint8)
            tensors[f"{prefix}{name}_bias"] = (torch.randn(EXPERTS, n) * 0.2).bfloat16()
    save_file(tensors, str(path))
    return tensors


def test_convert_from_checkpoint_is_bit_exact(tmp_path: Path, seed: int) -> None:
    """The checkpoint's bytes, loaded the way transformers dequantizes them, give the same model."""
    tensors = write_checkpoint(tmp_path / "model.safetensors")
    model = tiny_model()
    with torch.no_grad():
        for layer, module in enumerate(experts_modules(model)):
            prefix = f"model.layers.{layer}.mlp.experts."
            for name in ("gate_up_proj", "down_proj"):
                dense = convert_moe_packed_tensors(tensors[f"{prefix}{name}_blocks"], tensors[f"{prefix}{name}_scales"], dtype=torch.float32)
                getattr(module, name).copy_(dense)
                getattr(module, f"{name}_bias").copy_(tensors[f"{prefix}{name}_bias"].float())
    ids = torch.randint(0, 128, (1, TOKENS))
    pin_routing(model)
    ref = logits(model, ids)
    convert_gpt_oss(model, checkpoint=tmp_path)
    for layer, module in enumerate(experts_modules(model)):
        prefix = f"model.layers.{layer}.mlp.experts."
        for name in ("gate_up_proj", "down_proj"):
            packed = integration._packed(module, name)
            assert isinstance(packed, mxfp4.PackedGateUp) == (name == "gate_up_proj")  # paired: the fused kernels
            back = mxfp4.unpack_gate_up(packed) if name == "gate_up_proj" else mxfp4.unpack(packed)
            assert torch.equal(back.blocks, tensors[f"{prefix}{name}_blocks"])
            assert torch.equal(back.scales, tensors[f"{prefix}{name}_scales"])
    assert relative_error(logits(model, ids), ref) <= ACCURACY, f"seed {seed}"


def test_experts_forward_matches_transformers_float64(seed: int) -> None:
    """One layer, same routing: the drop-in against transformers' own eager loop in float64."""
    model = tiny_model()
    module = experts_modules(model)[0]
    with torch.no_grad():
        module.gate_up_proj.copy_(round_trip(module.gate_up_proj))
        module.down_proj.copy_(round_trip(module.down_proj))
    x = torch.randn(TOKENS, HIDDEN).bfloat16()
    ids = torch.rand(TOKENS, EXPERTS).argsort(dim=1)[:, :2]
    weights = torch.softmax(torch.randn(TOKENS, 2), dim=1)
    ref_module = copy.deepcopy(module).double()
    ref_module.config = copy.copy(module.config)
    ref_module.config._experts_implementation = "eager"
    with torch.no_grad():
        ref = ref_module(x.double(), ids, weights.double())
        convert_gpt_oss(model)
        ours = module(x, ids, weights)
    assert ours.dtype == torch.bfloat16
    assert relative_error(ours.double(), ref) <= ACCURACY, f"seed {seed}"


def test_convert_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no GptOssExperts module"):
        convert_gpt_oss(torch.nn.Linear(2, 2))
    model = tiny_model()
    with pytest.raises(KeyError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks"):
        save_file({"unrelated": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
        convert_gpt_oss(model, checkpoint=tmp_path)
    module = experts_modules(tiny_model())[0]
    module.config._experts_implementation = IMPLEMENTATION
    with pytest.raises(RuntimeError, match="call mxfp4.integrations.transformers.convert_gpt_oss"):
        module(torch.randn(2, HIDDEN), torch.zeros(2, 2, dtype=torch.int64), torch.rand(2, 2))


def test_mxfp4_imports_without_transformers() -> None:
    code = "import sys, mxfp4; assert 'transformers' not in sys.modules; import mxfp4.integrations"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_missing_transformers_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "mxfp4.integrations.transformers")
    monkeypatch.setitem(sys.modules, "transformers.integrations.moe", None)  # import now fails
    with pytest.raises(ImportError, match="pip install 'transformers"):
        importlib.import_module("mxfp4.integrations.transformers")
