"""Every bad input a user can give, one row each: the command, its exit code, a piece of its one-line
message, and a check that nothing that existed before the run changed on disk.

Run as a script (``python tests/test_bad_inputs.py``) it runs every case and prints the "Bad inputs"
table of docs/results.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import write_images  # noqa: E402

SYN = ["n01440764", "n01443537", "n01484850", "n15075141", "n02085620", "n02099601"]


@dataclass
class Case:
    """One row: ``argv(ws)`` builds the command (and any files it needs) in the workspace ``ws``."""

    name: str
    argv: Callable[[Path], list[str]]
    code: int
    needle: str
    early: bool = True  # refused before any calibration (no "methods:" line printed)
    check: Callable[[Path, str], None] | None = None  # more checks on (ws, stdout) after a run
    process: Callable[[Path, list[str]], tuple[int, str, str]] | None = None  # run in a subprocess this way
    setup: Callable[[Path], Callable[[], None]] | None = None  # returns its own cleanup
    replaces: str | None = None  # an earlier vitq result the run may replace (asked for with --overwrite)


# ---- the workspace every case runs in: images, lists, a user's folder and file, a vitq artifact

def _q(ws: Path, *extra: str) -> list[str]:
    return ["quantize", "deit_tiny", "--random-init", "--method", "minmax", "--calib", "img", "--calib-list", "calib.txt", "--eval", "img",
            "--eval-list", "eval.txt", "--workers", "0", "-q", *extra]


def make_workspace(ws: Path) -> None:
    from vitq.cli import main

    names = write_images(ws / "img", SYN, size=48)
    (ws / "calib.txt").write_text("\n".join(names[:2]) + "\n")
    (ws / "eval.txt").write_text("\n".join(names[2:]) + "\n")
    (ws / "userdir").mkdir()
    (ws / "userdir" / "notes.txt").write_text("my notes\n")
    (ws / "afile.txt").write_text("keep me\n")
    with _in(ws), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(_q(ws, "--out", "art")) == 0


def _copy_artifact(ws: Path, name: str, edit: Callable[[dict], None] | None = None) -> str:
    if not (ws / name).exists():
        shutil.copytree(ws / "art", ws / name)
        if edit is not None:
            meta = json.loads((ws / name / "config.json").read_text())
            edit(meta)
            (ws / name / "config.json").write_text(json.dumps(meta))
    return name


def _first_spec(meta: dict) -> dict:
    return meta["specs"]["blocks.0.attn.qkv.in_quant"] if "blocks.0.attn.qkv.in_quant" in meta["specs"] else \
        next(iter(meta["specs"].values()))


def _config(ws: Path, name: str, data) -> str:
    (ws / name).write_text(json.dumps(data))
    return name


def _checkpoint(ws: Path, name: str, key: str, value: float) -> str:
    if not (ws / name).exists():
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        state = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
        save_file({k: v.contiguous() for k, v in state.items()}, str(ws / name))
    return name


def _png16(ws: Path) -> list[str]:
    (ws / "img16").mkdir(exist_ok=True)
    Image.fromarray(np.full((48, 48), 40000, dtype=np.uint16)).save(ws / "img16" / "n01440764_deep.png")
    return ["eval", "deit_tiny", "--random-init", "--data", "img16", "--workers", "0"]


def _bad_image(ws: Path, folder: str) -> None:
    shutil.copytree(ws / "img", ws / folder, dirs_exist_ok=True)
    (ws / folder / "n01443537_broken.JPEG").write_bytes(b"not a jpeg")


def _list_with(ws: Path, name: str, lines: list[str]) -> str:
    (ws / name).write_text("\n".join(lines) + "\n")
    return name


def _lines(ws: Path, name: str) -> list[str]:
    return (ws / name).read_text().split()


# ---- checks after a run

def _strict_report(ws: Path, out: str) -> None:
    def refuse(token):
        raise AssertionError(f"report.json holds {token}")

    json.loads((ws / "q_ok" / "report.json").read_text(), parse_constant=refuse)


def _modes(ws: Path, out: str) -> None:
    folder = ws / "q_umask"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def _random_init_onnx(ws: Path, out: str) -> None:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(ws / "r.onnx")).metadata_props}
    assert meta["vitq_random_init"] == "true" and meta["vitq_format"].startswith("vitq-onnx")
    assert "RANDOM-INIT" in out


def _says(text: str) -> Callable[[Path, str], None]:
    def check(ws, out):
        assert text in out, out
    return check


# ---- cases that need another process

def _lock_holder(ws: Path) -> Callable[[], None]:
    script = textwrap.dedent("""
        import time
        from vitq.output import destination
        with destination("q_locked"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ws, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"

    def stop():
        p.kill()
        p.wait()
    return stop


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _signal_at_start(ws: Path, argv: list[str]) -> tuple[int, str, str]:
    argv = [a for a in argv if a != "-q"]  # the plan's "methods:" line marks the start of the work
    p = subprocess.Popen([sys.executable, "-m", "vitq", *argv], cwd=ws, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    time.sleep(0.5)  # python is up, torch is still importing
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


def _sigterm_mid_run(ws: Path, argv: list[str]) -> tuple[int, str, str]:
    argv = [a for a in argv if a != "-q"]  # the plan's "methods:" line marks the start of the work
    p = subprocess.Popen([sys.executable, "-m", "vitq", *argv], cwd=ws, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    out = ""
    for line in p.stdout:
        out += line
        if line.startswith("methods:"):
            time.sleep(1.0)
            p.send_signal(signal.SIGTERM)
            break
    rest, err = p.communicate(timeout=120)
    return p.returncode, out + rest, err


def _workers(ws: Path, argv: list[str]) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "vitq", *argv], cwd=ws, capture_output=True, text=True, env=_env(),
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


CASES = [
    # 1. nothing a user had is lost
    Case("--out is an existing folder vitq did not write", lambda ws: _q(ws, "--out", "userdir"), 2,
         "exists and is a folder that vitq did not write"),
    Case("... even with --overwrite", lambda ws: _q(ws, "--out", "userdir", "--overwrite"), 2,
         "exists and is a folder that vitq did not write"),
    Case("--out is the image folder (--calib/--eval)", lambda ws: _q(ws, "--out", "img"), 2,
         "is the input img or lies inside it"),
    Case("--out inside the image folder", lambda ws: _q(ws, "--out", "img/result"), 2, "lies inside it"),
    Case("--out is an existing file", lambda ws: _q(ws, "--out", "afile.txt"), 2,
         "exists and is a file that vitq did not write"),
    # 2. one destination, one run
    Case("--out is being written by another run", lambda ws: _q(ws, "--out", "q_locked"), 2,
         "is being written by another vitq run (pid", setup=_lock_holder),
    Case("--out holds an earlier vitq result", lambda ws: _q(ws, "--out", "art"), 2, "give --overwrite to replace it"),
    Case("... with --overwrite: replaced", lambda ws: _q(ws, "--out", _copy_artifact(ws, "art_again"), "--overwrite"),
         0, "", early=False, replaces="art_again"),
    # 3. a bad --out is found before any work
    Case("--out under a file", lambda ws: _q(ws, "--out", "afile.txt/q"), 2, "afile.txt is a file, not a folder"),
    Case("--out .", lambda ws: _q(ws, "--out", "."), 2, "holds the input"),
    Case("--out ..", lambda ws: _q(ws, "--out", ".."), 2, "holds the input"),
    Case("--out where nothing can be written", lambda ws: _q(ws, "--out", "/proc/vitq-out"), 2, "cannot write in /proc"),
    Case("export --out an existing folder", lambda ws: ["export", "art", "--out", "userdir"], 2,
         "exists and is a folder that vitq did not write"),
    Case("export --out an existing file", lambda ws: ["export", "art", "--format", "onnx", "--out", "afile.txt"], 2,
         "exists and is a file that vitq did not write"),
    Case("eval --out an existing file", lambda ws: ["eval", "art", "--data", "img", "--out", "afile.txt"], 2,
         "exists and is a file that vitq did not write"),
    # 4. non-finite values are errors
    Case("a weight of 1e30 (quantize)", lambda ws: [*_q(ws)[:2], *_q(ws)[3:], "--out", "q_big", "--checkpoint",
                                                     _checkpoint(ws, "big.safetensors", "blocks.0.mlp.fc2.weight", 1e30)],
         2, "the float model produces NaN or infinite values, first at layer blocks.1.norm1", early=False),
    Case("a NaN weight (eval)", lambda ws: ["eval", "deit_tiny", "--checkpoint",
                                            _checkpoint(ws, "nan.safetensors", "head.weight", float("nan")),
                                            "--data", "img", "--workers", "0"],
         2, "tensor head.weight holds 1 NaN or infinite value(s)"),
    Case("report.json is strict JSON", lambda ws: _q(ws, "--out", "q_ok"), 0, "", early=False, check=_strict_report),
    # 5. --config and artifacts: one-line errors
    Case("--config rule with an unknown key",
         lambda ws: _q(ws, "--out", "q", "--config", _config(ws, "c1.json", {"rules": [{"pattern": "*", "wbits": 4}]})),
         2, "rules[0] has unknown key(s) wbits"),
    Case("--config rule without pattern",
         lambda ws: _q(ws, "--out", "q", "--config", _config(ws, "c2.json", {"rules": [{"w_bits": 4}]})),
         2, "rules[0] needs a 'pattern' string"),
    Case("--config rules as an object",
         lambda ws: _q(ws, "--out", "q", "--config", _config(ws, "c3.json", {"rules": {"pattern": "*"}})),
         2, "rules must be a list"),
    Case("--config non-string pattern",
         lambda ws: _q(ws, "--out", "q", "--config", _config(ws, "c4.json", {"rules": [{"pattern": 3}]})),
         2, "rules[0] needs a 'pattern' string (a glob over layer names), got 3"),
    Case("--config string percentile",
         lambda ws: _q(ws, "--out", "q", "--config", _config(ws, "c5.json", {"percentile": "99.9"})),
         2, "percentile must be a number, got '99.9'"),
    Case("--config seed \"x\"", lambda ws: _q(ws, "--out", "q", "--config", _config(ws, "c6.json", {"seed": "x"})),
         2, "c6.json: seed must be an integer, got 'x'"),
    Case("artifact without quant_config",
         lambda ws: ["eval", _copy_artifact(ws, "a_noqc", lambda m: m.pop("quant_config")), "--data", "img"],
         2, "required key 'quant_config' is missing"),
    Case("artifact spec with an unknown key",
         lambda ws: ["eval", _copy_artifact(ws, "a_key", lambda m: _first_spec(m).update(colour="red")),
                     "--data", "img"], 2, "has unknown key(s) colour"),
    # 6. artifacts are checked on reload
    Case("artifact bits edited 8 -> 4",
         lambda ws: ["eval", _copy_artifact(ws, "a_bits", lambda m: _first_spec(m).update(bits=4)), "--data", "img"],
         2, "were changed after vitq wrote them"),
    Case("artifact bits 16",
         lambda ws: ["eval", _copy_artifact(ws, "a_b16", lambda m: _first_spec(m).update(bits=16)), "--data", "img"],
         2, "bits must be an integer from 2 to 8, got 16"),
    Case("artifact scheme \"banana\"",
         lambda ws: ["eval", _copy_artifact(ws, "a_ban", lambda m: _first_spec(m).update(scheme="banana")),
                     "--data", "img"], 2, "scheme must be one of uniform, pot, apot, mixed, two_region, got 'banana'"),
    Case("artifact model renamed",
         lambda ws: ["eval", _copy_artifact(ws, "a_model", lambda m: m.update(
             model="vit_tiny_patch16_224.augreg_in21k_ft_in1k")), "--data", "img"],
         2, "the files do not belong together"),
    # 7. data mistakes
    Case("--calib-list equal to --eval-list", lambda ws: [*_q(ws, "--out", "q"), "--calib-list", "eval.txt"], 2,
         "are in both the calibration and the evaluation set"),
    Case("... with --allow-overlap: runs, report says so",
         lambda ws: [*_q(ws, "--out", "q_overlap"), "--calib-list", "eval.txt", "--allow-overlap"], 0, "",
         early=False, check=lambda ws, out: json.loads((ws / "q_overlap" / "report.json").read_text())
         ["data"]["overlap_images"] == 4 or (_ for _ in ()).throw(AssertionError("overlap not reported"))),
    Case("duplicate list lines",
         lambda ws: [*_q(ws, "--out", "q"), "--eval-list",
                     _list_with(ws, "dup.txt", _lines(ws, "eval.txt") + _lines(ws, "eval.txt")[:2])],
         2, "names 2 image(s) more than once"),
    Case("a 16-bit PNG", _png16, 0, "", early=False),
    Case("unreadable calibration image with --skip-bad-images",
         lambda ws: (_bad_image(ws, "img_bad1"), ["quantize", "deit_tiny", "--random-init", "--method", "minmax", "--calib", "img_bad1",
                     "--calib-list", _list_with(ws, "cbad.txt", [*_lines(ws, "calib.txt"), "n01443537_broken.JPEG"]),
                     "--eval", "img", "--eval-list", "eval.txt", "--workers", "0", "-q", "--skip-bad-images",
                     "--out", "q_skip"])[1],
         0, "", early=False, check=_says("skipped 1 unreadable calibration image(s)")),
    Case("unreadable evaluation image with --skip-bad-images",
         lambda ws: (_bad_image(ws, "img_bad2"), ["eval", "deit_tiny", "--random-init", "--data", "img_bad2",
                                                  "--workers", "0", "--skip-bad-images"])[1],
         0, "", early=False, check=_says("skipped 1 unreadable evaluation image(s)")),
    Case("unreadable image in a DataLoader worker",
         lambda ws: (_bad_image(ws, "img_bad3"), ["eval", "deit_tiny", "--random-init", "--data", "img_bad3",
                                                  "--workers", "2"])[1],
         2, "cannot read image", early=False, process=_workers),
    # 8. refused at once, interrupted cleanly
    Case("--budget-w 2 with candidates 4..8", lambda ws: _q(ws, "--out", "q", "--budget-w", "2"), 2,
         "--budget-w 2.0 is unreachable: the weight candidates (4, 5, 6, 8) average at least 4 bits"),
    Case("--budget-mb 0", lambda ws: _q(ws, "--out", "q", "--budget-mb", "0"), 2,
         "--budget-mb must be a positive finite number, got 0.0"),
    Case("--budget-mb -1", lambda ws: _q(ws, "--out", "q", "--budget-mb", "-1"), 2,
         "--budget-mb must be a positive finite number"),
    Case("--budget-mb nan", lambda ws: _q(ws, "--out", "q", "--budget-mb", "nan"), 2,
         "--budget-mb must be a positive finite number, got nan"),
    Case("--budget-mb below what 4 bits give", lambda ws: _q(ws, "--out", "q", "--budget-mb", "1"), 2,
         "--budget-mb 1.0 is unreachable: with every weight at 4 bits the model takes"),
    Case("Ctrl-C during start-up", lambda ws: ["models"], 130, "interrupted while starting", process=_signal_at_start),
    Case("SIGTERM during a run",
         lambda ws: _q(ws, "--out", "q_term", "--w-bits", "4", "--a-bits", "4", "--method", "mptq"), 143,
         "stopped by SIGTERM; no partial output was written", early=False, process=_sigterm_mid_run),
    Case("eval on a folder without config.json", lambda ws: ["eval", "userdir", "--data", "img"], 2,
         "is a folder but not a vitq artifact"),
    # 9. small things
    Case("files honour the umask (022)", lambda ws: _q(ws, "--out", "q_umask"), 0, "", early=False, check=_modes),
    Case("ONNX export of a random-init artifact", lambda ws: ["export", "art", "--format", "onnx", "--out", "r.onnx"],
         0, "", early=False, check=_random_init_onnx),
]


# ---- running a case

def snapshot(ws: Path) -> dict[str, str]:
    """Every path under ``ws``: a file's SHA-256, or "dir"."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = str(p.relative_to(ws))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def _in(folder: Path):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


@dataclass
class Outcome:
    code: int
    message: str  # the error line, or the last line printed
    stdout: str
    stderr: str
    lost: list[str] = field(default_factory=list)  # paths that existed before and changed or vanished
    added: list[str] = field(default_factory=list)


def run_case(case: Case, ws: Path) -> Outcome:
    from vitq.cli import main

    argv = [str(a) for a in case.argv(ws)]
    cleanup = case.setup(ws) if case.setup else None
    before = snapshot(ws)
    old_umask = os.umask(0o022)
    try:
        if case.process is not None:
            code, out, err = case.process(ws, argv)
        else:
            o, e = io.StringIO(), io.StringIO()
            with _in(ws), contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
                code = main(argv)
            out, err = o.getvalue(), e.getvalue()
    finally:
        os.umask(old_umask)
        if cleanup:
            cleanup()
    after = snapshot(ws)
    lost = [k for k, v in before.items() if after.get(k) != v
            and not (case.replaces and (k == case.replaces or k.startswith(case.replaces + "/")))]
    added = [k for k in after if k not in before]
    errors = [ln for ln in err.splitlines() if ln.startswith("vitq:")]
    message = errors[-1] if errors else (out.strip().splitlines() or [""])[-1]
    return Outcome(code, message, out, err, lost, added)


def verify(case: Case, r: Outcome, ws: Path) -> None:
    assert r.code == case.code, (r.code, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not r.lost, f"changed or removed: {r.lost}"
    assert not [a for a in r.added if Path(a).name.startswith(".")], f"hidden leftovers: {r.added}"
    if case.code != 0:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("vitq:")]
        assert len(errors) == 1 and case.needle in errors[0], r.stderr[-2000:]
        assert not r.added, f"a refused run left {r.added}"
        if case.early:
            assert "methods:" not in r.stdout, "refused only after the work started"
    if case.check is not None:
        case.check(ws, r.stdout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bad_inputs")
    make_workspace(ws)
    return ws


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, workspace):
    verify(case, run_case(case, workspace), workspace)


def main() -> int:
    """Run every case in a fresh workspace and print the table (case | exit code | message | anything lost?)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="vitq-bad-inputs-") as d:
        ws = Path(d)
        make_workspace(ws)
        print("| case | exit code | message | anything lost? |")
        print("|---|---|---|---|")
        failed = 0
        for case in CASES:
            r = run_case(case, ws)
            try:
                verify(case, r, ws)
                ok = ""
            except AssertionError as exc:
                failed += 1
                ok = f" **FAILED: {str(exc).splitlines()[0][:80]}**"
            msg = r.message.replace(str(ws), "WS").replace("|", "\\|")
            lost = ", ".join(r.lost) if r.lost else "no"
            print(f"| {case.name} | {r.code} | `{msg}`{ok} | {lost} |", flush=True)
        print(f"\n{len(CASES) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
