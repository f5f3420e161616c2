"""The wheel: ``pip wheel .`` builds one that installs into a fresh virtual environment and runs
``batchllm run-batch`` on the example job there (no source tree on the path).

torch is large, so the fresh environment borrows the test environment's packages through a ``.pth``
file (appended after its own site-packages, so the freshly installed batchllm wins) and the wheel is
installed with ``--no-deps``. CUDA is off for speed: the CUDA build is CI's compile check, not this test's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fewshot_batch.jsonl"
pytestmark = pytest.mark.slow


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


def test_wheel_installs_into_a_fresh_venv_and_runs_the_example(tmp_path):
    dist, build_dir = tmp_path / "dist", tmp_path / "build"
    env = _clean_env(BATCHLLM_CUDA="OFF", CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    # Put the venv's tools (cmake, ninja) first on PATH, as the Makefile's venv does.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    _run([sys.executable, "-m", "pip", "wheel", ROOT, "-w", dist, "--no-build-isolation", "--no-deps",
          f"-Cbuild-dir={build_dir}"], env=env, cwd=tmp_path)
    wheels = list(dist.glob("batchllm-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], env=_clean_env())
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "borrowed_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the borrowed environment may hold batchllm itself (`make test` installs it
    # there), and pip would otherwise call the wheel "already satisfied" and install nothing.
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheels[0]],
         env=_clean_env())

    where = _run([python, "-c", "import batchllm_core, sys; print(batchllm_core.__file__); "
                  "print(batchllm_core.build_info()['version'])"], env=_clean_env(), cwd=tmp_path).stdout.split()
    assert where[0].startswith(str(venv)), f"batchllm_core came from {where[0]}, not the fresh venv"

    output = tmp_path / "answers.jsonl"
    result = _run([venv / "bin" / "batchllm", "run-batch", "-i", EXAMPLE, "-o", output], env=_clean_env(),
                  cwd=tmp_path)
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(answers) == len(EXAMPLE.read_text().splitlines())
    assert all(a["error"] is None and a["response"]["status_code"] == 200 for a in answers)
    assert "52 ok, 0 failed" in result.stdout
    plan = json.loads(_run([venv / "bin" / "batchllm", "plan", "-i", EXAMPLE, "--json"], env=_clean_env(),
                           cwd=tmp_path).stdout)
    assert plan["requests"] == 52
