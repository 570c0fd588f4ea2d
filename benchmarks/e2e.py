"""The end-to-end suite (issue 15): gpt-oss as a model, from its MXFP4 checkpoint to tokens.

    hopper-mxfp4 bench e2e [--model gpt-oss-20b] [--dir DIR] [--batch 1,8,64] [--new-tokens 32]

Per model: a synthetic checkpoint in gpt-oss's on-disk format at the real dimensions
(``benchmarks.gpt_oss_checkpoint``; written once, reused while its mark matches); ``load_gpt_oss`` timed,
with the peak GPU memory during the load and what the model holds after it; then decode tokens/s at each
batch size, greedy ``generate`` after a short prompt: **eager** (dynamic cache) and **compiled**
(``cache_implementation="static"``, which makes transformers compile the decode step with ``torch.compile``
and CUDA graphs; on the CPU it runs uncompiled). Beside ours, transformers' own bf16 ``grouped_mm``
experts on the same weights (the packed experts dequantized to bf16: what ``Mxfp4Config(dequantize=True)``
loads), where they fit on the GPU (the 120b's do not).

A decode step's time is ``(t(N new tokens) - t(1 new token)) / (N - 1)``: both runs share the prompt and
the cache size (a stopping criterion ends the short one), so the prefill and the first token cancel.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .e2e_report import format_e2e, targets
from .gpt_oss_checkpoint import (
    checkpoint_bytes,
    ensure_checkpoint,
    model_config,
    tensor_specs,
)
from .report import write_json


def log(text: str, started: float) -> None:
    print(f"e2e [{time.time() - started:6.0f} s] {text}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stop_after(length: int) -> Any:
    """A stopping criterion that ends generate once the sequences reach ``length`` tokens."""
    from transformers import StoppingCriteria

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            done = input_ids.shape[1] >= length  # a host-side shape: no device sync
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StopAfter()


def _generate(model: Any, ids: torch.Tensor, new_tokens: int, mode: str, stop: int | None) -> float:
    """Seconds of one greedy generate (``stop``: end at that many tokens)."""
    from transformers import StoppingCriteriaList

    kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    if mode == "compiled":
        kwargs["cache_implementation"] = "static"
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_stop_after(stop)])
    _sync(ids.device)
    started = time.perf_counter()
    out = model.generate(ids, **kwargs)
    _sync(ids.device)
    seconds = time.perf_counter() - started
    want = ids.shape[1] + (new_tokens if stop is None else stop - ids.shape[1])
    if out.shape[1] != want:
        raise RuntimeError(f"generate gave {out.shape[1] - ids.shape[1]} new tokens, expected {want - ids.shape[1]}")
    return seconds


def decode_rate(model: Any, batch: int, mode: str, settings: argparse.Namespace) -> dict[str, Any]:
    """Decode ms per step and tokens/s of ``model`` at ``batch`` in ``mode`` (a warm-up run first)."""
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device="cpu").manual_seed(settings.seed + batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, settings.prompt_tokens), generator=generator).to(device)
    new = settings.new_tokens
    started = time.perf_counter()
    _generate(model, ids, new, mode, None)  # warm-up (and, compiled, the compile)
    warmup = time.perf_counter() - started
    steps = []
    for _ in range(settings.reps):
        full = _generate(model, ids, new, mode, None)
        first = _generate(model, ids, new, mode, ids.shape[1] + 1)
        steps.append((full - first) / (new - 1))
    step = max(statistics.median(steps), 1e-9)
    compiled = hasattr(model, "_compiled_call") if mode == "compiled" else False
    return {"ms_per_step": step * 1e3, "tokens_per_s": batch / step, "steps": [s * 1e3 for s in steps],
            "warmup_s": warmup, "compiled": compiled}


def decode_all(model: Any, settings: argparse.Namespace, started: float, label: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in settings.mode_list:
        if mode == "compiled":
            torch._dynamo.reset()  # a fresh compile for this model
        for batch in settings.batch_list:
            try:
                point = decode_rate(model, batch, mode, settings)
                said = f"{point['tokens_per_s']:.1f} tokens/s, {point['ms_per_step']:.2f} ms/step (warm-up {point['warmup_s']:.0f} s)"
            except Exception as error:  # one failed point must not lose the rest
                point = {"error": f"{type(error).__name__}: {error}"[:300]}
                said = point["error"]
            results.setdefault(mode, {})[str(batch)] = point
            log(f"{label}: decode {mode} B={batch}: {said}", started)  # the numbers survive a timeout
    return results


def _prepare(model: Any) -> Any:
    # Random prompts may hit any token: no end-of-sequence, so every run generates all its tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load_ours(path: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """``load_gpt_oss`` timed, with the device memory: peak during the load and held after it."""
    from mxfp4.integrations.transformers import load_gpt_oss

    memory = device.type == "cuda"
    if memory:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    _sync(device)
    started = time.perf_counter()
    model = load_gpt_oss(path, device=device)
    _sync(device)
    load = {"load_s": time.perf_counter() - started}
    if memory:
        load["peak_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
        load["after_gb"] = (torch.cuda.memory_allocated(device) - base) / 1e9
    return _prepare(model), load


def to_bf16_experts(model: Any) -> None:
    """Replace every experts module's packed weights by their exact bf16 dequantization, transformers'
    layout ``[E, K, N]``, and switch the model to transformers' ``grouped_mm`` experts."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    import mxfp4
    from mxfp4.integrations.gpt_oss_experts import DENSE_WEIGHTS, packed_weight

    with torch.no_grad():
        for module in (m for m in model.modules() if isinstance(m, GptOssExperts)):
            for name in DENSE_WEIGHTS:
                packed = packed_weight(module, name)
                natural = mxfp4.unpack_gate_up(packed) if isinstance(packed, mxfp4.PackedGateUp) else mxfp4.unpack(packed)
                delattr(module, f"{name}_mxfp4")
                del packed  # the packed bytes go as the dense weight comes
                dense = mxfp4.dequantize(natural, torch.bfloat16).transpose(1, 2).contiguous()
                setattr(module, name, torch.nn.Parameter(dense, requires_grad=False))
                del natural, dense
    model.set_experts_implementation("grouped_mm")


def bf16_fit(config: Any, device: torch.device) -> str | None:
    """Why the bf16 model cannot run on ``device`` (None: it fits)."""
    if device.type != "cuda":
        return None
    dense = sum(s.nbytes * (4 if s.kind == "blocks" else 1) for s in tensor_specs(config) if s.kind != "scales")
    total = torch.cuda.get_device_properties(device).total_memory
    if dense + (4 << 30) > total:
        return f"does not fit: the bf16 model is {dense / 1e9:.0f} GB, the GPU has {total / 1e9:.0f} GB"
    return None


def run_model(name: str, settings: argparse.Namespace, device: torch.device, started: float) -> dict[str, Any]:
    config = model_config(name)
    directory = Path(settings.dir) / name
    log(f"{name}: checkpoint in {directory} ({checkpoint_bytes(config) / 1e9:.1f} GB)", started)
    result: dict[str, Any] = {"model": name, "checkpoint": ensure_checkpoint(directory, config, seed=settings.seed)}
    log(f"{name}: checkpoint {'reused' if result['checkpoint']['reused'] else 'written'}; load_gpt_oss", started)
    model, result["ours"] = load_ours(directory, device)
    memory = "".join(f", {key} {result['ours'][key]:.2f} GB" for key in ("peak_gb", "after_gb") if key in result["ours"])
    log(f"{name}: loaded in {result['ours']['load_s']:.1f} s{memory}", started)
    result["ours"]["decode"] = decode_all(model, settings, started, f"{name} ours")
    del model
    _release(device)
    result["bf16"] = run_bf16(name, config, directory, settings, device, started)
    return result


def run_bf16(name: str, config: Any, directory: Path, settings: argparse.Namespace, device: torch.device,
             started: float) -> dict[str, Any]:
    reason = "skipped (--no-bf16)" if settings.no_bf16 else bf16_fit(config, device)
    if reason:
        return {"error": reason}
    log(f"{name}: the bf16 model (experts dequantized from the packed ones)", started)
    model, _ = load_ours(directory, device)
    to_bf16_experts(model)
    _release(device)
    bf16: dict[str, Any] = {}
    if device.type == "cuda":
        bf16["after_gb"] = torch.cuda.memory_allocated(device) / 1e9
    bf16["decode"] = decode_all(model, settings, started, f"{name} bf16")
    del model
    _release(device)
    return bf16


def _release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__}


def run(args: argparse.Namespace, batches: list[int]) -> int:
    """The suite: every model asked for, then the JSON (``bench_e2e.json`` in --out) and the table."""
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.reps < 1:
        print("bench e2e: error: --new-tokens must be >= 2, --prompt-tokens and --reps >= 1", file=sys.stderr)
        return 2
    args.batch_list, args.mode_list = batches, args.modes.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = ["tiny"] if args.tiny else (args.model or ["gpt-oss-20b"])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: list[dict[str, Any]] = []
    for name in models:
        results.append(run_model(name, args, device, started))
        payload = {**_machine(device), "suite": "e2e", "seconds": round(time.time() - started, 1),
                   "settings": {"batches": batches, "modes": args.mode_list, "new_tokens": args.new_tokens,
                                "prompt_tokens": args.prompt_tokens, "reps": args.reps},
                   "models": results, "targets": targets(results)}
        write_json(out_dir / "bench_e2e.json", payload)  # after each model: a later timeout keeps it
    print(f"device: {payload['device']} (torch {payload['torch']}, transformers {payload['transformers']})")
    print(format_e2e(results, batches, args.mode_list))
    return 0
