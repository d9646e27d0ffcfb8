"""File output that never loses anything: strict JSON, atomic writes, umask-honouring temporaries.

Every file is written to a temporary name in its own folder, then renamed, so an interrupted run never
leaves a half-written file. Safe *destinations* (refusing paths vitq did not write, locking, cleanup on
signals) are in :mod:`vitq.output`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

# Every JSON file vitq writes as a result carries this key, so a later run can tell its own files from a
# user's (``vitq ... --out FILE --overwrite`` replaces only those).
OUTPUT_KEY = "vitq_output"


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    old = os.umask(0o022)
    os.umask(old)
    return old


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the mode an ordinary ``open`` would give."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~umask())


def strict(obj):
    """``obj`` with every non-finite float replaced by None, so it serializes as strict JSON (RFC 8259).

    vitq refuses non-finite results before it writes them; this guards diagnostics that may be undefined
    (e.g. a ratio over zero), which are written as ``null``.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON text (no NaN/Infinity tokens), indented by default."""
    kwargs.setdefault("indent", 2)
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented strict JSON to ``path`` atomically."""
    atomic_write_text(path, dumps(obj))


def output_json(obj: dict, kind: str) -> dict:
    """``obj`` marked as a vitq result of ``kind`` (see :data:`OUTPUT_KEY`)."""
    return {OUTPUT_KEY: kind, **obj}


def is_output_json(path: str | os.PathLike) -> bool:
    """True for a JSON file that vitq wrote as a result (it carries :data:`OUTPUT_KEY`)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get(OUTPUT_KEY), str)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with byte-reproducible output.

    safetensors writes the metadata keys in hash-map order, which changes from run to run; the header is
    rewritten in place with the keys sorted (the same bytes, reordered, so every offset stays valid).
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
        text = json.dumps(ordered, separators=(",", ":")).encode()
        if len(text) != len(raw.rstrip(b" ")):
            return  # a header this writer would not reproduce byte for byte: leave it as safetensors wrote it
        f.seek(8)
        f.write(text.ljust(n, b" "))
