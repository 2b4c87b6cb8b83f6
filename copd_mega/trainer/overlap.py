"""Cross-branch top-k overlap and delta on on-policy rollouts: telemetry and ``copd overlap``.

A **probe** of edge (student s, teacher t): s samples ``eval.overlap_samples`` rollouts (at the
training temperature, a fixed seed) for each of the first ``eval.overlap_prompts`` held-out
prompts of t's data; the rollouts go to t over the peer-scoring exchange of mutual OPD
(``trainer.teaching.peer_scoring``: same ranks, same megatron forward), t returns its per-token log-probs
and top-k ids, and s scores its own rollouts the same way. Over the response tokens:

    overlap = mean |TopK_s ∩ TopK_t| / k        delta = mean (log pi_t - log pi_s)

Nothing here takes a gradient, steps an optimizer or reads a training data stream, so a probe
leaves training bit-identical (``tests/test_study_telemetry.py``). In training every ordered
pair of branches is probed every ``eval.overlap_every`` steps in every mode with >= 2 branches
(``probe/<s><-<t>/overlap``, ``/delta`` and their mean ``probe/overlap`` in the metrics);
``copd overlap --student A --teacher B --data D`` computes the same numbers offline for any two
model checkpoints, with the same prompts and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from copd_mega.ckpt.checkpoint import load_model, require_model_dir, write_text_atomic
from copd_mega.config import Config, ConfigError, load_config
from copd_mega.launch.datasets import make_reader
from copd_mega.launch.runtime import shutdown, start
from copd_mega.models.branch import BranchModel
from copd_mega.models.gpt import build_gpt
from copd_mega.models.multimodal import media_spec
from copd_mega.models.vlm import build_vlm
from copd_mega.parallel import comm
from copd_mega.parallel.dist import free_port
from copd_mega.parallel.topology import plan_layout
from copd_mega.rl.logprobs import logprob_chunk
from copd_mega.rl.losses import topk_overlap
from copd_mega.rl.sampling import Rollouts
from copd_mega.rl.teacher_scores import score_sequences
from copd_mega.rl.vlm_sampler import make_sampler
from copd_mega.trainer.job import RuntimeView
from copd_mega.trainer.rollouts import generate_rollouts
from copd_mega.trainer.teaching import peer_scoring

PROBE_SALT = 65_537  # probe seed = seed * 7919 + PROBE_SALT: the same prompts and draws each time


def probe_seed(seed: int) -> int:
    return seed * 7919 + PROBE_SALT


def probe_edges(names: list[str]) -> list[tuple[str, str]]:
    """Every ordered (student, teacher) pair of distinct branches, in branch order."""
    return [(s, t) for s in names for t in names if s != t]


def _probe_rollouts(view, data: str, seed: int) -> Rollouts:
    """This rank's student rollouts (with their media) on the first held-out prompts of
    ``data`` (its DP share)."""
    cfg, topo = view.cfg, view.rt.topo
    dp = topo.layout.dp
    reader = make_reader(cfg, data, "eval", topo.dp_rank, dp)
    samples = reader.next_batch(max(cfg.eval.overlap_prompts // dp, 1))
    return generate_rollouts(view, samples, cfg.eval.overlap_samples, seed)


def _sums(view, rolls: Rollouts, teacher) -> torch.Tensor:
    """``[3]`` (overlap sum, delta sum, token count) of this rank's rows, on the device.

    Every rank of the branch runs the student's forward (collective over its PP stages); only
    the last stage's TP rank 0 contributes, so a sum over the branch counts each row once.
    ``teacher``: (log-probs ``[N, L]``, top-k ``[N, L, k]``), valid on the last stage, else None.
    """
    cfg, topo, dev = view.cfg, view.rt.topo, view.rt.device
    mine = score_sequences(view.bm, topo, rolls.tokens, cfg.opd.top_k, cfg.model.vocab_size,
                           cfg.parallel.micro_batch_size, logprob_chunk(cfg), dev,
                           rolls.media)  # fmt: skip
    if mine is None or teacher is None or topo.tp_rank != 0:
        return torch.zeros(3, device=dev)
    mask = rolls.response_mask()
    n = mask.sum().float()
    t_logp, t_topk = teacher
    overlap = topk_overlap(mine[1], t_topk, mask) * n
    delta = ((t_logp - mine[0]) * mask).sum()
    return torch.stack([overlap, delta, n]).float()


@torch.no_grad()
def probe(view, edges: list[tuple[str, str]], data_of: dict[str, str], seed: int):
    """Overlap and delta of every edge in ``edges``; ``{"probe/<s><-<t>/overlap": ...,
    "probe/<s><-<t>/delta": ..., "probe/overlap": mean}`` for the edges whose student is this
    rank's branch, the same on every rank of it (``{}`` for a branch that is no student).

    ``view``: anything with ``cfg``, ``rt``, ``bm``, ``sampler``, ``timed`` (a ``BranchJob``);
    ``data_of``: branch -> data spec whose held-out prompts probe edges into that teacher.
    Collective over the world: every rank of every branch calls it with the same ``edges``.
    """
    topo = view.rt.topo
    me = topo.branch.name
    teachers = [t for s, t in edges if s == me]
    students = [s for s, t in edges if t == me]
    peer_out = {t: _probe_rollouts(view, data_of[t], seed) for t in teachers}
    scores = peer_scoring(view, peer_out, students)
    if not teachers:
        return {}
    vec = torch.cat([_sums(view, peer_out[t], scores.get(t)) for t in teachers])
    comm.wait_group(topo.branch_group)  # DP ranks' probe rollouts differ in length
    comm.all_reduce(vec, group=topo.branch_group)
    out = {}
    for t, (ov, dl, n) in zip(teachers, vec.view(-1, 3).tolist(), strict=True):
        out[f"probe/{me}<-{t}/overlap"] = ov / max(n, 1.0)
        out[f"probe/{me}<-{t}/delta"] = dl / max(n, 1.0)
    out["probe/overlap"] = sum(out[f"probe/{me}<-{t}/overlap"] for t in teachers) / len(teachers)
    return out


# ----------------------------------------------------------------------------- copd overlap


@dataclass
class CheckpointView(RuntimeView):
    """What :func:`probe` needs of a job, for two model checkpoints loaded side by side."""

    rt: object  # Runtime
    bm: object  # BranchModel without an optimizer
    sampler: object
    timings: dict = field(default_factory=dict)


def offline_config(args) -> Config:
    """The probe's job: two branches (``student``, ``teacher``) of the checkpoints' model."""
    for flag, path in (("--student", args.student), ("--teacher", args.teacher)):
        try:
            require_model_dir(path)
        except Exception as e:
            raise ConfigError(f"{flag} {path}: {e}") from e
    source = args.config or str(Path(args.student) / "config.yaml")
    if not Path(source).is_file():
        raise ConfigError(f"{source} does not exist; pass --config with the run's config")
    two = f"branches=[{{name: student, data: {args.data}}}, {{name: teacher, data: {args.data}}}]"
    return load_config(source, [*args.overrides, two, "teaching.graph=none",
                                "schedule.mode=expert", "schedule.student=",
                                "logging.progress=false"])  # fmt: skip


def run_offline(args) -> dict[str, float]:
    """Load ``--student`` and ``--teacher`` into the two branches and probe student<-teacher.
    Collective over the world (2 x TP x PP x DP ranks); the result on every rank."""
    cfg = offline_config(args)
    rt = start(cfg)
    model = build_vlm(cfg, rt.topo) if cfg.vision.enabled else build_gpt(cfg, rt.topo)
    load_model(args.student, model, rt.topo, branch="student")
    load_model(args.teacher, model, rt.topo, branch="teacher")
    bm = BranchModel(model, None, model.config, media_spec(cfg, rt.codec))
    view = CheckpointView(rt, bm, make_sampler(model, rt.topo, cfg, rt.codec))
    seed = probe_seed(cfg.seed if args.seed is None else args.seed)
    got = probe(view, [("student", "teacher")], {"teacher": args.data, "student": args.data}, seed)
    rows = comm.all_gather_object(got)
    return next(r for r in rows if r)


def main(argv: list[str]) -> int:
    """``copd overlap --student A --teacher B --data D [--config C] [k=v ...]``."""
    ap = argparse.ArgumentParser(prog="copd overlap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--student", required=True, help="model checkpoint that samples")
    ap.add_argument("--teacher", required=True, help="model checkpoint that scores")
    ap.add_argument("--data", required=True, help="data spec whose held-out prompts probe")
    ap.add_argument("--config", default=None, help="default: the student's config.yaml")
    ap.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value (eval.overlap_prompts=...)")
    args = ap.parse_args(argv)
    cfg = offline_config(args)
    if "RANK" not in os.environ:  # not under a launcher: start one rank per model part
        n = 2 * cfg.ranks_per_branch
        plan_layout(cfg, n)  # a bad split is a one-line error here, not one per rank
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
               f"--master-port={free_port()}", "-m", "copd_mega.cli", "overlap", *argv]  # fmt: skip
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    got = run_offline(args)
    if dist.get_rank() == 0:
        text = json.dumps({"overlap": got["probe/student<-teacher/overlap"],
                           "delta": got["probe/student<-teacher/delta"]})  # fmt: skip
        if args.json:
            write_text_atomic(args.json, text + "\n")
        print(text, flush=True)
    shutdown()
    return 0
