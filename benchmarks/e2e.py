"""The end-to-end suite (issue 15): gpt-oss as a model, from its MXFP4 checkpoint to tokens.

    hopper-mxfp4 bench e2e [--model gpt-oss-20b] [--dir DIR] [--batch 1,8,64] [--new-tokens 32] [--layers N|fit]

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

``--layers N`` (or ``fit``: the most that fit the checkpoint's room and the GPU) runs the first N layers at
the real dimensions, labelled "N of M layers" everywhere. Such a run also times each decode point with the
model cut to its first layer (``SHORT_LAYERS``), so a layer's time per step is the difference over the layers
between, and reports the full model extrapolated from those per-layer figures, said as such, never as measured.
Points run batch by batch (eager, then compiled), the JSON is rewritten after each, ``--budget`` skips a point
that the last one of its kind says would end past it, and SIGTERM (``timeout``) ends the run with what it has.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .e2e_plan import LayerPlan, label, plan_layers
from .e2e_report import extrapolations, format_e2e, targets
from .gpt_oss_checkpoint import checkpoint_bytes, ensure_checkpoint, model_config, places, room, tensor_specs

SHORT_LAYERS = 1  # a reduced run also times its decode points with this many layers: the per-layer difference


class Stopped(BaseException):
    """SIGTERM during the run (``timeout``): the run writes what it measured and ends. Not an Exception, so no
    per-point handler takes it for a failed point."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Stopped(f"stopped by signal {signum}")


@dataclass
class Recorder:
    """The run's results so far, its clock and budget; ``save`` rewrites the JSON (after every point)."""

    path: Path
    header: dict[str, Any]
    budget: float | None = None
    started: float = field(default_factory=time.time)
    results: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[tuple[str, int], float] = field(default_factory=dict)  # (mode, layers): seconds of the last point
    stopped: str | None = None

    def log(self, text: str) -> None:
        print(f"e2e [{time.time() - self.started:6.0f} s] {text}", file=sys.stderr, flush=True)

    def save(self) -> None:
        payload = {**self.header, "seconds": round(time.time() - self.started, 1), "stopped": self.stopped,
                   "models": self.results, "targets": targets(self.results), "extrapolated": extrapolations(self.results)}
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        os.replace(temporary, self.path)  # a kill mid-write leaves the previous complete file

    def skip_reason(self, mode: str, layers: int) -> str | None:
        """Why a point is not started (None: start it): the last point of its kind would end past the budget."""
        if self.budget is None:
            return None
        left = self.budget - (time.time() - self.started)
        cost = self.costs.get((mode, layers), max((v for (m, _), v in self.costs.items() if m == mode), default=0.0))
        if cost >= left:
            return f"skipped: budget ({left:.0f} s left, the last {mode} point took {cost:.0f} s)"
        return None


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


@contextlib.contextmanager
def truncated(model: Any, layers: int) -> Iterator[None]:
    """Only the model's first ``layers`` decoder layers for the duration; the config (and so every cache that
    generate builds from it) follows the count."""
    stack, config = model.model.layers, model.config
    if layers >= len(stack):
        yield
        return
    saved = (config.num_hidden_layers, config.layer_types)
    model.model.layers = torch.nn.ModuleList(list(stack)[:layers])
    config.num_hidden_layers, config.layer_types = layers, list(saved[1])[:layers]
    try:
        yield
    finally:
        model.model.layers = stack
        config.num_hidden_layers, config.layer_types = saved


def _point(model: Any, batch: int, mode: str, layers: int, settings: argparse.Namespace, rec: Recorder) -> dict[str, Any]:
    """One decode point (``layers``: the model cut to its first ``layers``), or why it failed or was skipped."""
    skip = rec.skip_reason(mode, layers)
    if skip:
        return {"error": skip}
    began = time.perf_counter()
    try:
        with truncated(model, layers):
            if mode == "compiled":
                torch._dynamo.reset()  # a fresh compile for this model, batch and layer count
            point = decode_rate(model, batch, mode, settings)
    except Exception as error:  # one failed point must not lose the rest
        point = {"error": f"{type(error).__name__}: {error}"[:300]}
    point["seconds"] = time.perf_counter() - began
    rec.costs[(mode, layers)] = point["seconds"]
    return point


def decode_all(model: Any, side: dict[str, Any], plan: LayerPlan, settings: argparse.Namespace, rec: Recorder,
               name: str) -> None:
    """Every decode point into ``side["decode"]`` (and, for a reduced run or with ``--per-layer``, the cut
    model's into ``side["decode_short"]``), batch by batch; the JSON after each."""
    counts = [(plan.layers, side.setdefault("decode", {}))]
    if (plan.reduced or settings.per_layer) and plan.layers > SHORT_LAYERS:
        counts.append((SHORT_LAYERS, side.setdefault("decode_short", {"layers": SHORT_LAYERS})))
    for batch in settings.batch_list:
        for mode in settings.mode_list:
            for layers, into in counts:
                point = _point(model, batch, mode, layers, settings, rec)
                into.setdefault(mode, {})[str(batch)] = point
                rec.save()
                said = point.get("error") or (f"{point['tokens_per_s']:.1f} tokens/s, {point['ms_per_step']:.2f} ms/step "
                                              f"(warm-up {point['warmup_s']:.0f} s, {point['seconds']:.0f} s in all)")
                rec.log(f"{name}: decode {mode} B={batch} ({layers} layer{'s' * (layers > 1)}): {said}")  # the numbers survive a kill


def _prepare(model: Any) -> Any:
    # Random prompts may hit any token: no end-of-sequence, so every run generates all its tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def non_layer_bytes(model: Any) -> int:
    """Bytes of the model's tensors outside its decoder layers (embeddings, final norm, lm_head, rotary), each
    storage once (a tied lm_head is the embedding)."""
    inside = {id(t) for t in (*model.model.layers.parameters(), *model.model.layers.buffers())}
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in inside or tensor.is_meta or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


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
    load = {"load_s": time.perf_counter() - started, "non_layer_gb": non_layer_bytes(model) / 1e9}
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


def _plan(name: str, settings: argparse.Namespace, device: torch.device) -> tuple[LayerPlan, Path, list[Path]]:
    """The layer count and the checkpoint's directory and spill places (OSError / ValueError when it cannot run)."""
    directory = Path(settings.dir) / name
    where = places(directory, [Path(d) for d in settings.spill_dir])
    gpu = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    plan = plan_layers(name, settings.layers, [str(p) for p in where], [room(p) for p in where], gpu)
    return plan, directory, [Path(d) for d in settings.spill_dir]


def run_model(name: str, result: dict[str, Any], settings: argparse.Namespace, device: torch.device, rec: Recorder) -> None:
    """One model into ``result`` (already in ``rec.results``, so every save carries what it has)."""
    plan, directory, spill = _plan(name, settings, device)
    shown = label(name, plan.layers, plan.full)
    config = model_config(name, num_hidden_layers=plan.layers)
    result.update(layers=plan.layers, full_layers=plan.full, layers_why=plan.why)
    rec.log(f"{shown}: {plan.why}; checkpoint in {directory} ({checkpoint_bytes(config) / 1e9:.1f} GB)")
    result["checkpoint"] = ensure_checkpoint(directory, config, seed=settings.seed, spill=spill)
    ckpt = result["checkpoint"]
    rate = "" if ckpt["reused"] else f" in {ckpt['seconds']:.0f} s ({ckpt['bytes'] / 1e9 / max(ckpt['seconds'], 1e-9):.2f} GB/s)"
    rec.log(f"{shown}: checkpoint {'reused' if ckpt['reused'] else 'written'}{rate}; load_gpt_oss")
    rec.save()
    model, result["ours"] = load_ours(directory, device)
    ours = result["ours"]
    memory = "".join(f", {key} {ours[key]:.2f} GB" for key in ("peak_gb", "after_gb") if key in ours)
    if "after_gb" in ours:
        memory += f" (non-layer {ours['non_layer_gb']:.2f} GB + {(ours['after_gb'] - ours['non_layer_gb']) / plan.layers:.3f} GB per layer)"
    rec.log(f"{shown}: loaded in {ours['load_s']:.1f} s{memory}")
    rec.save()
    decode_all(model, result["ours"], plan, settings, rec, f"{shown} ours")
    del model
    _release(device)
    result["bf16"] = {}
    run_bf16(result["bf16"], plan, config, directory, settings, device, rec, shown)


def run_bf16(bf16: dict[str, Any], plan: LayerPlan, config: Any, directory: Path, settings: argparse.Namespace,
             device: torch.device, rec: Recorder, shown: str) -> None:
    reason = "skipped (--no-bf16)" if settings.no_bf16 else bf16_fit(config, device)
    if reason:
        bf16["error"] = reason
        return
    rec.log(f"{shown}: the bf16 model (experts dequantized from the packed ones)")
    model, _ = load_ours(directory, device)
    to_bf16_experts(model)
    _release(device)
    if device.type == "cuda":
        bf16["after_gb"] = torch.cuda.memory_allocated(device) / 1e9
    decode_all(model, bf16, plan, settings, rec, f"{shown} bf16")
    del model
    _release(device)


def _release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__}


def _run_models(models: list[str], args: argparse.Namespace, device: torch.device, rec: Recorder) -> int:
    """Each model in turn; a model that fails (no room for its checkpoint, a bad --layers, out of memory) is said,
    keeps what it measured, and the rest go on."""
    status = 0
    for name in models:
        result: dict[str, Any] = {"model": name}
        rec.results.append(result)
        try:
            run_model(name, result, args, device, rec)
        except Exception as error:
            if not isinstance(error, (OSError, ValueError)):  # not a planning error: the trace says where
                traceback.print_exc()
            result["error"] = f"{type(error).__name__}: {error}"
            rec.log(f"{name}: error: {result['error']}")
            status = 1
        _release(device)
        rec.save()
    return status


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
    settings = {"batches": batches, "modes": args.mode_list, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                "reps": args.reps, "layers": args.layers, "budget_s": args.budget}
    rec = Recorder(out_dir / "bench_e2e.json", {**_machine(device), "suite": "e2e", "settings": settings}, args.budget)
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    try:
        status = _run_models(models, args, device, rec)
    except Stopped as stop:
        rec.stopped, status = f"{stop} after {time.time() - rec.started:.0f} s", 124
        rec.log(f"{rec.stopped}: writing what was measured")
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    rec.save()
    print(f"device: {rec.header['device']} (torch {rec.header['torch']}, transformers {rec.header['transformers']})")
    print(format_e2e(rec.results, batches, args.mode_list))
    if rec.stopped:
        print(f"\nINCOMPLETE: {rec.stopped}")
    return status
