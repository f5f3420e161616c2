"""Static instruction counts of the attention kernels' key loops, from their SASS (no GPU needed).

Where no GPU is at hand this is the one number a kernel change can be checked against before it is
timed: how many instructions a warp issues per key tile (or per decode step) of the main loop, and of
which kind. A loop is a backward branch; the main loop of a kernel is the largest one that holds its
tensor-core instructions (HGMMA / HMMA) or, for the CUDA-core decode kernel, its global loads. The
count is static: a loop body with both the masked and the unmasked softmax counts both.

    python bench/sass_loops.py --compile            # nvcc the attention sources for sm_90a, then count
    python bench/sass_loops.py build/x.cubin        # count an existing cubin
    python bench/sass_loops.py --filter decode_rows --compile

Needs nvcc (for --compile) and cuobjdump: from the CUDA toolkit or the `nvidia-cuda-cuobjdump` wheel
(`pip install nvidia-cuda-cuobjdump`; found through CUOBJDUMP, PATH, or the wheel's bin directory).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["csrc/kernels/cuda/prefill_attention.cu", "csrc/kernels/cuda/cascade_decode_attention.cu"]
_FUNCTION = re.compile(r"Function : (\S+)")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> its (address, instruction) list, from `cuobjdump -sass` output."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        match = _FUNCTION.search(line)
        if match:
            current = match.group(1)
            functions[current] = []
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            functions[current].append((int(match.group(1), 16), match.group(2)))
    return functions


def opcode(instruction: str) -> str:
    """The opcode without predicate and modifiers: '@!P0 LDGSTS.E.BYPASS.128 [..]' -> 'LDGSTS'."""
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def main_loop(instructions: list[tuple[int, str]]) -> list[str] | None:
    """The backward-branch body with the most tensor-core instructions (HGMMA / HMMA), else the most
    global loads (LDG / LDGSTS); the largest such body on a tie. (ptxas lays out some epilogues as
    loops that jump back into the key loop's tail: those hold fewer of either.)"""
    best, best_key = None, (0, 0, 0)
    for address, text in instructions:
        match = _BRANCH.search(text)
        if not match or int(match.group(1), 16) >= address:
            continue
        target = int(match.group(1), 16)
        body = [t for a, t in instructions if target <= a <= address]
        ops = collections.Counter(opcode(t) for t in body)
        key = (ops["HGMMA"] + ops["HMMA"], ops["LDG"] + ops["LDGSTS"], len(body))
        if key[:2] != (0, 0) and key > best_key:
            best, best_key = body, key
    return best


def loop_rows(functions: dict[str, list[tuple[int, str]]], name_filter: str = "") -> list[dict]:
    rows = []
    for name, instructions in functions.items():
        if name_filter and not re.search(name_filter, name):
            continue
        body = main_loop(instructions)
        if body is None:
            continue
        counts = collections.Counter(opcode(t) for t in body)
        rows.append({"kernel": name, "instructions": len(instructions), "loop": len(body),
                     "ops": dict(counts.most_common())})
    return rows


def find_cuobjdump() -> str:
    candidates = [os.environ.get("CUOBJDUMP", ""), shutil.which("cuobjdump") or ""]
    for site in sys.path:
        candidates += glob.glob(os.path.join(site, "nvidia", "cu*", "bin", "cuobjdump"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("sass_loops: cuobjdump not found (CUDA toolkit, or pip install nvidia-cuda-cuobjdump)")


def compile_cubins(out_dir: str, arch: str) -> list[str]:
    cubins = []
    for source in SOURCES:
        cubin = os.path.join(out_dir, Path(source).stem + ".cubin")
        subprocess.run(["nvcc", "-DBATCHLLM_WITH_CUDA=1", "-DBATCHLLM_CUDA_HAS_SM90A=1", "-I", str(ROOT / "include"),
                        "-I", str(ROOT / "csrc"), "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                        "--expt-relaxed-constexpr", "-cubin", "-o", cubin, str(ROOT / source)], check=True)
        cubins.append(cubin)
    return cubins


def short_name(kernel: str) -> str:
    """A readable kernel name: template, dtype, head dim and problem of a mangled name."""
    match = re.search(r"cuda\d+(\w+?_kernel)I(\d*_*\w+?)Li(\d+)E(?:.*?(Prefill|Prefix)Problem)?", kernel)
    if not match:
        return kernel[:80]
    dtype = "bf16" if "bfloat16" in match.group(2) else "fp16"
    warps = re.search(r"EELi(\d+)E(?:Lb([01])E)?(?:Li(\d+)E)?", kernel)
    variant = ""
    if warps:
        variant = f" {warps.group(1)} warps" + (" pipe" if warps.group(2) == "1" else "")
        if warps.group(3) and warps.group(3) != "64":  # the wgmma tiles' keys a step (wgmma-k128)
            variant += f" {warps.group(3)} keys"
    heads = re.search(r"Li\d+ELi(\d+)EEEvNS1_14DecodeRowsArgs", kernel)
    if heads:
        variant = f" {heads.group(1)} heads"
    return f"{match.group(1)} {dtype} d={match.group(3)} {match.group(4) or ''}{variant}".replace("  ", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cubins", nargs="*")
    parser.add_argument("--compile", action="store_true", help="nvcc the attention sources first")
    parser.add_argument("--arch", default="90a")
    parser.add_argument("--filter", default="bfloat16", help="regex on the mangled kernel name")
    args = parser.parse_args(argv)
    cuobjdump = find_cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        cubins = list(args.cubins) + (compile_cubins(tmp, args.arch) if args.compile else [])
        if not cubins:
            parser.error("give cubins or --compile")
        rows = []
        for cubin in cubins:
            sass = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
            rows += loop_rows(parse_sass(sass), args.filter)
    print(f"{'kernel':60s} {'loop':>5s}  top opcodes")
    for row in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(row["ops"].items())[:8])
        print(f"{short_name(row['kernel']):60s} {row['loop']:5d}  {top}")
    print(json.dumps({"bench": "sass_loops", "arch": args.arch,
                      "loops": [{"kernel": short_name(r["kernel"]), "loop": r["loop"], "ops": r["ops"]} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
