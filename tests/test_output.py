"""vitq.output: destinations are checked, locked, written under a temporary name and never replace what vitq
did not write."""
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from vitq.io import dumps, is_output_json, output_json
from vitq.output import MARKER, OutputError, destination, write_marker


def _fill(folder):
    (folder / "a.txt").write_text("new")
    write_marker(folder, "test")


def test_new_folder_is_written_marked_and_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with destination(tmp_path / "x" / "out") as folder:
            _fill(folder)
    finally:
        os.umask(old)
    out = tmp_path / "x" / "out"
    assert (out / "a.txt").read_text() == "new" and (out / MARKER).is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 and stat.S_IMODE((out / "a.txt").stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["out"]  # no lock or temporary left


def test_existing_paths_that_vitq_did_not_write_are_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.jpg").write_text("x")
    (tmp_path / "file.txt").write_text("x")
    for p in ("mine", "file.txt"):
        with pytest.raises(OutputError, match="vitq did not write"):
            with destination(tmp_path / p, overwrite=True):
                pass
    assert (tmp_path / "mine" / "keep.jpg").read_text() == "x" and (tmp_path / "file.txt").read_text() == "x"


def test_an_earlier_result_is_replaced_only_with_overwrite(tmp_path):
    with destination(tmp_path / "out") as folder:
        _fill(folder)
    with pytest.raises(OutputError, match="give --overwrite"):
        with destination(tmp_path / "out"):
            pass
    with destination(tmp_path / "out", overwrite=True) as folder:
        (folder / "b.txt").write_text("newer")
        write_marker(folder, "test")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.txt", MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("out,inp", [("data", "data"), ("data/sub", "data"), (".", "data")])
def test_out_inside_or_holding_an_input_is_refused(tmp_path, monkeypatch, out, inp):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(OutputError, match="input"):
        with destination(out, inputs=[inp]):
            pass


def test_interruption_removes_the_temporary_and_keeps_the_previous_result(tmp_path):
    with destination(tmp_path / "out") as folder:
        _fill(folder)
    with pytest.raises(KeyboardInterrupt):
        with destination(tmp_path / "out", overwrite=True) as folder:
            (folder / "half.txt").write_text("partial")
            raise KeyboardInterrupt
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_places_are_refused_before_the_work(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        with destination(tmp_path / "f" / "out"):
            raise AssertionError("the block must not run")
    with pytest.raises(OutputError, match="root"):
        with destination("/"):
            raise AssertionError("the block must not run")


def test_files_are_replaced_only_when_vitq_wrote_them(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"user": 1}')
    with pytest.raises(OutputError, match="vitq did not write"):
        with destination(path, kind="file", overwrite=True, is_ours=is_output_json):
            pass
    path.write_text(dumps(output_json({"top1": 1.0}, "eval")))
    with destination(path, kind="file", overwrite=True, is_ours=is_output_json) as tmp:
        tmp.write_text(dumps(output_json({"top1": 2.0}, "eval")))
    assert '"top1": 2.0' in path.read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_strict_json_has_no_nan_tokens():
    assert dumps({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{\n  "a": null,\n  "b": [\n    null,\n    1.5\n  ]\n}'


def test_a_second_run_on_a_locked_destination_is_refused_naming_the_first(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from vitq.output import destination
        with destination({str(tmp_path / 'out')!r}) as folder:
            print("locked", flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"another vitq run \\(pid {holder.pid}"):
            with destination(tmp_path / "out"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with destination(tmp_path / "out") as folder:  # a dead holder's lock is free again
        _fill(folder)
