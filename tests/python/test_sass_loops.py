"""bench/sass_loops.py reads kernels' main loops out of `cuobjdump -sass` text: the parsing and the
loop choice are checked here on a hand-written listing (no CUDA tools needed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def _load():
    path = Path(__file__).resolve().parents[2] / "bench" / "sass_loops.py"
    spec = importlib.util.spec_from_file_location("sass_loops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Two kernels. The first has a setup loop (no loads, skipped), a key loop with tensor-core
# instructions, and an epilogue loop that jumps back into the key loop's tail (fewer HGMMA: not it).
# The second is a CUDA-core kernel whose main loop is the one with global loads.
LISTING = """
        code for sm_90a
                Function : _ZN8batchllm7kernels4cuda22attention_wgmma_kernelI13__nv_bfloat16Li128EEEv
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;               /* 0x00000a00ff017b82 */
        /*0010*/                   IMAD.MOV.U32 R2, RZ, RZ, RZ ;        /* 0x000000ffff027224 */
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;              /* 0x0000000102027810 */
        /*0030*/              @!P0 BRA 0x20 ;                           /* 0xfffffffc00e08947 */
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;        /* 0x0000000000007b1d */
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R88, R148, gdesc[UR12], RZ, !UPT ;  /* 0x00 */
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R88, R144, gdesc[UR12], R88, gsb0 ; /* 0x00 */
        /*0070*/                   LDGSTS.E.BYPASS.128 [R24], desc[UR10][R26.64], !P0 ;       /* 0x00 */
        /*0080*/                   MUFU.EX2 R4, R4 ;                    /* 0x0000000400047308 */
        /*0090*/                   FFMA R5, R5, UR4, -R6 ;              /* 0x0000000405057c23 */
        /*00a0*/               @P1 BRA 0x40 ;                           /* 0xffffff9000001947 */
        /*00b0*/                   HGMMA.64x128x16.F32.BF16 R24, R152, gdesc[UR12].tnspB, R24 ; /* 0x0 */
        /*00c0*/                   STG.E desc[UR10][R8.64], R4 ;        /* 0x0000000408007986 */
        /*00d0*/               @P2 BRA 0x80 ;                           /* 0xffffffb000002947 */
        /*00e0*/                   EXIT ;                               /* 0x000000000000794d */
                ..........

                Function : _ZN8batchllm7kernels4cuda18decode_rows_kernelI13__nv_bfloat16Li64ELi4EEEvNS1_14DecodeRowsArgsE
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;     /* 0x0000000402047981 */
        /*0010*/                   FFMA R8, R4, R5, R8 ;                /* 0x0000000504087223 */
        /*0020*/                   SHFL.BFLY PT, R9, R8, 0x1, 0x1f ;    /* 0x0c201f0008097f89 */
        /*0030*/               @P0 BRA 0x0 ;                            /* 0xfffffffc00000947 */
        /*0040*/                   EXIT ;                               /* 0x000000000000794d */
"""


def test_parse_and_main_loops():
    sass_loops = _load()
    functions = sass_loops.parse_sass(LISTING)
    assert len(functions) == 2
    wgmma, decode = functions.values()
    assert len(wgmma) == 15 and wgmma[5] == (0x50, "HGMMA.64x64x16.F32.BF16 R88, R148, gdesc[UR12], RZ, !UPT")
    assert sass_loops.opcode("@!P0 LDGSTS.E.BYPASS.128 [R24], desc[UR10][R26.64], !P0") == "LDGSTS"

    rows = {row["kernel"]: row for row in sass_loops.loop_rows(functions)}
    key_loop = rows[next(k for k in rows if "wgmma" in k)]
    # 0x40 .. 0xa0: barrier, 2 HGMMA, the copy, softmax, branch (the epilogue loop 0x80 .. 0xd0 has 1).
    assert key_loop["loop"] == 7
    assert key_loop["ops"]["HGMMA"] == 2 and key_loop["ops"]["LDGSTS"] == 1 and "STG" not in key_loop["ops"]
    decode_loop = rows[next(k for k in rows if "decode_rows" in k)]
    assert decode_loop["loop"] == 4 and decode_loop["ops"] == {"LDG": 1, "FFMA": 1, "SHFL": 1, "BRA": 1}

    assert sass_loops.short_name(next(k for k in rows if "decode_rows" in k)) == "decode_rows_kernel bf16 d=64 4 heads"
    # The wgmma tiles' names carry warps, pipelining and (wgmma-k128) keys a step.
    prefix = "_ZN8batchllm7kernels4cuda22attention_wgmma_kernelI13__nv_bfloat16Li128ENS1_5PrefillProblemIS3_EE"
    assert sass_loops.short_name(prefix + "Li8ELb1ELi64EEEvT1_") == "attention_wgmma_kernel bf16 d=128 Prefill 8 warps pipe"
    assert (sass_loops.short_name(prefix + "Li8ELb1ELi128EEEvT1_")
            == "attention_wgmma_kernel bf16 d=128 Prefill 8 warps pipe 128 keys")
    # A filter keeps only the matching kernels.
    assert [r["kernel"] for r in sass_loops.loop_rows(functions, "decode_rows")] == [
        next(k for k in rows if "decode_rows" in k)]
