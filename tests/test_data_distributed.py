"""Two real data-parallel ranks (gloo, 2 processes) on the streaming loader:
coverage without duplicates, resume of a 2-rank state on 1 rank, identical batches for two
ranks sharing a DP rank (the TP > 1 case, one machine), and documents-layout row dealing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miras_pretrain.testing.local_launch import free_port

from test_data_loader import cfg_for, id_rows, synthetic_docs, write_docs, write_rows

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]
N, T, B = 24, 8, 2


def _rank_main(work: str) -> None:
    """Body of one rank (run in a child process)."""
    import torch.distributed as dist

    from miras_pretrain.data import build_train_loader

    work = Path(work)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {}
    # 1) packed, DP=2: two steps, checkpoint, then the rest of the epoch
    cfg = cfg_for(str(work / "rows"), "packed", T, work / "cache", shuffle=True,
                  micro_batch_size=B, num_workers=1)
    with build_train_loader(cfg, dp_rank=rank, dp_world_size=2) as ld:
        it = iter(ld)
        before = [int(x) - 100 for _ in range(2) for x in next(it)["input_ids"][:, 0]]
        state = ld.state_dict()
        after = [int(x) - 100 for _ in range(4) for x in next(it)["input_ids"][:, 0]]
    gathered = [None, None]
    dist.all_gather_object(gathered, {"before": before, "after": after, "state": state})
    out["packed"] = gathered
    # 2) TP-like: both processes are DP rank 0 of 1 -> identical batches, no shm collision
    dcfg = cfg_for(str(work / "docs"), "documents", T, work / "cache", shuffle=True,
                   micro_batch_size=B, num_workers=1)
    with build_train_loader(dcfg, dp_rank=0, dp_world_size=1) as ld:
        it = iter(ld)
        rows = [next(it)["input_ids"].tolist() for _ in range(3)]
    gathered = [None, None]
    dist.all_gather_object(gathered, rows)
    out["tp_same"] = gathered[0] == gathered[1]
    # 3) documents, DP=2: rank r gets rows [4s + 2r, 4s + 2r + 2) of the global row order
    with build_train_loader(dcfg, dp_rank=rank, dp_world_size=2) as ld:
        it = iter(ld)
        mine = [next(it)["input_ids"].tolist() for _ in range(2)]
    gathered = [None, None]
    dist.all_gather_object(gathered, mine)
    out["docs_rows"] = gathered
    dist.barrier()
    if rank == 0:
        (work / "result.json").write_text(json.dumps(out))
    dist.destroy_process_group()




def test_two_ranks_cover_resume_and_share(tmp_path):
    write_rows(tmp_path / "rows", id_rows(N, T))
    write_docs(tmp_path / "docs", synthetic_docs(40, seed=4))
    port = free_port()
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]; "
            f"import test_data_distributed as m; m._rank_main({str(tmp_path)!r})")
    procs = []
    try:
        for rank in range(2):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1",
                       TMPDIR=str(tmp_path))
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())

    packed = res["packed"]
    assert packed[0]["state"] == packed[1]["state"]
    assert packed[0]["state"]["sample_in_epoch"] == 2 * 2 * B
    everything = [i for r in packed for i in r["before"] + r["after"]]
    assert sorted(everything) == list(range(N)), "2 ranks: every sample once, none missing"
    assert not set(packed[0]["before"] + packed[0]["after"]) & set(
        packed[1]["before"] + packed[1]["after"])

    # the 2-rank checkpoint resumed on 1 rank yields exactly the samples not yet consumed
    from miras_pretrain.data import build_train_loader

    cfg = cfg_for(str(tmp_path / "rows"), "packed", T, tmp_path / "cache", shuffle=True,
                  micro_batch_size=B)
    with build_train_loader(cfg) as ld:
        ld.load_state_dict(packed[0]["state"])
        it = iter(ld)
        rest = [int(x) - 100 for _ in range(8) for x in next(it)["input_ids"][:, 0]]
    assert sorted(rest) == sorted(packed[0]["after"] + packed[1]["after"])

    assert res["tp_same"], "two processes with the same DP rank must see the same batches"

    dcfg = cfg_for(str(tmp_path / "docs"), "documents", T, tmp_path / "cache", shuffle=True,
                   micro_batch_size=1)
    with build_train_loader(dcfg) as ld:
        it = iter(ld)
        ref = [next(it)["input_ids"][0].tolist() for _ in range(8)]
    rows = res["docs_rows"]
    for s in range(2):
        for r in range(2):
            assert rows[r][s] == ref[4 * s + 2 * r:4 * s + 2 * r + 2]
    # no leftovers from the children (their TMPDIR was tmp_path, cache under tmp_path)
    left = [str(p) for p in (tmp_path / "cache").rglob("*")]
    assert not list((tmp_path / "cache").glob("*/loader*")), left
    assert not list(tmp_path.glob("*_filelock"))
