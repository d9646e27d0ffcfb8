"""torch.distributed: two CPU processes (gloo) give the same bits, metrics and model bytes as one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_images, tiny_model, write_images

from vitq import distributed
from vitq.artifact import artifact_files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(search: str):
    """Greedy MP on a tiny DeiT and a sharded evaluation of it; what a rank returns."""
    import vitq
    from vitq.evaluation import evaluate
    from vitq.methods.greedy_mp import Budget

    torch.set_num_threads(1)
    model, size = tiny_model("deit")
    x = tiny_images(size, n=16)
    labels = torch.arange(16) % 3
    res = vitq.quantize(model, x, budget=Budget(w_bits=5, a_bits=6), progress=False,
                        search=vitq.SearchOptions(search=search) if search == "greedy" else None)
    state, _ = artifact_files(res.model, {"model": "tiny"})
    images, labels = distributed.shard(list(x)), distributed.shard(list(labels))
    ev = evaluate(res.model, (torch.stack(images), torch.stack(labels)), reference=model, progress=False,
                  per_image=True)
    return {"bits": res.report["mixed"]["layers"], "probes": res.report["mixed"]["probes"],
            "state": {k: v.clone() for k, v in state.items()}, "eval": ev.to_dict()}


def _worker(rank: int, world: int, port: int, search: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    assert distributed.init(torch.device("cpu"))
    try:
        result = _job(search)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("search", ["knapsack", "greedy"])
def test_two_processes_give_one_process_bits_metrics_and_bytes(tmp_path, search):
    single = _job(search)
    mp.spawn(_worker, args=(2, _free_port(), search, str(tmp_path / "r")), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        assert got["bits"] == single["bits"]
        assert got["probes"] == single["probes"]  # every process's probes are counted once
        assert got["state"].keys() == single["state"].keys()
        assert all(torch.equal(got["state"][k], single["state"][k]) for k in single["state"])
        a, b = got["eval"], single["eval"]
        for key in ("n_images", "top1", "ref_top1", "agreement", "top1_delta_se", "agreement_se"):
            assert a[key] == b[key], key
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-6) and a["kl_se"] == pytest.approx(b["kl_se"], rel=1e-5)
        assert a["per_image"]["agree"] == b["per_image"]["agree"]  # gathered back into the images' order


def test_split_map_and_interleave_without_a_process_group():
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.split_map(lambda v: v * 2, [1, 2, 3]) == [2, 4, 6]
    assert distributed.interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]
    assert distributed.shard([5, 6, 7]) == [5, 6, 7]


@pytest.mark.skipif(not (sys.platform.startswith("linux")), reason="torchrun needs a POSIX launcher here")
def test_vitq_eval_under_torchrun_writes_once_and_equals_one_process(tmp_path):
    names = write_images(tmp_path / "imgs", ["n01440764", "n01443537"] * 5, layout="flat", size=64)
    assert len(names) == 10
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = ["eval", "deit_tiny", "--random-init", "--data", str(tmp_path / "imgs"), "--workers", "0",
            "--batch-size", "4"]
    one = subprocess.run([sys.executable, "-m", "vitq", *base, "--out", str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "vitq", *base, "--out",
                          str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("top1=") == 1 and "processes=2" in two.stdout  # rank 0 alone reports
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["n_images"] == b["n_images"] == 10
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
