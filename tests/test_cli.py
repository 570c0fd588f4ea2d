"""``python -m codegen``: help of every verb, config selection, generate/--check, compile, doctor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codegen.cli.main import build_parser, main
from codegen.build.config import DEFAULT_CONFIGS, TileConfig
from codegen.build.toolchain import check_toolchain

REPO = Path(__file__).resolve().parent.parent
VERBS = ("generate", "compile", "doctor", "tune", "bench")

try:
    import codegen.build.render  # noqa: F401

    RENDER_ERROR = None
except ImportError as error:
    RENDER_ERROR = f"codegen.build.render is not importable yet ({error})"
needs_render = pytest.mark.skipif(RENDER_ERROR is not None, reason=RENDER_ERROR or "")
needs_toolchain = pytest.mark.skipif(not check_toolchain().ok, reason=f"toolchain: {check_toolchain().reason}")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOPPER_MXFP4_CACHE", str(tmp_path / "cache"))


def test_module_help_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "codegen", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for verb in VERBS:
        assert verb in result.stdout
    assert "examples:" in result.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m codegen {verb}" in out
    assert "example" in out


def test_no_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_the_verbs_are_exactly_the_documented_ones():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(choices) == set(VERBS)


@pytest.mark.parametrize(
    "argv, sentence",
    [
        (["--config", "bogus"], "is not of the form"),
        (["--config", "n128_m7_k128_s4_wg2"], "tile_m=7: WGMMA's N must be a multiple of 8"),
        (["--tile-m", "300"], "tile_m=300"),
        (["--tile-n", "96"], "tile_n=96"),
    ],
)
@pytest.mark.parametrize("verb", ["generate", "compile"])
def test_invalid_config_exits_2_with_the_reason(verb, argv, sentence, capsys, tmp_path):
    code = main([verb, *argv] + (["--out", str(tmp_path)] if verb == "generate" else []))
    assert code == 2
    err = capsys.readouterr().err
    assert sentence in err
    assert not list(tmp_path.glob("*.cu"))


def test_selection():
    from codegen.cli.main import select_configs

    parser = build_parser()
    assert select_configs(parser.parse_args(["generate"])) == list(DEFAULT_CONFIGS)
    named = DEFAULT_CONFIGS[2].name
    assert select_configs(parser.parse_args(["generate", "--config", named, "--config", named])) == [DEFAULT_CONFIGS[2]]
    built = select_configs(parser.parse_args(["compile", "--tile-m", "32", "--stages", "6"]))
    assert built == [TileConfig(tile_m=32, stages=6)]
    both = select_configs(parser.parse_args(["compile", "--config", named, "--tile-m", "32"]))
    assert [c.name for c in both] == [named, TileConfig(tile_m=32).name]


def test_field_help_states_the_config_limits(capsys):
    """The flags' help reads the limits TileConfig.validate() enforces; every warpgroup count it names is accepted."""
    from codegen.cli.main import select_configs
    from codegen.build.config import (
        MAX_TILE_K,
        MIN_STAGES,
        TILE_M_RANGE,
        WARPGROUP_CHOICES,
    )

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"one of {', '.join(map(str, WARPGROUP_CHOICES))}" in help_text
    assert f"{TILE_M_RANGE[0]}..{TILE_M_RANGE[1]}" in help_text
    assert f"up to {MAX_TILE_K}" in help_text and f"at least {MIN_STAGES}" in help_text
    parser = build_parser()
    for warpgroups in WARPGROUP_CHOICES:
        argv = ["generate", "--warpgroups", str(warpgroups), "--tile-n", str(64 * warpgroups)]
        assert select_configs(parser.parse_args(argv))[0].warpgroups == warpgroups


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


@needs_render
def test_generate_then_check_detects_stale_missing_and_extra(tmp_path, capsys):
    out = tmp_path / "generated"
    assert main(["generate", "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([c.name + ".cu" for c in DEFAULT_CONFIGS] + ["manifest.json"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["configs"]] == [c.name for c in DEFAULT_CONFIGS]
    assert manifest["configs"][0]["fields"] == DEFAULT_CONFIGS[0].as_dict()
    assert "grouped_mm.cu.j2" in manifest["templates"]
    assert manifest["nvidia_cutlass"]
    capsys.readouterr()

    assert main(["generate", "--out", str(out), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out

    # A second generate changes nothing.
    assert main(["generate", "--out", str(out)]) == 0
    assert "0 file(s) changed" in capsys.readouterr().out

    stale = out / (DEFAULT_CONFIGS[1].name + ".cu")
    stale.write_text(stale.read_text() + "// hand edit\n")
    (out / (DEFAULT_CONFIGS[2].name + ".cu")).unlink()
    (out / "n64_m8_k64_s2_wg1.cu").write_text("// left over\n")
    assert main(["generate", "--out", str(out), "--check"]) == 1
    captured = capsys.readouterr()
    assert "stale" in captured.err
    assert f"stale: {DEFAULT_CONFIGS[1].name}.cu" in captured.out
    assert f"missing: {DEFAULT_CONFIGS[2].name}.cu" in captured.out
    assert "extra: n64_m8_k64_s2_wg1.cu" in captured.out
    # --check never writes.
    assert not (out / (DEFAULT_CONFIGS[2].name + ".cu")).exists()


@needs_render
def test_check_reports_a_template_change(tmp_path, monkeypatch):
    from codegen.build import generate as gen

    out = tmp_path / "generated"
    gen.generate(DEFAULT_CONFIGS[:1], out)
    assert gen.check(DEFAULT_CONFIGS[:1], out) == []
    real = gen.template_hashes()
    monkeypatch.setattr(gen, "template_hashes", lambda templates_dir=None: {**real, "mxfp4_decode.cuh": "0" * 64})
    differences = gen.check(DEFAULT_CONFIGS[:1], out)
    assert differences == ["stale: manifest.json (templates changed: mxfp4_decode.cuh)"]


@needs_render
def test_generate_into_an_unwritable_place_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "a_file" / "generated"
    assert main(["generate", "--config", DEFAULT_CONFIGS[0].name, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "generate: error: cannot write" in err and str(tmp_path / "a_file") in err and "Traceback" not in err
    result = subprocess.run([sys.executable, "-m", "codegen", "generate", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Not a directory" in result.stderr


def test_generate_selected_config_prunes_the_previous_selection(tmp_path, capsys):
    out = tmp_path / "kernels"
    assert main(["generate", "--out", str(out)]) == 0
    name = DEFAULT_CONFIGS[3].name
    assert main(["generate", "--out", str(out), "--config", name]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([name + ".cu", "manifest.json"])
    assert main(["generate", "--out", str(out), "--config", name, "--check"]) == 0


@needs_render
def test_repository_generated_dir_is_up_to_date():
    from codegen.build.generate import check
    from codegen.build.paths import GENERATED_DIR

    if not (Path(GENERATED_DIR) / "manifest.json").is_file():
        pytest.skip("generated/ is not populated yet (python -m codegen generate)")
    differences = check(DEFAULT_CONFIGS, GENERATED_DIR)
    assert differences == [], "generated/ is stale; run python -m codegen generate:\n" + "\n".join(differences)


# ---------------------------------------------------------------------------------------------
# compile and doctor
# ---------------------------------------------------------------------------------------------


@needs_render
@needs_toolchain
def test_compile_prints_a_table_and_hits_the_cache(capsys):
    name = DEFAULT_CONFIGS[3].name
    assert main(["compile", "--config", name, "--jobs", "1", "-q"]) == 0
    first = capsys.readouterr().out
    header, rule, row = first.splitlines()[:3]
    for column in ("regs", "smem", "spill st/ld", "stack", "compile s", "cache"):
        assert column in header
    assert row.startswith(name) and "miss" in row and "0/0" in row

    assert main(["compile", "--config", name, "--json", "-q"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["config"] == name and records[0]["ok"] and records[0]["cache_hit"]
    assert records[0]["resources"]["spill_stores"] == 0


def test_compile_table_shows_the_dynamic_shared_memory_of_the_launch(monkeypatch, capsys):
    """ptxas reports static shared memory (0 here); the table shows what the launch asks for."""
    import codegen.build.compiler as compiler
    import codegen.build.toolchain as toolchain
    from codegen.build.compiler import CompiledKernel, Resources

    config = DEFAULT_CONFIGS[3]
    kernel = CompiledKernel(name=config.name, cubin=b"\x7fELF", resources=Resources(registers=168, smem_bytes=0),
                            compile_seconds=1.0, log="", cache_hit=True)
    monkeypatch.setattr(toolchain, "check_toolchain", lambda: toolchain.ToolchainStatus(ok=True, reason="ok"))
    monkeypatch.setattr(compiler, "compile_many", lambda configs, **kwargs: [kernel for _ in configs])
    assert main(["compile", "--config", config.name, "--no-sass", "-q"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    header_cells = [cell.strip() for cell in header.split("  ") if cell.strip()]
    assert "dyn smem B" in header_cells
    assert row.split()[header_cells.index("dyn smem B")] == str(config.shared_memory_bytes) != "0"
    assert main(["compile", "--config", config.name, "--no-sass", "--json", "-q"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["dynamic_smem_bytes"] == config.shared_memory_bytes and record["resources"]["smem_bytes"] == 0
    assert record["store_path"] == config.store_path


def test_compile_into_a_cache_that_is_a_file_says_nothing_is_cached(monkeypatch, tmp_path, capsys, recwarn):
    """HOPPER_MXFP4_CACHE at a file: the command says, before compiling, that nothing will be kept, and each row
    says "not kept"; the library's RuntimeWarning does not repeat it."""
    import codegen.build.cache as cache
    import codegen.build.compiler as compiler
    import codegen.build.toolchain as toolchain
    from codegen.build.compiler import CompiledKernel, Resources

    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("HOPPER_MXFP4_CACHE", str(tmp_path / "file"))
    monkeypatch.setattr(cache, "_warned_roots", set())
    config = DEFAULT_CONFIGS[3]
    compiled = []

    def compile_many(configs, **kwargs):  # what compile_many returns when store() could not keep the cubin
        compiled.append(capsys.readouterr().err)  # the warning came before any compile
        return [CompiledKernel(name=c.name, cubin=b"\x7fELF", resources=Resources(registers=168), compile_seconds=1.0,
                               log="", cache_hit=False, cache_path="") for c in configs]

    monkeypatch.setattr(toolchain, "check_toolchain", lambda: toolchain.ToolchainStatus(ok=True, reason="ok"))
    monkeypatch.setattr(compiler, "compile_many", compile_many)
    assert main(["compile", "--config", config.name, "--no-sass", "-q"]) == 0
    (before,) = compiled
    assert f"the kernel cache {tmp_path / 'file'} is not usable" in before
    assert "the kernels are compiled but NOT cached, so every process compiles them again" in before
    assert "HOPPER_MXFP4_CACHE" in before
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith(config.name) and row.rstrip().endswith("not kept")
    cache.store("ab" * 32, b"\x7fELF", {})  # what a compile would do next: it stays quiet, the command said it
    assert not [w for w in recwarn if "kernel cache" in str(w.message)]


def test_compile_fails_without_a_toolchain(monkeypatch, capsys):
    import codegen.build.toolchain as toolchain

    broken = toolchain.ToolchainStatus(ok=False, reason="CuTe/CUTLASS headers not found (pip install nvidia-cutlass)")
    monkeypatch.setattr(toolchain, "check_toolchain", lambda: broken)
    assert main(["compile", "--config", DEFAULT_CONFIGS[0].name]) == 1
    assert "pip install nvidia-cutlass" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["compile", "tune"])
@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_jobs_must_be_positive(verb, jobs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--jobs", jobs])
    assert exit_info.value.code == 2
    assert "argument --jobs/-j: expected a positive whole number" in capsys.readouterr().err


def test_doctor(capsys, tmp_path):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for label in ("GPU", "NVRTC:", "CUTLASS:", "CCCL:", "CUDA headers:", "toolchain:", "cache:", "path:", "fallback:"):
        assert label in out, out
    assert str(tmp_path / "cache") in out
    status = check_toolchain()
    if status.ok:
        assert status.nvrtc_version_string in out
        assert status.cccl_version in out


def test_doctor_reports_a_bad_fallback_budget(capsys, monkeypatch):
    monkeypatch.setenv("HOPPER_MXFP4_FALLBACK_BUDGET", "garbage")
    assert main(["doctor"]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fallback:")]
    assert line and "PROBLEM" in line[0] and "HOPPER_MXFP4_FALLBACK_BUDGET = 'garbage'" in line[0], line
    monkeypatch.setenv("HOPPER_MXFP4_FALLBACK_BUDGET", "8G")
    assert main(["doctor"]) == 0
    assert "fallback:     decoded-weight budget 8.00 GiB (HOPPER_MXFP4_FALLBACK_BUDGET=8G)" in capsys.readouterr().out
