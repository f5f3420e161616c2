"""Print the requirements of pyproject.toml's build system and the named extras, one per line.

The Makefile installs the test environment from the project's own files with this, so CI and a
fresh machine get exactly what pyproject declares (self-references such as ``batchllm[engine]``
are expanded)::

    python .ci/requirements.py build test bench
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: pip vendors tomli
    from pip._vendor import tomli as tomllib


def requirements(pyproject: dict, names: list[str]) -> list[str]:
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    self_ref = re.compile(rf"^{re.escape(project['name'])}\[(?P<extras>[^\]]+)\]$")
    out: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name == "build":
            reqs = pyproject["build-system"]["requires"] + list(project.get("dependencies", []))
        elif name in extras:
            reqs = extras[name]
        else:
            raise SystemExit(f"requirements.py: no extra named {name!r} in pyproject.toml")
        for req in reqs:
            match = self_ref.match(req.replace(" ", ""))
            if match:
                for inner in match["extras"].split(","):
                    add(inner.strip())
            elif req not in out:
                out.append(req)

    for name in names:
        add(name)
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    with open(root / "pyproject.toml", "rb") as f:
        print("\n".join(requirements(tomllib.load(f), sys.argv[1:])))
