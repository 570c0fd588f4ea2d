"""The e2e suite on the CPU, beyond tests/test_bench.py's smoke: runs of fewer layers (--layers N | fit), the
checkpoint's room and spill directories, the streamed safetensors shards, the per-layer figures and the
extrapolation (said as such), the budget and a SIGTERM mid-run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import cli

pytest.importorskip("transformers")

from benchmarks import e2e, e2e_plan, e2e_report  # noqa: E402
from benchmarks import gpt_oss_checkpoint as ckpt  # noqa: E402

GB = 10**9
SLACK = ckpt.ROOM_SLACK


def _tiny_argv(tmp_path: Path, *more: str) -> list[str]:
    return ["e2e", "--tiny", "--dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--batch", "1,2",
            "--new-tokens", "3", "--prompt-tokens", "4", "--reps", "1", *more]


@pytest.fixture
def four_layer_tiny(monkeypatch):
    """The tiny model with 4 layers (so a run of 3 is reduced and its cut to 1 layer leaves 2 between), on the CPU."""
    monkeypatch.setitem(ckpt.MODELS, "tiny", {**ckpt.MODELS["tiny"], "num_hidden_layers": 4})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---------------------------------------------------------------------------------------------
# how many layers fit

def test_layer_bytes_add_up_to_the_120b_checkpoint():
    config = ckpt.model_config("gpt-oss-120b")
    per_layer, total = ckpt.layer_bytes(config), ckpt.checkpoint_bytes(config)
    experts = 128 * (5760 + 2880) * 2880 // 32 * 17  # blocks + scales of one layer: 17 bytes per 32 values
    assert experts < per_layer < experts + 0.1 * GB
    rest = total - 36 * per_layer  # embeddings + lm_head + final norm
    assert rest == 2 * 201088 * 2880 * 2 + 2880 * 2
    assert ckpt.checkpoint_bytes(ckpt.model_config("gpt-oss-120b", num_hidden_layers=8)) == rest + 8 * per_layer


def test_place_shards_fills_in_order_and_says_when_one_fits_nowhere():
    assert ckpt.place_shards([10, 10, 10], [SLACK + 25, SLACK + 100]) == [0, 0, 1]
    assert ckpt.place_shards([10, 50], [SLACK + 25, SLACK + 40]) is None
    assert ckpt.place_shards([], [0]) == []


def test_plan_layers_all_fit_and_too_little_room():
    model, places = "gpt-oss-120b", ["/dev/shm/x", "/tmp/x"]
    plan = e2e_plan.plan_layers(model, None, places, [70 * GB, 0], 85 * GB)
    assert (plan.layers, plan.full, plan.reduced) == (36, 36, False) and plan.why == "all 36 layers"
    assert e2e_plan.plan_layers(model, "fit", places, [40 * GB, 40 * GB], None).layers == 36  # spread over both
    with pytest.raises(OSError) as error:
        e2e_plan.plan_layers(model, None, places, [30 * GB, 10 * GB], 85 * GB)
    text = str(error.value)
    assert "/dev/shm/x: 30.0 GB free" in text and "/tmp/x: 10.0 GB free" in text and "needs 65.2 GB" in text
    assert "36 of 36 layers" in text and "--layers fit would run" in text


def test_plan_layers_fit_picks_the_most_that_fit_room_and_gpu():
    model, places = "gpt-oss-120b", ["/dev/shm/x"]
    per_layer = ckpt.layer_bytes(ckpt.model_config(model))
    plan = e2e_plan.plan_layers(model, "fit", places, [30 * GB], None)
    assert plan.reduced and plan.full == 36
    assert e2e_plan.why_not(model, plan.layers, places, [30 * GB], None) is None
    assert e2e_plan.why_not(model, plan.layers + 1, places, [30 * GB], None) is not None
    assert plan.layers > (30 * GB - 2.4 * GB - 6 * GB) // per_layer  # at most a shard's worth lost to packing
    assert f"--layers fit: {plan.layers + 1} layers do not fit" in plan.why and "/dev/shm/x" in plan.why
    on_gpu = e2e_plan.plan_layers(model, "fit", places, [200 * GB], 40 * GB)  # a 40 GB GPU bounds it instead
    assert on_gpu.reduced and ckpt.checkpoint_bytes(ckpt.model_config(model, num_hidden_layers=on_gpu.layers)) \
        + e2e_plan.GPU_HEADROOM <= 40 * GB
    assert "on the GPU, which has 40.0 GB" in on_gpu.why


def test_plan_layers_rejects_counts_the_model_lacks_and_no_room_at_all():
    with pytest.raises(ValueError, match="gpt-oss-20b has 24 layers"):
        e2e_plan.plan_layers("gpt-oss-20b", 25, ["/d"], [100 * GB], None)
    with pytest.raises(OSError, match="not even one layer fits.*/d: 1.0 GB free"):
        e2e_plan.plan_layers("gpt-oss-120b", "fit", ["/d"], [1 * GB], None)
    assert e2e_plan.plan_layers("gpt-oss-20b", 3, ["/d"], [100 * GB], None).why == "--layers 3"
    assert e2e_plan.label("gpt-oss-120b", 8, 36) == "gpt-oss-120b (8 of 36 layers)"
    assert e2e_plan.label("gpt-oss-120b", 36, 36) == "gpt-oss-120b"


def test_layers_flag():
    parse = lambda *argv: cli.build_parser().parse_args(list(argv))  # noqa: E731
    args = parse("e2e", "--layers", "fit", "--spill-dir", "/a", "--spill-dir", "/b", "--budget", "400")
    assert args.layers == "fit" and args.spill_dir == ["/a", "/b"] and args.budget == 400
    assert parse("e2e", "--layers", "8").layers == 8 and parse("e2e").layers is None
    for bad in ("0", "-2", "all"):
        with pytest.raises(SystemExit):
            parse("e2e", "--layers", bad)


# ---------------------------------------------------------------------------------------------
# the checkpoint: streamed shards, spill directories

def test_streamed_shard_is_a_safetensors_file_of_the_generated_tensors(tmp_path):
    from safetensors import safe_open

    specs = ckpt.tensor_specs(ckpt.model_config("tiny", num_hidden_layers=1))
    ckpt._write_shard(tmp_path / "a.safetensors", specs, torch.Generator().manual_seed(5), 0.02, _NoBar(), None)
    again = torch.Generator().manual_seed(5)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == sorted(spec.name for spec in specs)
        for spec in specs:  # the same draws in the same order: bit-exact, bf16 and uint8
            assert torch.equal(handle.get_tensor(spec.name), ckpt._generate(spec, again, 0.02))
    header = (tmp_path / "a.safetensors").read_bytes()
    assert (8 + int.from_bytes(header[:8], "little")) % 8 == 0  # the data starts aligned


class _NoBar:
    def update(self, count: int) -> None:
        pass


def test_shards_spill_into_a_second_place_through_links(tmp_path, monkeypatch):
    from mxfp4.integrations.gpt_oss_loader import load_gpt_oss

    config = ckpt.model_config("tiny", num_hidden_layers=2)
    home, spill = tmp_path / "shm" / "m", tmp_path / "disk"
    total = ckpt.checkpoint_bytes(config)
    rooms = {home: SLACK + total // 2, ckpt.spill_path(spill, home): SLACK + 2 * total}
    monkeypatch.setattr(ckpt, "places", lambda directory, extra=(): list(rooms))  # as if on two file systems
    monkeypatch.setattr(ckpt, "room", lambda place: rooms[place])
    result = ckpt.ensure_checkpoint(home, config, seed=3, shard_bytes=30_000, spill=[spill], progress=False)
    links = [p for p in home.glob("model-*.safetensors") if p.is_symlink()]
    assert links and all(Path(os.path.realpath(p)).parent == spill / "m" for p in links)
    assert result["spilled"] == {str(spill / "m"): sum(p.stat().st_size for p in links)}
    assert sum(p.stat().st_size for p in home.glob("model-*.safetensors")) == result["bytes"]
    model = load_gpt_oss(home, device="cpu", progress=False)  # read through the links
    assert model.config.num_hidden_layers == 2
    assert ckpt.ensure_checkpoint(home, config, seed=3, shard_bytes=30_000, spill=[spill], progress=False)["reused"]
    ckpt.ensure_checkpoint(home, config, seed=4, shard_bytes=30_000, spill=[spill], progress=False)  # a rewrite
    assert len(list((spill / "m").glob("*.safetensors"))) == len([p for p in home.glob("model-*") if p.is_symlink()])


def test_places_drops_a_spill_directory_on_the_same_file_system(tmp_path):
    assert ckpt.places(tmp_path / "a" / "m", [tmp_path / "b"]) == [tmp_path / "a" / "m"]


def test_no_room_is_an_error_naming_the_place(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(e2e, "room", lambda place: 1000)
    assert cli.main(_tiny_argv(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "tiny: error: OSError: tiny: its checkpoint (2 of 2 layers) needs" in out and str(tmp_path / "ckpt" / "tiny") in out
    assert json.loads((tmp_path / "out" / "bench_e2e.json").read_text())["models"][0]["error"]


# ---------------------------------------------------------------------------------------------
# a run of fewer layers on the CPU: labelled, per-layer figures, extrapolated and said so

def test_reduced_run_is_labelled_and_extrapolated(tmp_path, capsys, four_layer_tiny):
    assert cli.main(_tiny_argv(tmp_path, "--layers", "3", "--no-bf16")) == 0
    out, err = capsys.readouterr()
    payload = json.loads((tmp_path / "out" / "bench_e2e.json").read_text())
    (model,) = payload["models"]
    assert (model["layers"], model["full_layers"]) == (3, 4) and model["ours"]["non_layer_gb"] > 0
    for mode in ("eager", "compiled"):
        for batch in ("1", "2"):
            assert model["ours"]["decode"][mode][batch]["ms_per_step"] > 0
            assert model["ours"]["decode_short"][mode][batch]["ms_per_step"] > 0
    assert model["ours"]["decode_short"]["layers"] == e2e.SHORT_LAYERS
    (extra,) = payload["extrapolated"]
    assert extra["note"] == e2e_report.EXTRAPOLATED and (extra["measured_layers"], extra["layers"]) == (3, 4)
    assert set(extra["decode"]["ours"]) == {"eager", "compiled"} and payload["targets"] == {}
    rows = [line for line in out.splitlines() if line.startswith("tiny")]
    assert rows and all(line.startswith("tiny (3 of 4 layers)") for line in rows)  # never a bare "tiny" row
    assert "EXTRAPOLATED, not measured: tiny, all 4 layers, from the 3 of 4 measured" in out
    assert "per layer (ms per decode step" in out and "decode compiled B=2 (1 layer):" in err
    assert "time, tiny (3 of 4 layers): checkpoint written" in out


def test_per_layer_on_a_whole_model_times_the_cut_and_extrapolates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(_tiny_argv(tmp_path, "--per-layer", "--no-bf16", "--modes", "eager", "--batch", "1")) == 0
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "bench_e2e.json").read_text())
    ours = payload["models"][0]["ours"]
    assert ours["decode_short"]["eager"]["1"]["ms_per_step"] > 0 and payload["extrapolated"] == []
    assert "per layer (ms per decode step" in out and "EXTRAPOLATED" not in out and "(2 of 2" not in out


def test_report_per_layer_and_extrapolation_arithmetic():
    point = lambda ms, batch=1: {"tokens_per_s": batch * 1e3 / ms, "ms_per_step": ms, "compiled": True}  # noqa: E731
    reduced = {"model": "gpt-oss-120b", "layers": 8, "full_layers": 36, "layers_why": "--layers fit: 9 layers do not fit",
               "checkpoint": {"bytes": 16.3e9, "reused": False, "seconds": 10.0, "spilled": {"/tmp/x": 6e9}},
               "ours": {"load_s": 6.0, "non_layer_gb": 2.32, "after_gb": 16.32, "peak_gb": 16.82,
                        "decode": {"compiled": {"1": point(2.0), "64": point(8.0, 64)}},
                        "decode_short": {"layers": 1, "compiled": {"1": point(0.6), "64": {"error": "skipped: budget"}}}},
               "bf16": {"error": "skipped (--no-bf16)"}}
    assert e2e_report.layer_gb(reduced) == pytest.approx(1.75)
    assert e2e_report.per_layer_ms(reduced, "ours", "compiled", 1) == pytest.approx((0.2, 0.4))
    assert e2e_report.per_layer_ms(reduced, "ours", "compiled", 64) is None
    (entry,) = e2e_report.extrapolations([reduced])
    assert entry["held_gb"] == pytest.approx(16.32 + 28 * 1.75) and entry["peak_gb"] == pytest.approx(entry["held_gb"] + 0.5)
    step = entry["decode"]["ours"]["compiled"]["1"]
    assert step["ms_per_step"] == pytest.approx(2.0 + 28 * 0.2) and step["tokens_per_s"] == pytest.approx(1e3 / 7.6)
    assert "64" not in entry["decode"]["ours"]["compiled"]  # no per-layer figure, no extrapolation
    assert e2e_report.targets([reduced]) == {}  # a reduced run measures no whole-model target
    text = e2e_report.format_e2e([reduced], [1, 64], ["compiled"])
    assert "gpt-oss-120b (8 of 36 layers): --layers fit: 9 layers do not fit" in text
    assert "EXTRAPOLATED, not measured: gpt-oss-120b, all 36 layers, from the 8 of 36 measured: held 65.3 GB" in text
    assert "(held <= 70 GB: within, by extrapolation)" in text and "B=1 131.6 tok/s (7.60 ms)" in text
    assert "0.200 (0.40)" in text and "6.0 GB spilled" in text and "1.75" in text
    assert all("gpt-oss-120b (8 of 36 layers)" in line for line in text.splitlines() if line.startswith("gpt-oss-120b"))
    full = {**reduced, "layers": 36, "ours": {**reduced["ours"], "after_gb": 65.3, "peak_gb": 65.8}}
    assert e2e_report.targets([full])["gpt-oss-120b held <= 70 GB"]["met"] and e2e_report.extrapolations([full]) == []


# ---------------------------------------------------------------------------------------------
# time: the budget, a SIGTERM, partial results

def test_budget_skips_a_point_the_last_of_its_kind_says_would_overrun(tmp_path):
    rec = e2e.Recorder(tmp_path / "r.json", {}, budget=100.0)
    assert rec.skip_reason("compiled", 36) is None  # nothing to go by: it runs
    rec.costs[("compiled", 36)] = 70.0
    assert rec.skip_reason("compiled", 36) is None
    rec.started -= 40  # 60 s left
    assert "skipped: budget (60 s left, the last compiled point took 70 s)" == rec.skip_reason("compiled", 36)
    assert rec.skip_reason("compiled", 1) is not None  # another layer count of the mode goes by the mode's cost
    assert rec.skip_reason("eager", 36) is None
    assert e2e.Recorder(tmp_path / "r.json", {}).skip_reason("compiled", 36) is None  # no budget


def test_sigterm_mid_run_writes_what_was_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []

    def decode_rate(model, batch, mode, settings):
        calls.append((batch, mode))
        if len(calls) == 3:
            e2e._on_sigterm(15, None)  # as timeout's SIGTERM would, mid-point
        return {"ms_per_step": 2.0, "tokens_per_s": batch * 500.0, "steps": [2.0], "warmup_s": 0.1, "compiled": False}

    monkeypatch.setattr(e2e, "decode_rate", decode_rate)
    assert cli.main(_tiny_argv(tmp_path, "--no-bf16")) == 124
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "bench_e2e.json").read_text())
    assert payload["stopped"].startswith("stopped by signal 15")
    decode = payload["models"][0]["ours"]["decode"]
    assert decode["eager"]["1"]["tokens_per_s"] == 500.0 and decode["compiled"]["1"]["tokens_per_s"] == 500.0
    assert "2" not in decode.get("eager", {})  # the point it was in is lost, nothing after it ran
    assert "INCOMPLETE: stopped by signal 15" in out and "500.0 (2.00 ms)" in out


def test_json_is_rewritten_after_every_point(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []

    def decode_rate(model, batch, mode, settings):
        path = tmp_path / "out" / "bench_e2e.json"
        seen.append(len(json.dumps(json.loads(path.read_text())["models"][0]["ours"].get("decode", {}))))
        return {"ms_per_step": 2.0, "tokens_per_s": batch * 500.0, "steps": [2.0], "warmup_s": 0.1, "compiled": False}

    monkeypatch.setattr(e2e, "decode_rate", decode_rate)
    assert cli.main(_tiny_argv(tmp_path, "--no-bf16")) == 0
    assert len(seen) == 4 and seen == sorted(seen) and len(set(seen)) == 4  # each point saw the ones before it
