"""What the timing benchmarks share: the CPU's vector extensions, printed first (timings compare only inside
one run), an ONNX Runtime session and a median timer."""
from __future__ import annotations

import statistics
import time


def cpu_flags() -> str:
    """The CPU's AVX2 / AVX-512 / VNNI flags from /proc/cpuinfo, e.g. ``avx2 avx512f avx512_vnni``."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return " ".join(found) or "none of avx2/avx512f/vnni"


def ort_session(path: str, threads: int, profile_prefix: str | None = None):
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (and a profile when a prefix is given)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def median_ms(fn, warmup: int, runs: int) -> float:
    """The median of ``runs`` timed calls of ``fn`` after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)
