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
from transformers import GptOssForCausalLM  # noqa: E402

from benchmarks.gpt_oss_checkpoint import model_config, write_checkpoint  # noqa: E402
from mxfp4.integrations.gpt_oss_experts import packed_weight  # noqa: E402
from mxfp4.integrations.transformers import convert_gpt_oss, load_gpt_oss  # noqa: E402
from test_integrations_transformers import ACCURACY, EXPERTS, experts_modules, relative_error, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "expert_parallel_worker.py"
WORLD = 2
IMPLEMENTATIONS = ("all_reduce", "all_to_all")
WORKER_SECONDS = 300


def expert_parallel_missing() -> str | None:
    """Why this transformers cannot run the tests (None: it can)."""
    if importlib.util.find_spec("transformers.distributed.expert_parallel") is None:
        return f"transformers {transformers.__version__} has no expert parallelism (transformers.distributed.expert_parallel)"
    from transformers.distributed import DistributedConfig

    if "ep_implementation" not in DistributedConfig.__dataclass_fields__:
        return f"transformers {transformers.__version__} cannot choose the expert-parallel implementation (ep_implementation)"
    if importlib.util.find_spec("accelerate") is None:
        return "from_pretrained(tp_plan=...) needs accelerate (pip install -e '.[test]' installs it)"
    if not torch.distributed.is_available():
        return "this torch has no torch.distributed"
    return None


pytestmark = pytest.mark.skipif(expert_parallel_missing() is not None, reason=str(expert_parallel_missing()))


@dataclass
class Reference:
    """The one-process model of a case and its logits."""

    model: GptOssForCausalLM
    logits: torch.Tensor
    case_dir: Path


def logits_of(model: GptOssForCausalLM, case_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.load(case_dir / "ids.pt")).logits.double()


def reference(model: GptOssForCausalLM, case_dir: Path, routing: str) -> Reference:
    """The model's logits, and each layer's router output saved to ``routing`` (the workers replay it)."""
    recorded: dict[int, tuple] = {}
    handles = [decoder.mlp.router.register_forward_hook(
        lambda module, args, out, layer=layer: recorded.setdefault(layer, tuple(t.detach() for t in out)))
        for layer, decoder in enumerate(model.model.layers)]
    logits = logits_of(model, case_dir)
    for handle in handles:
        handle.remove()
    torch.save(recorded, case_dir / routing)
    return Reference(model, logits, case_dir)


def write_case(case_dir: Path, seed: int) -> dict[str, Reference]:
    """The files the workers read, and the one-process references."""
    torch.manual_seed(seed)
    tiny_model().save_pretrained(case_dir / "dense")
    config = model_config("tiny", num_local_experts=EXPERTS)
    write_checkpoint(case_dir / "mxfp4", config, seed=seed, std=0.1, progress=False)
    torch.save(torch.randint(0, 128, (2, 9)), case_dir / "ids.pt")
    dense = convert_gpt_oss(GptOssForCausalLM.from_pretrained(str(case_dir / "dense")).eval())
    loaded = load_gpt_oss(case_dir / "mxfp4", device="cpu", dtype=torch.float32, progress=False)
    return {"convert": reference(dense, case_dir, "routing_dense.pt"), "load": reference(loaded, case_dir, "routing_mxfp4.pt")}


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


def run_workers(case_dir: Path) -> list[dict]:
    store, port = loopback_store()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(WORKER), "--case-dir", str(case_dir), "--device", "cpu", "--world", str(WORLD),
               "--store-port", str(port)]
    workers = [subprocess.Popen([*command, "--rank", str(rank)], env=env, stdout=subprocess.PIPE,
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


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Reference], list[dict]]:
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    case_dir = tmp_path_factory.mktemp("expert_parallel")
    references = write_case(case_dir, seed)
    return seed, references, run_workers(case_dir)


@pytest.mark.parametrize("case", ["convert", "load"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sharded_logits_equal_one_process(sharded_run, case: str, implementation: str) -> None:
    seed, references, ranks = sharded_run
    ref = references[case]
    for rank, result in enumerate(ranks):
        error = relative_error(result[f"{case}/{implementation}"]["logits"], ref.logits)
        print(f"{case}/{implementation} rank {rank}: relative error {error:.2e} (seed {seed})")
        assert error <= ACCURACY, f"{case}/{implementation} rank {rank}: {error:.3e} (seed {seed})"


@pytest.mark.parametrize("case", ["convert", "load"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_each_rank_holds_its_experts(sharded_run, case: str, implementation: str) -> None:
    """Rank r holds experts r·E/2 .. (r+1)·E/2, packed as the one-process model packs them (bit for bit)."""
    _, references, ranks = sharded_run
    local = EXPERTS // WORLD
    for rank, result in enumerate(ranks):
        for layer, facts in enumerate(result[f"{case}/{implementation}"]["experts"]):
            start, stop = rank * local, (rank + 1) * local
            assert facts["range"] == (start, stop, EXPERTS) and facts["num_experts"] == local
            assert facts["expert_parallel"] and facts["implementation"] == "hopper_mxfp4"
            whole = experts_modules(references[case].model)[layer]
            assert torch.equal(facts["gate_up"], packed_weight(whole, "gate_up_proj").data[start:stop])
            assert torch.equal(facts["down"], packed_weight(whole, "down_proj").data[start:stop])
            assert torch.equal(facts["gate_up_bias"], whole.gate_up_proj_bias.detach()[start:stop])


def test_the_experts_matter_in_the_compared_logits(sharded_run, tmp_path: Path) -> None:
    """A rank that left out the other rank's share (or added it twice) would fail the comparison: dropping the
    choices of experts E/2 .. E moves these logits far more than ACCURACY."""
    seed, references, _ = sharded_run
    for case, ref in references.items():
        def drop_upper_half(module, args):
            hidden, ids, weights = args
            return hidden, ids, weights.masked_fill(ids >= EXPERTS // WORLD, 0.0)

        handles = [m.register_forward_pre_hook(drop_upper_half) for m in experts_modules(ref.model)]
        try:
            halved = logits_of(ref.model, ref.case_dir)
        finally:
            for handle in handles:
                handle.remove()
        assert relative_error(halved, ref.logits) > 10 * ACCURACY, f"{case} (seed {seed})"
