"""Telemetry during training, after a step's update: overlap probes and held-out evaluation.

- every ``eval.overlap_every`` steps (jobs with >= 2 branches): every ordered pair of branches
  is probed (:mod:`copd_mega.trainer.overlap`): ``probe/<s><-<t>/overlap``, ``/delta``, ``probe/overlap``.
- every ``eval.every`` steps: each branch's greedy pass@1 on the first ``eval.limit`` held-out
  problems of every capability (``eval/<cap>``, ``eval/mean``), and in ``copd``/``expert`` jobs
  with >= 2 branches the same for the merged model of the branches at that moment
  (``eval/merged/<cap>``, ``eval/merged/mean``, in every branch's record).

The merge for evaluation averages the model weights over the peer groups with the branches'
merge weights, evaluates, and copies every weight back from a copy taken before: the training
weights, fp32 masters and Adam moments are untouched (with bf16 weights the evaluated model is
the average of the bf16 weights, not of the fp32 masters the final merge uses). Nothing here
takes a gradient, reads a training data stream or draws from a global RNG.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from copd_mega.parallel.merge import normalise_weights, weighted_all_reduce
from copd_mega.rl.schedule import StepPlan
from copd_mega.trainer.evaluate import evaluate
from copd_mega.trainer.job import _gather_rows, eval_caps
from copd_mega.trainer.overlap import probe, probe_edges, probe_seed

MERGED_MODES = ("copd", "expert")  # the modes whose final model is the merge of the branches


def after_step(job, plan: StepPlan) -> dict:
    """The step's extra telemetry (empty when none is due). Collective over the world: every
    rank calls it after every step; all of them agree on what is due from ``plan``."""
    e, n = job.cfg.eval, plan.step + 1
    out: dict = {}
    saved = dict(job.timings)  # probe traffic is not the step's exchange/teacher time
    if e.overlap_every and n % e.overlap_every == 0 and len(job.cfg.branches) > 1:
        t0 = time.perf_counter()
        out.update(measure_overlap(job))
        saved["time/probe"] = time.perf_counter() - t0
    if e.every and n % e.every == 0:
        t0 = time.perf_counter()
        out.update(held_out(job))
        saved["time/eval"] = time.perf_counter() - t0
    job.timings = saved
    return out


def measure_overlap(job) -> dict:
    """Probe every ordered pair of branches (``overlap.probe``) with the current weights."""
    cfg = job.cfg
    data_of = {b.name: b.data for b in cfg.branches}
    return probe(job, probe_edges(cfg.branch_names), data_of, probe_seed(cfg.seed))


def held_out(job) -> dict:
    """This branch's held-out accuracies, and the merged branches' (see the module docstring)."""
    cfg, rt = job.cfg, job.rt
    caps = eval_caps(cfg)
    accs = evaluate(rt, job.sampler, job.judge, caps, cfg.eval.limit)
    out = {f"eval/{c}": a for c, a in accs.items()}
    out["eval/mean"] = sum(accs.values()) / len(accs)
    if cfg.schedule.mode in MERGED_MODES and len(cfg.branches) > 1:
        idx, nb = rt.topo.branch.index, len(cfg.branches)
        with merged_for_eval(job):
            mine = evaluate(rt, job.sampler, job.judge, caps[idx::nb], cfg.eval.limit)
        merged = _gather_rows(job, mine)
        out.update({f"eval/merged/{c}": merged[c] for c in caps})
        out["eval/merged/mean"] = sum(merged[c] for c in caps) / len(caps)
    return out


@contextmanager
def merged_for_eval(job, bucket_numel: int = 1 << 26):
    """Inside: this rank's model weights are the weighted mean over the branches (collective
    over ``topo.peer_group``); on exit every weight is copied back bit for bit."""
    topo = job.rt.topo
    params = [p.data for p in job.bm.model.parameters()]
    saved = [p.clone() for p in params]
    w = normalise_weights([b.merge_weight for b in job.cfg.branches])[topo.branch.index]
    weighted_all_reduce(params, w, topo.peer_group, bucket_numel)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
