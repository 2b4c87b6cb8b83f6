"""Every torch.distributed call that communicates goes through ``copd_mega.parallel.comm``.

The package source (copd_mega/, parallel/, data/) is parsed with ``ast``: outside
``parallel/comm.py`` only the queries and types in ``comm.QUERIES | comm.TYPES`` may be used.
The NCCL device check is tested directly (no NCCL on CPU) and, with a GPU, on a real NCCL group;
the wrappers themselves run on 2 gloo ranks.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import torch

from copd_mega.parallel import comm
from multiproc import spawn

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("copd_mega", "parallel", "data")
COMM = "parallel/comm.py"
ALLOWED = comm.QUERIES | comm.TYPES


def _bound_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(names bound to torch.distributed, names bound to torch) anywhere in the module."""
    dist_names, torch_names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    dist_names.add(a.asname)
                elif a.name == "torch" or (a.name.startswith("torch.") and not a.asname):
                    torch_names.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            dist_names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return dist_names, torch_names


def violations(source: str) -> list[str]:
    """``line: name`` for each use of torch.distributed beyond the allowed queries and types."""
    tree = ast.parse(source)
    dist_names, torch_names = _bound_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            if node.module in ("torch.distributed", "torch.distributed.distributed_c10d"):
                bad = [a.name for a in node.names if a.name not in ALLOWED]
                found += [f"{node.lineno}: from {node.module} import {n}" for n in bad]
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        is_dist = isinstance(base, ast.Name) and base.id in dist_names
        is_dist |= (
            isinstance(base, ast.Attribute)
            and base.attr == "distributed"
            and isinstance(base.value, ast.Name)
            and base.value.id in torch_names
        )
        if is_dist and node.attr not in ALLOWED:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


def _package_files() -> dict[str, Path]:
    files = {}
    for d in PACKAGE_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            files[p.relative_to(ROOT).as_posix()] = p
    return files


def test_only_comm_calls_torch_distributed():
    files = _package_files()
    assert COMM in files and len(files) > 40
    bad = {rel: v for rel, p in files.items() if rel != COMM and (v := violations(p.read_text()))}
    assert not bad, (
        "torch.distributed used outside parallel/comm.py (route it through "
        f"copd_mega.parallel.comm; only {sorted(ALLOWED)} are allowed elsewhere): {bad}"
    )


@pytest.mark.parametrize(
    "src,flagged",
    [
        ("import torch.distributed as dist\ndist.all_reduce(x)", ["2: dist.all_reduce"]),
        ("import torch.distributed as d\nd.P2POp(d.isend, x, 1)", ["2: d.P2POp", "2: d.isend"]),
        ("from torch.distributed import broadcast, get_rank", ["1: from torch.distributed import broadcast"]),
        ("import torch\ntorch.distributed.barrier()", ["2: torch.distributed.barrier"]),
        ("import torch.distributed\ntorch.distributed.new_group([0])", ["2: torch.distributed.new_group"]),
        ("from torch import distributed as td\ntd.send(x, 1)", ["2: td.send"]),
        ("def f():\n    import torch.distributed as dist\n    dist.all_gather_object(a, b)", ["3: dist.all_gather_object"]),
        ("import torch.distributed as dist\nr = dist.get_rank(g)\nop = dist.ReduceOp.MAX", []),
        ("import torch.distributed.checkpoint as dcp\ndcp.save(sd, storage_writer=w)", []),
    ],
)  # fmt: skip
def test_violations_finds_collectives_and_allows_queries(src, flagged):
    assert violations(textwrap.dedent(src)) == flagged


def test_check_device_rejects_cpu_tensors_under_nccl_only():
    cpu, meta = torch.zeros(3), torch.empty(2, 4, device="meta")
    comm.check_device("all_reduce", [cpu, meta], "gloo")  # gloo takes CPU tensors
    comm.check_device("broadcast", [], "nccl")
    with pytest.raises(comm.DeviceError, match=r"all_reduce: tensor 0 \(shape \(3,\).* is on cpu"):
        comm.check_device("all_reduce", [cpu], "nccl")
    with pytest.raises(comm.DeviceError, match=r"send_recv: tensor 0 .* is on meta.*NCCL"):
        comm.check_device("send_recv", [meta, meta], "nccl")


def _wrappers_worker(rank: int) -> dict:
    comm.init_process_group("gloo", rank, 2, 60.0)
    out = {"sum": comm.all_reduce(torch.tensor([rank + 1.0])).item()}
    out["max"] = comm.all_reduce(torch.tensor([float(rank)]), op=comm.ReduceOp.MAX).item()
    out["bcast"] = comm.broadcast(torch.tensor([rank + 5]), src=1).item()
    pair = comm.new_group([0, 1])
    out["bcast_group"] = comm.broadcast(torch.tensor([rank + 7]), group_src=0, group=pair).item()
    parts = comm.all_gather([torch.zeros(2) for _ in range(2)], torch.full((2,), float(rank)))
    out["gather"] = torch.cat(parts).tolist()
    flat = comm.all_gather_into_tensor(torch.zeros(4), torch.full((2,), rank + 1.0), group=pair)
    out["gather_flat"] = flat.tolist()
    got = torch.zeros(3)
    comm.send_recv([(torch.full((3,), 10.0 * rank), 1 - rank)], [(got, 1 - rank)])
    out["p2p"] = got.tolist()
    comm.send_recv([], [])  # nothing posted
    out["objects"] = comm.all_gather_object({"r": rank})
    out["choice"] = comm.broadcast_object(f"from {rank}", src=0)
    comm.barrier(pair)
    return out


@pytest.mark.multiproc
def test_wrappers_on_two_gloo_ranks():
    a, b = spawn(_wrappers_worker, 2)
    for rank, r in enumerate((a, b)):
        assert r["sum"] == 3.0 and r["max"] == 1.0 and r["bcast"] == 6 and r["bcast_group"] == 7
        assert r["gather"] == [0.0, 0.0, 1.0, 1.0] and r["gather_flat"] == [1.0, 1.0, 2.0, 2.0]
        assert r["p2p"] == [10.0 * (1 - rank)] * 3
        assert r["objects"] == [{"r": 0}, {"r": 1}] and r["choice"] == "from 0"


def _nccl_worker(rank: int) -> dict:
    torch.cuda.set_device(0)
    comm.init_process_group("nccl", rank, 1, 60.0)
    out = {"cuda": comm.all_reduce(torch.ones(2, device="cuda")).tolist()}
    try:
        comm.all_reduce(torch.ones(2))
        out["cpu_error"] = None
    except comm.DeviceError as e:
        out["cpu_error"] = str(e)
    return out


@pytest.mark.gpu
def test_nccl_group_rejects_cpu_tensor_with_a_clear_error():
    r = spawn(_nccl_worker, 1)[0]
    assert r["cuda"] == [1.0, 1.0]
    assert r["cpu_error"] and r["cpu_error"].startswith("all_reduce: tensor 0")
