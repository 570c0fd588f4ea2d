"""One home per contract: the CUDA result unwrap, the template hashing, and the names that must be
defined exactly once across the packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from codegen.build import cache, compiler, generate
from codegen.build.compiler import CompileError
from codegen.build.cuda_result import as_text, unwrap
from codegen.runtime import launch

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mxfp4", "codegen", "benchmarks")


class Failed(Exception):
    pass


def test_unwrap_gives_none_one_value_or_a_tuple():
    assert unwrap((0,), 0, Failed) is None
    assert unwrap(0, 0, Failed) is None  # a bare status
    assert unwrap((0, "x"), 0, Failed) == "x"
    assert unwrap((0, 1, 2), 0, Failed) == (1, 2)
    with pytest.raises(Failed) as error:
        unwrap((7, "ignored"), 0, Failed)
    assert error.value.args == (7,)  # the error callable gets the status
    assert as_text(b"CUDA_ERROR_X") == "CUDA_ERROR_X" and as_text(3) == "3"


def test_driver_check_uses_the_shared_unwrap(monkeypatch):
    driver = launch.driver
    monkeypatch.setattr(driver, "cuGetErrorName", lambda status: (driver.CUresult.CUDA_SUCCESS, b"CUDA_ERROR_INVALID_VALUE"))
    monkeypatch.setattr(driver, "cuGetErrorString", lambda status: (driver.CUresult.CUDA_SUCCESS, b"invalid argument"))
    assert launch.check((driver.CUresult.CUDA_SUCCESS, 5), "cuThing") == 5
    assert launch.check((driver.CUresult.CUDA_SUCCESS,), "cuThing") is None
    with pytest.raises(launch.DriverError, match=r"cuThing failed: CUDA_ERROR_INVALID_VALUE \(invalid argument\)"):
        launch.check((driver.CUresult.CUDA_ERROR_INVALID_VALUE,), "cuThing")


def test_nvrtc_check_uses_the_shared_unwrap():
    class Result:
        NVRTC_SUCCESS = 0

    class FakeNvrtc:
        nvrtcResult = Result

        @staticmethod
        def nvrtcGetErrorString(err):
            return (0, b"NVRTC_ERROR_COMPILATION")

    assert compiler._check(FakeNvrtc, (0, 42), "nvrtcGetCUBINSize", "k") == 42
    with pytest.raises(CompileError) as error:
        compiler._check(FakeNvrtc, (6,), "nvrtcGetCUBIN", "k", log="the log")
    assert "nvrtcGetCUBIN failed for k: NVRTC_ERROR_COMPILATION" in str(error.value)
    assert error.value.log == "the log" and error.value.name == "k"


def test_template_hashing_has_one_walk(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.cuh").write_text("header")
    (tmp_path / "sub" / "b.h").write_text("nested header")
    (tmp_path / "kernel.cu.j2").write_text("template")
    (tmp_path / ".hidden.cuh").write_text("editor swap")
    (tmp_path / "tool.py").write_text("python")
    everything = cache.template_hashes(tmp_path)
    assert set(everything) == {"a.cuh", "sub/b.h", "kernel.cu.j2"}
    headers = cache.template_hashes(tmp_path, cache.HEADER_SUFFIXES)
    assert headers == {name: digest for name, digest in everything.items() if name != "kernel.cu.j2"}
    assert headers["a.cuh"] == cache.sha256_bytes(b"header")
    assert cache.template_hashes(tmp_path / "missing") == {}
    # generate's manifest reads the same function, over the project's templates by default.
    assert generate.template_hashes is cache.template_hashes
    assert set(cache.template_hashes()) >= {"grouped_mm.cu.j2"}


def _top_level_definitions() -> dict[str, list[str]]:
    """{name: [file, ...]} of every module-level assignment, class and function in the packages."""
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in tree.body:
                names: list[str] = []
                if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                    names = [node.name]
                elif isinstance(node, ast.Assign):
                    names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names = [node.target.id]
                for name in names:
                    found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize(
    "name, home",
    [
        ("ENTRY_POINT", "codegen/build/render.py"),
        ("UsageError", "codegen/cli/common.py"),
        ("BLOCK_SIZE", "mxfp4/format/tensor.py"),
        ("unwrap", "codegen/build/cuda_result.py"),
        ("template_hashes", "codegen/build/cache.py"),
    ],
)
def test_a_contract_is_defined_once(name, home):
    assert _top_level_definitions().get(name) == [home]


def test_no_second_name_for_the_mxfp4_block():
    definitions = _top_level_definitions()
    assert "MXFP4_BLOCK" not in definitions and "project_header_hashes" not in definitions


def test_parse_each_names_the_flag_and_the_text():
    from codegen.cli.common import UsageError, parse_each

    assert parse_each(["1", "2"], int, "--m") == [1, 2]
    with pytest.raises(UsageError, match=r"^--m: invalid literal"):
        parse_each(["1", "x"], int, "--m")
    with pytest.raises(UsageError, match=r"^invalid config 'x': "):
        parse_each(["x"], int, "invalid config {text!r}")
