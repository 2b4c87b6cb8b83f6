"""The branch shape users run, end to end on gloo: 2 branches x (TP2 x PP2 x DP) through `copd
train` (PP2 generation, GRPO and OPD steps, peer scoring across pipeline stages), a checkpoint,
a resume for one more step, the in-place merge and the final save; then `copd export-hf`, and
the exported model loads in transformers and scores tokens like the merged megatron model, at
the job's own TP2 x PP2 shape and on a single rank.

DP1 (8 ranks) runs in `make test`; DP2 (16 ranks) is `slow` (`make test-all`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multiproc import spawn

pytestmark = pytest.mark.multiproc

VOCAB = 128
TOKENS = torch.randint(1, 100, (3, 14), generator=torch.Generator().manual_seed(7))
BASE = [
    "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2",
    "model.num_attention_heads=4", "model.num_query_groups=2", f"model.vocab_size={VOCAB}",
    "model.max_seq_length=48", "model.tie_embeddings=false", "data.n_train=256",
    "data.n_eval=4", "branches=[{name: arith, data: arith}, {name: reverse, data: reverse}]",
    "teaching.graph=pairwise", "logging.progress=false",
]  # fmt: skip
# arith only, to about a quarter of sampled answers right: GRPO groups with mixed rewards
PRETRAIN = ["pretrain.capabilities=[arith]", "pretrain.steps=400", "pretrain.batch_size=32",
            "pretrain.lr=3e-3", "pretrain.eval_every=0", "pretrain.eval_limit=8"]  # fmt: skip
COPD = [
    "schedule.mode=copd", "schedule.cycles=1", "schedule.rl_steps=1", "schedule.opd_steps=2",
    "rollout.prompts_per_step=4", "rollout.max_new_tokens=6", "rollout.max_batch_size=3",
    "grpo.group_size=4", "opd.prompts_per_peer=2", "opd.samples_per_prompt=2",
    "parallel.micro_batch_size=4", "optim.lr=3e-3", "checkpoint.keep_last=1",
]  # fmt: skip


def _pretrain(rank: int, overrides: list[str]) -> str:
    from copd_mega.config import load_config
    from copd_mega.trainer.pretrain import run_pretrain

    return str(run_pretrain(load_config(None, overrides)))


def _score(cfg, topo, ckpt: Path):
    """Log-probs and top-5 of TOKENS under the checkpoint, on this rank (None off the last stage)."""
    from copd_mega.ckpt.checkpoint import load_model
    from copd_mega.models.branch import build_branch_model
    from copd_mega.rl.teacher_scores import score_sequences

    bm = build_branch_model(cfg, topo)
    load_model(ckpt, bm, topo)
    dev = next(bm.module.parameters()).device
    return score_sequences(bm, topo, TOKENS.to(dev), 5, VOCAB, 2, 4, dev)


def _train(rank: int, overrides: list[str]):
    """`copd train` on this rank; after the final save, the merged model scores TOKENS at the
    job's shape (a fresh model loaded from RUN/final/model)."""
    import torch.distributed as dist

    from copd_mega.config import load_config
    from copd_mega.parallel.topology import build_topology
    from copd_mega.trainer.train import train

    cfg = load_config(None, overrides)
    train(cfg)
    final = Path(cfg.run_dir) / "final" / "model"
    if not final.exists():  # stopped early (schedule.stop_after)
        return None
    topo = build_topology(cfg, dist.get_world_size())
    scores = _score(cfg, topo, final)
    return {"branch": topo.branch.name, "coords": (topo.tp_rank, topo.pp_rank, topo.dp_rank),
            "scores": None if scores is None else [s.cpu() for s in scores]}  # fmt: skip


def _single_rank(rank: int, ckpt: str):
    from copd_mega.config import load_config
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    one = ["parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "teaching.graph=none",
           "branches=[{name: merged, data: arith}]"]  # fmt: skip
    cfg = load_config(Path(ckpt) / "config.yaml", one)
    init_distributed()
    return [s.cpu() for s in _score(cfg, build_topology(cfg), Path(ckpt))]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A partly trained base (so GRPO groups get mixed rewards and the branches move apart)."""
    run = tmp_path_factory.mktemp("base")
    return spawn(_pretrain, 1, [*BASE, *PRETRAIN, f"run_dir={run}"])[0]


def _rows(run: Path) -> dict:
    out = {}
    for path in sorted((run / "metrics").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[(r["branch"], r["step"])] = r
    return out


@pytest.mark.parametrize("dp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_two_tp2_pp2_branches_train_resume_merge_export(dp, base, tmp_path):
    from transformers import AutoModelForCausalLM

    from copd_mega.hf.export import main as export_main

    run = tmp_path / "run"
    world = 2 * 2 * 2 * dp
    common = [*BASE, *COPD, "parallel.tp=2", "parallel.pp=2", f"parallel.dp={dp}",
              f"checkpoint.init_from={base}", f"run_dir={run}"]  # fmt: skip
    # RL step then OPD step, checkpoint, stop; resume for the last OPD step, merge, save.
    spawn(_train, world, [*common, "schedule.stop_after=2"], timeout=900)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert not (run / "final").exists()
    results = spawn(_train, world, [*common, "checkpoint.resume=true"], timeout=900)

    rows = _rows(run)
    assert sorted(rows) == [(b, s) for b in ("arith", "reverse") for s in range(3)]
    assert [rows[("arith", s)]["phase"] for s in range(3)] == ["rl", "opd", "opd"]
    assert rows[("arith", 0)]["reward"] > 0 and rows[("arith", 0)]["grad_norm"] > 0, "RL moved"
    for b, t in (("arith", "reverse"), ("reverse", "arith")):
        for s in (1, 2):
            assert 0.0 <= rows[(b, s)][f"edge/{b}<-{t}/overlap"] <= 1.0
        assert rows[(b, 2)][f"edge/{b}<-{t}/delta"] != 0.0, "branches differ after RL and OPD"
    table = json.loads((run / "eval.json").read_text())
    assert {"base", "branch arith", "branch reverse", "merged"} <= set(table)
    # per-problem results, gathered over DP: every held-out problem once, the table's accuracy
    problems = json.loads((run / "eval_problems.json").read_text())
    n_eval = 4  # data.n_eval in BASE
    for row in ("branch arith", "branch reverse", "merged"):
        for cap in ("arith", "reverse"):
            ids = problems[row][cap]
            assert len(ids) == n_eval and all(i.startswith(f"{cap}-eval-") for i in ids)
            assert sum(ids.values()) / n_eval == pytest.approx(table[row][cap])

    # The merged model at the job's shape: every last-stage rank of both branches agrees.
    final = run / "final" / "model"
    last = [r for r in results if r["scores"] is not None]
    assert len(last) == 2 * 2 * dp and all(r["coords"][1] == 1 for r in last)
    logp, topk = last[0]["scores"]
    for r in last[1:]:
        assert (r["scores"][0] - logp).abs().max() < 1e-5 and torch.equal(r["scores"][1], topk)
    one_logp, one_topk = spawn(_single_rank, 1, str(final))[0]
    assert (one_logp - logp).abs().max() < 1e-4
    assert (one_topk == topk).float().mean() > 0.99  # ties may order differently

    hf_dir = tmp_path / "hf"
    assert export_main(["--ckpt", str(final), "--out", str(hf_dir), "--no-progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(TOKENS).logits[:, :-1, :VOCAB].float()
    hf = torch.log_softmax(logits, dim=-1).gather(-1, TOKENS[:, 1:, None]).squeeze(-1)
    assert (hf - one_logp[:, 1:]).abs().max() < 1e-4
    assert (hf - logp[:, 1:]).abs().max() < 1e-4


def _ragged_scores(rank: int, overrides: list[str]):
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rl.teacher_scores import score_sequences

    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.num_layers=2", *overrides])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    res = score_sequences(bm, topo, TOKENS, 5, VOCAB, 2, 4, torch.device("cpu"))
    return None if res is None else [r.clone() for r in res]


def test_pp2_runs_a_short_last_microbatch_like_pp1(tmp_path):
    """3 rows in microbatches of 2: the pipeline pads the short one; scoring and a training
    step (loss, grad norm) equal the PP1 result."""
    from copd_cases import update_case
    from test_copd import TINY

    (one,) = spawn(_ragged_scores, 1, [])
    first, last = spawn(_ragged_scores, 2, ["parallel.pp=2"])
    assert first is None and last[0].shape == (3, 14)
    assert (last[0] - one[0]).abs().max() < 1e-5 and torch.equal(last[1], one[1])
    job = [*TINY, "model.num_layers=2", "branches=[{name: arith, data: arith}]",
           "schedule.mode=expert", "teaching.graph=none", "optim.lr=0.01",
           "parallel.micro_batch_size=3", f"run_dir={tmp_path}"]  # fmt: skip
    (pp1,) = spawn(update_case, 1, job)
    pp2 = spawn(update_case, 2, [*job, "parallel.pp=2"])
    for a, b in zip(pp1, pp2[1], strict=True):  # first and second update
        for k in ("loss", "grad_norm", "entropy"):
            assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    assert pp1[0]["grad_norm"] > 0
