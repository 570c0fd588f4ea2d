"""The "hopper_mxfp4" experts under transformers' expert parallelism: two gloo processes on the CPU (loopback only)
run a tiny gpt-oss sharded by transformers (``DistributedConfig(tp_size=2, tp_plan="auto", ep_size=2)``), with
each of its implementations (all-reduce, all-to-all), converted by ``convert_gpt_oss`` and loaded by
``load_gpt_oss``; their logits against one process's model. The two processes run once for the module
(tests/expert_parallel_worker.py), the tests check what they wrote. On two CUDA devices the same worker runs
under torchrun with NCCL (``test_two_gpus``)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_integrations_transformers import (  # noqa: E402
    ACCURACY,
    EXPERTS,
    experts_modules,
    relative_error,
    tiny_model,
)
from transformers import GptOssForCausalLM  # noqa: E402

from benchmarks.gpt_oss_checkpoint import model_config, write_checkpoint  # noqa: E402
from mxfp4.integrations.gpt_oss_experts import packed_weight  # noqa: E402
from mxfp4.integrations.transformers import convert_gpt_oss, load_gpt_oss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "expert_parallel_worker.py"
WORLD = 2
IMPLEMENTATIONS = ("all_reduce", "all_to_all")
CASES = ("convert", "load", "checkpoint")  # convert_gpt_oss(model), load_gpt_oss, convert_gpt_oss(model, checkpoint)
WORKER_SECONDS = 300
BATCH, SEQUENCE = 2, 9


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def implementations_here() -> tuple[str, ...]:
    """The expert-parallel implementations this transformers has: both from 5.21 (``ep_implementation``); before,
    ``enable_expert_parallel`` gives the all-reduce one; none without transformers' distributed engine."""
    if not _has_module("transformers.distributed"):
        return ()
    from transformers.distributed import DistributedConfig

    fields = DistributedConfig.__dataclass_fields__
    if "ep_implementation" in fields:
        return IMPLEMENTATIONS
    return ("all_reduce",) if "enable_expert_parallel" in fields else ()


def expert_parallel_missing() -> str | None:
    """Why this transformers cannot run the tests (None: it can)."""
    if not implementations_here():
        return f"transformers {transformers.__version__} has no expert parallelism (DistributedConfig with ep_size)"
    if not _has_module("accelerate"):
        return "from_pretrained(tp_plan=...) needs accelerate (pip install -e '.[test]' installs it)"
    if not torch.distributed.is_available():
        return "this torch has no torch.distributed"
    return None


pytestmark = pytest.mark.skipif(expert_parallel_missing() is not None, reason=str(expert_parallel_missing()))


@dataclass
class Reference:
    """The one-process model of a case, its logits, and where its case's files are."""

    model: GptOssForCausalLM
    logits: torch.Tensor
    case_dir: Path


@dataclass
class ShardedRun:
    """What the ranks wrote (one dict per rank), the one-process references, the seed of the case."""

    seed: int
    references: dict[str, Reference]
    ranks: list[dict]


def logits_of(model: GptOssForCausalLM, case_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.load(case_dir / "ids.pt").to(model.device)).logits.double().cpu()


def reference(model: GptOssForCausalLM, case_dir: Path, routing: str) -> Reference:
    """The model's logits, and each layer's router output saved to ``routing`` (the workers replay it)."""
    recorded: dict[int, tuple] = {}
    handles = [decoder.mlp.router.register_forward_hook(
        lambda module, args, out, layer=layer: recorded.setdefault(layer, tuple(t.detach().cpu() for t in out)))
        for layer, decoder in enumerate(model.model.layers)]
    logits = logits_of(model, case_dir)
    for handle in handles:
        handle.remove()
    torch.save(recorded, case_dir / routing)
    return Reference(model, logits, case_dir)


def write_case(case_dir: Path, seed: int, device: str) -> dict[str, Reference]:
    """The files the workers read, and the one-process references on ``device``."""
    torch.manual_seed(seed)
    tiny_model().save_pretrained(case_dir / "dense")
    config = model_config("tiny", num_local_experts=EXPERTS)
    write_checkpoint(case_dir / "mxfp4", config, seed=seed, std=0.1, progress=False)
    torch.save(torch.randint(0, 128, (BATCH, SEQUENCE)), case_dir / "ids.pt")
    dense = convert_gpt_oss(GptOssForCausalLM.from_pretrained(str(case_dir / "dense")).to(device).eval())
    loaded = load_gpt_oss(case_dir / "mxfp4", device=device, dtype=torch.float32, progress=False)
    loaded_reference = reference(loaded, case_dir, "routing_mxfp4.pt")
    # convert_gpt_oss(checkpoint=...) of transformers' dequantized load holds what load_gpt_oss gives
    return {"convert": reference(dense, case_dir, "routing_dense.pt"), "load": loaded_reference, "checkpoint": loaded_reference}


def loopback_store() -> tuple[torch.distributed.TCPStore, int]:
    """The rendezvous: a TCPStore listening on 127.0.0.1 only (the store takes over our socket), on a port the
    system picked; and that port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=listener.detach(),
                                       wait_for_workers=False)
    return store, port


def worker_environment(device: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    if device == "cpu":  # gloo between the two processes, on the loopback interface; no GPU even where there is one
        env.update(CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo")
    else:  # NCCL within the host; NVLink multicast off, as the device machines require
        env.update(NCCL_NVLS_ENABLE="0")
    return env


def run_workers(case_dir: Path, device: str) -> list[dict]:
    store, port = loopback_store()
    command = [sys.executable, str(WORKER), "--case-dir", str(case_dir), "--device", device, "--world", str(WORLD),
               "--store-port", str(port), "--implementations", ",".join(implementations_here())]
    workers = [subprocess.Popen([*command, "--rank", str(rank)], env=worker_environment(device), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    try:
        outputs = [worker.communicate(timeout=WORKER_SECONDS)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        del store
    for rank, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"rank {rank} failed:\n{output[-6000:]}"
    return [torch.load(case_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def sharded_run_on(device: str, case_dir: Path) -> ShardedRun:
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    references = write_case(case_dir, seed, device)
    return ShardedRun(seed, references, run_workers(case_dir, device))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> ShardedRun:
    """The two gloo processes on the CPU, run once for this module's tests."""
    return sharded_run_on("cpu", tmp_path_factory.mktemp("expert_parallel"))


# ---------------------------------------------------------------------------------------------
# The checks, for the CPU run (one test each) and the two-GPU run (all of them).


def require(implementation: str) -> None:
    if implementation not in implementations_here():
        pytest.skip(f"transformers {transformers.__version__} has no {implementation} expert parallelism (5.21 added it)")


def check_logits(run: ShardedRun, case: str, implementation: str) -> None:
    for rank, result in enumerate(run.ranks):
        error = relative_error(result[f"{case}/{implementation}"]["logits"], run.references[case].logits)
        print(f"{case}/{implementation} rank {rank}: relative error {error:.2e} (seed {run.seed})")
        assert error <= ACCURACY, f"{case}/{implementation} rank {rank}: {error:.3e} (seed {run.seed})"


def check_experts(run: ShardedRun, case: str, implementation: str) -> None:
    """Rank r holds experts r·E/2 .. (r+1)·E/2, packed as the one-process model packs them (bit for bit)."""
    local = EXPERTS // WORLD
    for rank, result in enumerate(run.ranks):
        for layer, facts in enumerate(result[f"{case}/{implementation}"]["experts"]):
            start, stop = rank * local, (rank + 1) * local
            assert facts["range"] == (start, stop, EXPERTS) and facts["num_experts"] == local
            assert facts["expert_parallel"] and facts["implementation"] == "hopper_mxfp4"
            whole = experts_modules(run.references[case].model)[layer]
            assert torch.equal(facts["gate_up"], packed_weight(whole, "gate_up_proj").data[start:stop].cpu())
            assert torch.equal(facts["down"], packed_weight(whole, "down_proj").data[start:stop].cpu())
            assert torch.equal(facts["gate_up_bias"], whole.gate_up_proj_bias.detach()[start:stop].cpu())


def check_calls(run: ShardedRun, implementation: str) -> None:
    """all-reduce: the whole batch, top-k wide, other ranks' choices as sentinels of weight 0; all-to-all: the
    rows sent to this rank, top-1, local ids only. Every call asks mxfp4.moe to skip foreign ids."""
    for result in run.ranks:
        for case in CASES:
            calls = result[f"{case}/{implementation}"]["calls"]
            assert len(calls) == 2 and all(call["skip_invalid_ids"] is True for call in calls)  # one per layer
            for call in calls:
                if implementation == "all_reduce":
                    assert call["rows"] == BATCH * SEQUENCE and call["top_k"] == 2
                    assert call["foreign"] and call["foreign_weight_zero"]
                else:
                    assert call["top_k"] == 1 and not call["foreign"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sharded_logits_equal_one_process(sharded_run: ShardedRun, case: str, implementation: str) -> None:
    require(implementation)
    check_logits(sharded_run, case, implementation)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_each_rank_holds_its_experts(sharded_run: ShardedRun, case: str, implementation: str) -> None:
    require(implementation)
    check_experts(sharded_run, case, implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_each_implementation_hands_the_experts_what_it_should(sharded_run: ShardedRun, implementation: str) -> None:
    require(implementation)
    check_calls(sharded_run, implementation)


def test_the_experts_matter_in_the_compared_logits(sharded_run: ShardedRun) -> None:
    """A rank that left out the other rank's share would fail the comparison: dropping the choices of experts
    E/2 .. E moves these logits far more than ACCURACY."""
    def drop_upper_half(module: torch.nn.Module, args: tuple) -> tuple:
        hidden, ids, weights = args
        return hidden, ids, weights.masked_fill(ids >= EXPERTS // WORLD, 0.0)

    for case, ref in sharded_run.references.items():
        handles = [m.register_forward_pre_hook(drop_upper_half) for m in experts_modules(ref.model)]
        try:
            halved = logits_of(ref.model, ref.case_dir)
        finally:
            for handle in handles:
                handle.remove()
        assert relative_error(halved, ref.logits) > 10 * ACCURACY, f"{case} (seed {sharded_run.seed})"


def check_wrong_experts_error(run: ShardedRun) -> None:
    for rank, result in enumerate(run.ranks):
        share = EXPERTS // WORLD
        assert (f"load_gpt_oss: experts = (0, {EXPERTS}) but distributed_config gives this rank experts "
                f"({rank * share}, {(rank + 1) * share})") in result["wrong_experts_error"]


def test_load_gpt_oss_rejects_an_experts_range_that_is_not_the_ranks(sharded_run: ShardedRun) -> None:
    check_wrong_experts_error(sharded_run)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < WORLD,
                    reason=f"needs {WORLD} CUDA devices (NCCL)")
def test_two_gpus(tmp_path: Path) -> None:
    """The same worker on two GPUs with NCCL (the SM90 fused path on each rank), against one GPU's model."""
    run = sharded_run_on("cuda", tmp_path)
    for implementation in implementations_here():
        for case in CASES:
            check_logits(run, case, implementation)
            check_experts(run, case, implementation)
        check_calls(run, implementation)
    check_wrong_experts_error(run)
