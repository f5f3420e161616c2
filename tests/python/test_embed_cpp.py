"""C++ embedding: install the library with CMake, build examples/embed_cpp against the installed
package (find_package(batchllm) -> batchllm::core), run it on token-id files and check its plan."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cmake() -> str:
    # The venv's cmake (pip package) is what the Makefile uses; fall back to one on PATH.
    candidate = Path(sys.executable).with_name("cmake")
    return str(candidate) if candidate.exists() else (shutil.which("cmake") or pytest.skip("cmake not found"))


def _generator_args() -> list:
    ninja = Path(sys.executable).with_name("ninja")
    if ninja.exists():
        return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def plan_job(tmp_path_factory) -> Path:
    """Configure, build and install batchllm (no Python, no CUDA) into a prefix; build the example."""
    work = tmp_path_factory.mktemp("embed")
    prefix, lib_build, example_build = work / "prefix", work / "lib", work / "example"
    cmake = _cmake()
    jobs = str(os.cpu_count() or 2)
    _run([cmake, "-S", ROOT, "-B", lib_build, *_generator_args(), "-DBATCHLLM_BUILD_PYTHON=OFF",
          "-DBATCHLLM_CUDA=OFF", "-DBATCHLLM_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_INSTALL_PREFIX={prefix}"])
    _run([cmake, "--build", lib_build, "-j", jobs])
    _run([cmake, "--install", lib_build])
    assert (prefix / "include" / "batchllm" / "prefix_tree.h").is_file()
    assert list(prefix.glob("lib*/cmake/batchllm/batchllmConfig.cmake"))
    _run([cmake, "-S", ROOT / "examples" / "embed_cpp", "-B", example_build, *_generator_args(),
          f"-DCMAKE_PREFIX_PATH={prefix}"])
    _run([cmake, "--build", example_build, "-j", jobs])
    return example_build / "plan_job"


def _parse(stdout: str):
    summary, prefixes, request_prefix = {}, [], {}
    for line in stdout.splitlines():
        fields = line.split()
        if fields[0] == "requests":
            summary = {fields[i]: int(fields[i + 1]) for i in range(0, len(fields), 2)}
        elif fields[0] == "prefix":
            prefixes.append({"parent": int(fields[3]), "depth": int(fields[5]), "begin": int(fields[7]),
                             "end": int(fields[8]), "requests": [int(r) for r in fields[10:]]})
        elif fields[0] == "request":
            request_prefix[int(fields[1])] = int(fields[3])
    return summary, prefixes, request_prefix


def test_embedded_planner_prints_the_job_groups(plan_job, tmp_path):
    shared = list(range(1, 9))            # two blocks of 4 shared by requests 0-3
    nested = shared + [9, 10, 11, 12]     # one more block shared by requests 2 and 3
    first = tmp_path / "a.txt"
    first.write_text(" ".join(map(str, shared + [100, 101])) + "\n\n"
                     + " ".join(map(str, shared + [200, 201, 202])) + "\n")
    second = tmp_path / "b.txt"
    second.write_text(" ".join(map(str, nested + [300])) + "\n" + " ".join(map(str, nested + [301, 302])) + "\n"
                      + "50 51 52\n")
    result = _run([plan_job, "--block-size", "4", first, second])
    summary, prefixes, request_prefix = _parse(result.stdout)
    assert summary["requests"] == 5
    assert summary["prompt_tokens"] == 10 + 11 + 13 + 14 + 3
    assert summary["prefill_tokens"] == 8 + 2 + 3 + 4 + 1 + 2 + 3
    assert summary["shared_tokens"] == summary["prompt_tokens"] - summary["prefill_tokens"]
    assert summary["groups"] == 2
    top = [p for p in prefixes if p["parent"] == -1]
    assert top == [{"parent": -1, "depth": 0, "begin": 0, "end": 8, "requests": [0, 1, 2, 3]}]
    child = [p for p in prefixes if p["parent"] != -1]
    assert child == [{"parent": prefixes.index(top[0]), "depth": 1, "begin": 8, "end": 12, "requests": [2, 3]}]
    assert request_prefix[4] == -1 and request_prefix[0] == request_prefix[1] == prefixes.index(top[0])
    assert request_prefix[2] == request_prefix[3] == prefixes.index(child[0])


def test_embedded_planner_rejects_bad_input(plan_job, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 x\n")
    result = subprocess.run([str(plan_job), str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and "bad.txt:1: not a token id: x" in result.stderr
    result = subprocess.run([str(plan_job), str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert result.returncode == 1 and "cannot read" in result.stderr
    assert subprocess.run([str(plan_job)], capture_output=True).returncode == 2
