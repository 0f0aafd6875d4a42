"""The CPU the kernels are compiled for (Numba's own rule), and the packed layout that follows from
it: plain Python, choosing it compiles nothing."""

from __future__ import annotations


def _target_features() -> set[str]:
    """The CPU features Numba compiles for, by Numba's own rule: NUMBA_CPU_FEATURES when set
    (NUMBA_CPU_NAME=generic sets it empty), else the host's."""
    from numba.core import config

    if config.CPU_FEATURES is not None:
        flat = config.CPU_FEATURES
    else:
        import llvmlite.binding as llvm

        flat = llvm.get_host_cpu_features().flatten()
    return {f[1:] for f in flat.split(",") if f.startswith("+")}


def _has_vnni(feats) -> bool:
    """x86 vpdpbusd on 256-bit vectors: AVX-VNNI, or AVX-512 VNNI with VL."""
    return "avxvnni" in feats or {"avx512vnni", "avx512vl"} <= feats


def maddubs_intrinsics(feats, lanes: int) -> tuple[str, str] | None:
    """x86 without VNNI: the LLVM names of vpmaddubsw (unsigned x signed bytes -> pairs of int16)
    and vpmaddwd (pairs -> int32) at this vector width, or None where the portable IR is used
    (x86 without AVX2: the generic target's tests check that path)."""
    if not _x86():
        return None
    if lanes == 16 and "avx512bw" in feats:
        return "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"
    if lanes == 8 and "avx2" in feats:
        return "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"
    return None


def _arch() -> str:
    import llvmlite.binding as llvm

    return llvm.get_process_triple().split("-")[0]


def _x86() -> bool:
    return _arch() in ("x86_64", "i386", "i686")


def _native_half(feats) -> bool:
    """Whether LLVM converts half <-> float inline (x86 without F16C makes it a libcall that
    Numba's JIT cannot link)."""
    return "f16c" in feats or not _x86()


def packing() -> tuple[int, bool]:
    """(LANES, whether Q8_0 quants are stored unsigned): the packed layout the compiled kernels of
    this CPU target expect.  Plain Python: choosing it compiles nothing."""
    feats = _target_features()
    if {"avx512f", "avx512bw"} <= feats:
        lanes = 16
    elif "avx2" in feats:
        lanes = 8
    else:
        lanes = 4
    return lanes, _has_vnni(feats) and lanes in (8, 16)


def target_summary() -> str:
    """What the quantized kernels compile to here, e.g. 'x86_64, 16 lanes, vpdpbusd (VNNI)'."""
    feats = _target_features()
    lanes, _ = packing()
    if _has_vnni(feats):
        dot = "vpdpbusd (VNNI)"
    elif _arch() == "aarch64" and "dotprod" in feats:
        dot = "sdot (dotprod)"
    elif maddubs_intrinsics(feats, lanes):
        dot = "vpmaddubsw + vpmaddwd"
    else:
        dot = "portable int8 IR"
    return f"{_arch()}, {lanes} lanes, {dot}"


def tile_tokens() -> int:
    """Tokens per prompt tile: 8 where 32 vector registers hold the accumulators, else 4."""
    return 8 if packing()[0] == 16 else 4
