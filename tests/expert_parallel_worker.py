"""One rank of the expert-parallel tests (tests/test_expert_parallel.py): a tiny gpt-oss under transformers' expert
parallelism with the "hopper_mxfp4" experts, for both of transformers' implementations (all-reduce, all-to-all).

Run by the test as W plain processes that meet at the test's TCPStore (``--store-port``; gloo on the CPU), or
under torchrun (``torchrun --nproc-per-node 2 tests/expert_parallel_worker.py --case-dir DIR --device cuda``:
NCCL). ``DIR`` holds what the test wrote: ``dense/`` (a float32 GptOssForCausalLM, save_pretrained), ``mxfp4/``
(a gpt-oss MXFP4 checkpoint), ``routing_dense.pt`` / ``routing_mxfp4.pt`` (each layer's router output in the
one-process reference, replayed here so that a near tie cannot route a token differently) and ``ids.pt``. Each
rank writes ``rank{R}.pt``: per case, the logits and what its experts modules hold.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

IMPLEMENTATIONS = ("all_reduce", "all_to_all")


def init_group(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """The process group (gloo on the CPU, NCCL on CUDA), from the test's store or torchrun's environment."""
    rank = int(os.environ["RANK"]) if args.rank is None else args.rank
    world = int(os.environ["WORLD_SIZE"]) if args.world is None else args.world
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=os.environ.get("LOCAL_RANK", str(rank)))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=args.timeout)
    if args.store_port is None:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    else:
        store = dist.TCPStore("127.0.0.1", args.store_port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world, device


def legacy_router_masking(model: torch.nn.Module):
    """Before transformers 5.21 expert parallelism masks other ranks' choices in the router's output (the
    "ep_router" style): the replayed output must go through it too. None from 5.21 on."""
    from transformers.distributed import DistributedConfig

    if "ep_implementation" in DistributedConfig.__dataclass_fields__:
        return None
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    style, mesh = ALL_PARALLEL_STYLES["ep_router"], model._device_mesh
    return lambda module, output: style.transform_output_post_forward(module, output, mesh)


def replay_routing(model: torch.nn.Module, path: Path, device: torch.device) -> None:
    """Every router returns what the reference's returned (the test recorded it)."""
    recorded, masking = torch.load(path), legacy_router_masking(model)
    for layer, decoder in enumerate(model.model.layers):
        output = tuple(t.to(device) for t in recorded[layer])
        if masking is not None:
            output = masking(decoder.mlp.router, output)
        decoder.mlp.router.register_forward_hook(lambda module, args, out, output=output: output)


def experts_facts(model: torch.nn.Module) -> list[dict]:
    """What each layer's experts module holds on this rank."""
    from mxfp4.integrations.expert_parallel import local_expert_range, local_tensor
    from mxfp4.integrations.gpt_oss_experts import is_expert_parallel, packed_weight

    facts = []
    for decoder in model.model.layers:
        module = decoder.mlp.experts
        start, stop, total = local_expert_range(module)
        facts.append({
            "num_experts": module.num_experts, "expert_parallel": is_expert_parallel(module),
            "range": (start, stop, total), "implementation": module.config._experts_implementation,
            "gate_up": packed_weight(module, "gate_up_proj").data.cpu(), "down": packed_weight(module, "down_proj").data.cpu(),
            "gate_up_bias": local_tensor(module.gate_up_proj_bias).detach().cpu(),
        })
    return facts


class CallRecorder:
    """Wraps the experts forward's ``moe``: what transformers' implementation handed each call (the ids' width
    k, whether a sentinel or other foreign id came, and skip_invalid_ids)."""

    def __init__(self) -> None:
        from mxfp4.integrations import gpt_oss_experts

        self.module, self.moe, self.calls = gpt_oss_experts, gpt_oss_experts.moe, []

    def __call__(self, x, topk_ids, topk_weights, gate_up, down, **options):
        foreign = (topk_ids < 0) | (topk_ids >= gate_up.num_experts)
        self.calls.append({"top_k": topk_ids.shape[1], "rows": topk_ids.shape[0], "foreign": bool(foreign.any()),
                           "foreign_weight_zero": bool((topk_weights[foreign] == 0).all()),
                           "skip_invalid_ids": options.get("skip_invalid_ids")})
        return self.moe(x, topk_ids, topk_weights, gate_up, down, **options)

    def __enter__(self) -> "CallRecorder":
        self.module.moe = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.moe = self.moe


def run_model(model: torch.nn.Module, case_dir: Path, routing: str, device: torch.device) -> dict:
    replay_routing(model, case_dir / routing, device)
    ids = torch.load(case_dir / "ids.pt").to(device)
    with torch.no_grad(), CallRecorder() as recorder:
        logits = model(input_ids=ids).logits
    return {"logits": logits.double().cpu(), "experts": experts_facts(model), "calls": recorder.calls}


def distributed_config(world: int, implementation: str):
    """transformers >= 5.21: ``ep_size`` and ``ep_implementation``; before, ``enable_expert_parallel`` (its plan
    masks other ranks' choices in the router and all-reduces: the all-reduce implementation)."""
    from transformers.distributed import DistributedConfig

    if "ep_implementation" in DistributedConfig.__dataclass_fields__:
        return DistributedConfig(tp_size=world, tp_plan="auto", ep_size=world, ep_implementation=implementation)
    if implementation != "all_reduce":
        raise ValueError(f"this transformers has no {implementation} expert parallelism")
    return DistributedConfig(tp_size=world, tp_plan="auto", enable_expert_parallel=True)


def converted_case(case_dir: Path, world: int, implementation: str, device: torch.device) -> dict:
    """from_pretrained sharded by transformers, then convert_gpt_oss on every rank."""
    from transformers import GptOssForCausalLM

    from mxfp4.integrations.transformers import convert_gpt_oss

    model = GptOssForCausalLM.from_pretrained(str(case_dir / "dense"), distributed_config=distributed_config(world, implementation))
    return run_model(convert_gpt_oss(model.eval()), case_dir, "routing_dense.pt", device)


def checkpoint_case(case_dir: Path, world: int, implementation: str, device: torch.device) -> dict:
    """transformers loads the MXFP4 checkpoint dequantized and sharded; convert_gpt_oss packs each rank's rows of
    the checkpoint's experts."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    from mxfp4.integrations.transformers import convert_gpt_oss

    model = GptOssForCausalLM.from_pretrained(str(case_dir / "mxfp4"), quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.float32, distributed_config=distributed_config(world, implementation))
    return run_model(convert_gpt_oss(model.eval(), checkpoint=case_dir / "mxfp4"), case_dir, "routing_mxfp4.pt", device)


def loaded_case(case_dir: Path, world: int, implementation: str, device: torch.device,
                experts: tuple[int, int] | None = None) -> dict:
    """load_gpt_oss with the distributed config: each rank reads its own experts (``experts``, if given, must
    name them)."""
    from mxfp4.integrations.transformers import load_gpt_oss

    model = load_gpt_oss(case_dir / "mxfp4", device=device, dtype=torch.float32, progress=False, experts=experts,
                         distributed_config=distributed_config(world, implementation))
    return run_model(model, case_dir, "routing_mxfp4.pt", device)


def wrong_experts_error(case_dir: Path, world: int, device: torch.device) -> str:
    """What load_gpt_oss says when ``experts`` is not this rank's share (every expert, here)."""
    from mxfp4.integrations.transformers import load_gpt_oss

    try:
        load_gpt_oss(case_dir / "mxfp4", device=device, progress=False, experts=(0, 4),
                     distributed_config=distributed_config(world, "all_reduce"))
    except ValueError as error:
        return str(error)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, help="default: $RANK (torchrun)")
    parser.add_argument("--world", type=int, help="default: $WORLD_SIZE (torchrun)")
    parser.add_argument("--store-port", type=int, help="the test's TCPStore on 127.0.0.1 (default: torchrun's)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a collective may wait")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS), help="comma-separated")
    args = parser.parse_args()
    rank, world, device = init_group(args)
    share = 4 // world  # the tiny model's 4 experts
    results = {"wrong_experts_error": wrong_experts_error(args.case_dir, world, device)}
    for implementation in args.implementations.split(","):
        results[f"convert/{implementation}"] = converted_case(args.case_dir, world, implementation, device)
        # all-to-all: passing this rank's experts explicitly is allowed (and the same)
        experts = (rank * share, (rank + 1) * share) if implementation == "all_to_all" else None
        results[f"load/{implementation}"] = loaded_case(args.case_dir, world, implementation, device, experts)
        results[f"checkpoint/{implementation}"] = checkpoint_case(args.case_dir, world, implementation, device)
    torch.save(results, args.case_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
