"""What every timing table prints first: the CPU's vector extensions (timings compare only inside one run)."""
from __future__ import annotations


def cpu_flags() -> str:
    """The CPU's AVX2 / AVX-512 / VNNI flags from /proc/cpuinfo, e.g. ``avx2 avx512f avx512_vnni``."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return " ".join(found) or "none of avx2/avx512f/vnni"
