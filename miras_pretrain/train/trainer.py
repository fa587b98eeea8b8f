"""The training loop: DeepSpeed engine, metrics, validation, checkpoints, signals, non-finite steps.

One call of :func:`train` is one job: it initialises the process group (torchrun, the deepspeed
launcher, SLURM, or a lone process), builds the model (or its pipeline stages) and the engine,
optionally resumes from the newest complete checkpoint, runs up to ``train.max_steps`` optimizer
steps and returns an exit code (see :mod:`miras_pretrain.train.signals`).

Step accounting: ``step`` counts optimizer steps *attempted*, including those skipped for a
non-finite loss or gradient (DeepSpeed discards such an update and does not advance the lr
schedule, as with fp16 overflow). Checkpoint tags, logs and ``max_steps`` all use it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from miras_pretrain.train import dist as mdist
from miras_pretrain.train.checkpoint import (CheckpointManager, check_resume_layout, read_meta,
                                             resolve_resume_checkpoint)
from miras_pretrain.train.config import RunConfig, derived_grad_accum, dump_config, resolve_model_config
from miras_pretrain.train.cp import TrainerCP, check_cp_config, launch_world_size
from miras_pretrain.data.run_checks import check_training_data
from miras_pretrain.train import data_bridge
from miras_pretrain.train.engine import build_engine, resolve_precision
from miras_pretrain.train.grad_stats import GradSpikeMonitor, grad_norms_by_group
from miras_pretrain.train.metrics import device_peak_flops, memory_gib, mfu
from miras_pretrain.train.optim import apply_schedule_config
from miras_pretrain.train.resume_changes import (format_changes, model_changes, optim_changes,
                                                 refuse_model_changes, shape_mismatch_message)
from miras_pretrain.train.rng import get_rng_state, seed_all, set_rng_state
from miras_pretrain.train.run_dir import RunDirError, RunDirLock, agree_on_error, claim_fresh_run
from miras_pretrain.train.loop import (Console, LogWindow, RunEnd, TimeLimit, format_run_summary, perplexity,
                                      wandb_run_url)
from miras_pretrain.train.setup import (build_local_model, check_init_from, load_init_weights, setup_parallel,
                                        teardown_parallel)
from miras_pretrain.train.signals import StopFlag, signal_name
from miras_pretrain.train.tracking import MetricsLogger


def split_tokens(data_cfg, split: str) -> Optional[int]:
    """Tokens stored in ``split`` over all streams (their manifests), or None when unknown."""
    from miras_pretrain.data.loader import check_manifests

    try:
        return sum(m.splits[split].num_tokens for m in check_manifests(data_cfg, split))
    except (OSError, ValueError, KeyError):  # a remote manifest out of reach: the line omits it
        return None


def val_scope(tokens: int, split_total: Optional[int]) -> str:
    """``"12,288 of 1,503,232 tokens"`` for the validation line: how much of the split one
    evaluation scores (``miras-pretrain eval --perplexity`` scores all of it)."""
    if split_total is None:
        return f"{tokens:,} tokens"
    if tokens >= split_total:
        return f"{tokens:,} tokens, the whole split"
    return f"{tokens:,} of {split_total:,} tokens"


class NonFiniteAbort(RuntimeError):
    """Raised after ``train.max_consecutive_skips`` skipped steps in a row."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) job reports back."""

    exit_code: int
    step: int
    out_dir: Path
    checkpoint: Optional[Path] = None
    val_history: list[tuple[int, float]] = field(default_factory=list)
    skipped_steps: int = 0
    wandb_dir: Optional[str] = None
    message: str = ""
    # "done" | "signal" | "time_limit" | "nonfinite"
    reason: str = "done"


def _grad_norm(engine) -> float:
    g = engine.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if hasattr(g, "item") else g)


class Trainer:
    """Holds the engine, loaders and counters of one job. Use :func:`train`."""

    def __init__(self, cfg: RunConfig, *, resume: Optional[str] = None, quiet: bool = False,
                 overwrite: bool = False, allow_model_change: bool = False) -> None:
        if overwrite and resume:
            raise ValueError(f"--overwrite starts a new run but --resume {resume} continues one: pass only one of them")
        self.cfg = cfg
        self.resume = resume
        self.quiet = quiet
        self.overwrite = overwrite
        self.allow_model_change = allow_model_change
        # the run directory's lock (rank 0 only), held from before the first write to the end
        self.run_lock: Optional[RunDirLock] = None
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.tokens_seen = 0
        self.val_history: list[tuple[int, float]] = []
        # grad_norm/<group> of the last step that computed them (log steps only), see train_step
        self.group_grad_norms: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        from miras_pretrain.train.dist import pick_device

        # validate model and data sections before any process-group work
        self.model_cfg = resolve_model_config(cfg)
        # train.global_batch_size keeps the batch fixed on any process count (derives the accumulation)
        cfg.train.grad_accum_steps = derived_grad_accum(cfg, launch_world_size())
        if cfg.train.init_from:  # a missing/unknown path is one line before any process-group work
            check_init_from(cfg.train.init_from)
        self.data_cfg = data_bridge.resolve(cfg)
        self.seq_len = data_bridge.seq_len_of(self.data_cfg)
        check_cp_config(cfg, self.model_cfg, self.seq_len, launch_world_size(), data_layout=self.data_cfg.layout)
        # splits present, model.vocab_size >= the tokenizer's (else an IndexError in the embedding)
        check_training_data(self.data_cfg, model_vocab_size=self.model_cfg.vocab_size)
        self.device = pick_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.layout = setup_parallel(cfg, self.device)
        self.rank = mdist.rank()
        self.is_main = self.rank == 0
        # before the model and loaders: OpenMP threads oversubscribe a shared machine (threads.py)
        from miras_pretrain.threads import apply_threads

        self.threads = apply_threads(cfg.train.threads, announce=self.is_main and not self.quiet,
                                     field="train.threads").threads
        # before any rank writes (the loaders' cache may live in out_dir): one run per directory
        self._claim_run_dir()
        seed_all(cfg.run.seed)
        # the CP runtime (None without CP): ranks of one CP group share every batch, each runs its slice
        self.cp = (TrainerCP(cfg.parallel.context_parallel_scheme, self.model_cfg.chunk_size)
                   if self.layout.cp > 1 else None)

        model = build_local_model(self.model_cfg, self.layout, cfg)
        if cfg.train.init_from and self._starts_fresh():
            n = load_init_weights(model, cfg.train.init_from, self.layout)
            if self.is_main and not self.quiet:
                print(f"init_from: {n} tensors from {cfg.train.init_from} (fresh optimizer, step 0)", flush=True)
        mpu = None
        if (self.layout.tp > 1 or self.layout.cp > 1) and self.layout.pp == 1:
            # a PipelineModule brings its own grid (topology); DeepSpeed takes no mpu with it.
            # Under CP the mpu's sequence-parallel names make DeepSpeed reduce over DP x CP
            from miras_pretrain.parallel.mpu import MegatronMPU

            mpu = MegatronMPU()
        self.engine, self.ds_config = build_engine(
            model, cfg, self.device, mpu=mpu, zero3_persistence_threshold=cfg.train.zero3_persistence_threshold
        )
        self.pipeline = self.layout.pp > 1
        # after the engine: every rank now starts from the same weights; seed the data order
        # and any sampling per data-parallel rank
        seed_all(cfg.run.seed + 1000 * self.layout.dp_rank + 1)
        self.train_loader = data_bridge.build_train_loader(
            self.data_cfg, micro_batch_size=cfg.train.micro_batch_size, dp_rank=self.layout.dp_rank,
            dp_size=self.layout.dp,
        )
        self.val_loader = data_bridge.build_val_loader(
            self.data_cfg, micro_batch_size=cfg.train.micro_batch_size, dp_rank=self.layout.dp_rank,
            dp_size=self.layout.dp,
        )
        # the validation line says how much of the split eval.batches scores (None: unknown)
        self.val_split_tokens = split_tokens(self.data_cfg, self.data_cfg.eval_split)
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last)
        self.flops_per_token = self._flops_per_token()
        self.peak_total = device_peak_flops(self.device, cfg.log.peak_flops) * self.layout.world
        if self.resume:
            self._resume()
        # after a resume was accepted: a refused one leaves the run's config.yaml as it was
        if self.is_main:
            cfg.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, cfg.out_dir / "config.yaml")
            (cfg.out_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))
        self.train_iter = iter(self.train_loader)

    def _starts_fresh(self) -> bool:
        """Whether this job starts at step 0 (no --resume, or --resume auto with no checkpoint
        yet): only then does ``train.init_from`` apply; a resumed job loads its checkpoint.
        Collective under --resume auto."""
        if self.resume is None:
            return True
        if self.resume != "auto":
            return False
        return resolve_resume_checkpoint("auto", self.cfg.checkpoint_dir, report=lambda _line: None) is None

    def _claim_run_dir(self) -> None:
        """Rank 0 locks ``run.out_dir`` and, for a fresh run, refuses (or with ``--overwrite``
        clears) an earlier run there; every rank then raises the same one-line error, or none.
        Collective."""
        error: Optional[str] = None
        if self.is_main:
            try:
                self.run_lock = RunDirLock(self.cfg.out_dir)
                self.run_lock.acquire()
                if not self.resume:
                    removed = claim_fresh_run(self.cfg.out_dir, self.cfg.checkpoint_dir, overwrite=self.overwrite)
                    if removed and not self.quiet:
                        print(f"overwrite: deleted the earlier run in {self.cfg.out_dir} "
                              f"({len(removed)} entries: checkpoints, metrics, plot, W&B)", flush=True)
            except RunDirError as err:
                error = str(err)
        error = agree_on_error(error)
        if error is not None:
            raise RunDirError(error)

    def release_run_dir(self) -> None:
        """Drop the run directory's lock (at the end of the job)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _flops_per_token(self) -> float:
        from miras_pretrain.model import flops_per_token

        return float(flops_per_token(self.model_cfg, self.seq_len))

    def _layout_meta(self) -> dict[str, Any]:
        return {"world_size": self.layout.world, "tp": self.layout.tp, "pp": self.layout.pp,
                "cp": self.layout.cp, "dp": self.layout.dp, "zero_stage": self.cfg.train.zero_stage,
                "cp_scheme": self.cfg.parallel.context_parallel_scheme}

    def _say_resume(self, line: str) -> None:
        """A resume notice (skipped or unverified checkpoint): printed once, by rank 0."""
        if self.is_main:
            print(line, flush=True)

    def _resume(self) -> None:
        """Load the checkpoint ``--resume`` names (auto | latest | a path) into the engine,
        the loader, the RNGs and the counters; ``auto`` with no checkpoint yet starts at step 0."""
        root = self.cfg.checkpoint_dir
        # verified against its manifest; for auto/latest a damaged checkpoint is skipped (one line each)
        ckpt_dir = resolve_resume_checkpoint(self.resume, root, report=self._say_resume)
        if ckpt_dir is None:
            if self.is_main and not self.quiet:
                print(f"resume auto: no complete checkpoint under {root}; starting from step 0", flush=True)
            return
        meta = read_meta(ckpt_dir)
        check_resume_layout(meta, self._layout_meta(), ckpt_dir)
        self._check_model_unchanged(meta, ckpt_dir)
        try:
            state = self.ckpt.load(self.engine, ckpt_dir)
        except RuntimeError as err:
            message = shape_mismatch_message(err, ckpt_dir)
            if message is None:
                raise
            raise ValueError(message) from None
        self.step = int(state["step"])
        self.skipped_total = int(state["skipped_total"])
        # a new job starts a new streak: a run that aborted (exit 3) and is resumed with a lower
        # lr must get max_consecutive_skips fresh chances, not stop at its first bad step
        self.consecutive_skips = 0
        self.tokens_seen = int(state["tokens_seen"])
        self.val_history = [tuple(v) for v in state.get("val_history", [])]
        self.train_loader.load_state_dict(state["train_loader"])
        set_rng_state(state["rng"])
        self._apply_schedule_config(meta)
        if self.is_main and not self.quiet:
            print(f"resumed from {ckpt_dir} at step {self.step}", flush=True)

    def _check_model_unchanged(self, meta: dict[str, Any], ckpt_dir: Path) -> None:
        """A model field that differs from the checkpoint's is a one-line error, unless
        ``--allow-model-change`` (then a printed line; a tensor that no longer fits is still a
        one-line error, from the load)."""
        changes = model_changes(meta.get("model"), self.model_cfg.to_dict())
        if not changes:
            return
        if not self.allow_model_change:
            refuse_model_changes(changes, ckpt_dir)
        if self.is_main and not self.quiet:
            print(f"--allow-model-change: resuming {ckpt_dir} into a changed model ({format_changes(changes)})",
                  flush=True)

    def _apply_schedule_config(self, meta: dict[str, Any]) -> None:
        """The lr schedule and optimizer hyperparameters come from this run's config, rebuilt at
        the resumed step (the checkpoint restored the old ones); print what changed."""
        t = self.cfg.train
        next_lr = apply_schedule_config(self.engine.lr_scheduler, lr=t.lr, warmup_steps=t.warmup_steps,
                                        max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio, betas=t.betas,
                                        eps=t.eps, weight_decay=t.weight_decay)
        changes = optim_changes(meta.get("config"), self.cfg.to_dict()["train"])
        if changes and self.is_main and not self.quiet:
            print(f"resume: applying the changed optimizer/schedule config from step {self.step} "
                  f"({format_changes(changes)}); next lr {next_lr:.3e}", flush=True)

    # ------------------------------------------------------------------ pieces of a step
    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.train_iter)
        except StopIteration:  # a new epoch over the training split
            self.train_iter = iter(self.train_loader)
            batch = next(self.train_iter)
        # packed-document metadata from the host copy of the offsets, once per batch, so that no
        # layer reads device memory on the host (data_bridge.attach_varlen)
        batch = data_bridge.attach_varlen(batch)
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(loss to backpropagate, mean loss of this rank's tokens, their count)`` for one
        micro-batch. Without CP the first two are the same. Under CP the first is this rank's
        share of the micro-batch mean (``mean * cp_loss_scale``: the shares sum to the CP = 1
        loss over the CP group) and the count is the labels of this rank's slice."""
        ids, labels, cu = data_bridge.model_inputs(batch)
        if self.cp is None:
            loss = self._engine_loss(ids, labels, data_bridge.model_varlen(batch))
            return loss, loss, int((labels != -100).sum())
        local = self.cp.slice(ids, labels, cu)
        with self.cp.runtime.batch(local["cp_slice"]) as cp_context:
            loss = self._engine_loss(local["input_ids"], local["labels"], local.get("cu_seqlens"), cp_context)
        return loss * local["cp_loss_scale"], loss, int((local["labels"] != -100).sum())

    def _engine_loss(self, ids: torch.Tensor, labels: torch.Tensor, cu: Optional[torch.Tensor],
                     cp_context=None) -> torch.Tensor:
        """The engine's mean loss over ``labels``; ``cu_seqlens`` is passed only for packed
        documents and ``cp`` only under context parallelism (otherwise the model's plain
        signature)."""
        extra = {} if cp_context is None else {"cp": cp_context}
        if cu is not None:
            return self.engine(ids, labels=labels, cu_seqlens=cu, **extra)
        return self.engine(ids, labels=labels, **extra)

    def _pipe_iter(self, batches: list) -> Iterator:
        """Micro-batches in the pipeline engine's format: ``(input_ids, labels)`` or, with
        packed documents, ``((input_ids, cu_seqlens), labels)``. Under CP this rank's slice with
        ``(labels, loss factor)`` as the labels (``pipeline_loss`` multiplies by the factor)."""
        for b in batches:
            ids, labels, cu = data_bridge.model_inputs(b)
            if self.cp is not None:  # dense rows only (check_cp_config refuses documents + PP)
                local = self.cp.slice(ids, labels, None)
                scale = torch.tensor(self.cp.pipe_loss_scale(local), dtype=torch.float32, device=ids.device)
                yield local["input_ids"], (local["labels"], scale)
                continue
            yield ((ids, cu), labels) if cu is not None else (ids, labels)

    def _pipe_layout(self, micro: list):
        """The CP layout shared by this step's (dense, equal-length) pipeline micro-batches."""
        from miras_pretrain.parallel.context_parallel import CPSlice

        ids, _, _ = data_bridge.model_inputs(micro[0])
        return CPSlice(self.cp.rank, self.cp.size, ids.shape[1])

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.log.interval == 0 or step == self.cfg.train.max_steps

    def _group_grad_norms(self) -> dict[str, float]:
        """``grad_norm/<group>`` of the gradients DeepSpeed holds now (after the boundary's
        backward, before ``engine.step()``, which clips and frees them). Collective: every rank."""
        from deepspeed.utils import safe_get_full_grad

        norms = grad_norms_by_group(self.engine.module.named_parameters(), safe_get_full_grad)
        return {f"grad_norm/{k}": v for k, v in norms.items()}

    def train_step(self) -> tuple[float, bool, float]:
        """One optimizer step (grad_accum micro-batches). Returns (mean loss, applied, grad norm).

        At log steps also sets :attr:`group_grad_norms` (empty otherwise, and always under
        pipeline parallelism: ``engine.train_batch`` runs backward and step in one call, so
        there is no point where the full gradients can be read before they are cleared)."""
        ga = self.cfg.train.grad_accum_steps
        inject_nan = (self.step + 1) in self.cfg.debug.nan_loss_steps
        self.group_grad_norms = {}
        if self.pipeline:
            # every rank reads its micro-batches up front, at the same point of the program: the
            # streaming loader synchronises the processes of a machine when an epoch starts,
            # while the pipeline schedule would have the stages read at different times (the
            # last stage first waits for activations) -> deadlock
            micro = [self._next_batch() for _ in range(ga)]
            if self.cp is None:
                loss = self.engine.train_batch(data_iter=self._pipe_iter(micro))
            else:
                # the CP exchanges happen inside each stage's layers, for every micro-batch of
                # the schedule; backward may run after the block (autograd holds the runtime)
                with self.cp.pipeline_batch(self.engine.module, self._pipe_layout(micro)):
                    loss = self.engine.train_batch(data_iter=self._pipe_iter(micro))
                self.cp.runtime.finish_step()
            loss_val = float(loss.item())
        else:
            total = 0.0
            for _ in range(ga):
                batch = self._next_batch()
                loss, _, _ = self._forward_loss(batch)
                if inject_nan:
                    loss = loss * float("nan")
                self.engine.backward(loss)
                if self.cp is not None:
                    self.cp.runtime.finish_step()  # outstanding state sends
                # per-group norms only at log steps (a pass over all gradients, and under ZeRO a
                # gather per parameter), on the boundary micro-batch: the reduced gradients of the
                # whole step exist only between its backward and engine.step()
                if self.engine.is_gradient_accumulation_boundary() and self._is_log_step(self.step + 1):
                    self.group_grad_norms = self._group_grad_norms()
                self.engine.step()
                total += float(loss.detach().float().item())
            loss_val = total / ga
        applied = bool(self.engine.was_step_applied())
        gnorm = _grad_norm(self.engine)
        # agree across ranks: a non-finite loss anywhere means the (synchronised) update was
        # discarded everywhere; the local loss alone would disagree between ranks
        bad = mdist.all_reduce_max(0.0 if (applied and math.isfinite(loss_val)) else 1.0) > 0
        if self.pipeline:  # already the mean over the engine's data axis (DP x CP)
            loss_mean = loss_val
        elif self.cp is not None:  # sum of the CP shares, mean over DP
            loss_mean = mdist.all_reduce_mean(loss_val, group=self._dp_cp_group()) * self.layout.cp
        else:
            loss_mean = mdist.all_reduce_mean(loss_val, group=self._dp_group())
        return loss_mean, not bad, gnorm

    def _dp_group(self):
        if self.layout.megatron:
            from miras_pretrain.parallel import state as pstate

            return pstate.data_parallel_group()
        return None

    def _dp_cp_group(self):
        """DP x CP (what metrics reduce over when every rank holds part of the batch)."""
        if self.layout.megatron:
            from miras_pretrain.parallel import state as pstate

            return pstate.data_context_parallel_group()
        return None

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval.batches`` micro-batches per data-parallel rank."""
        n = self.cfg.eval.batches
        self.engine.eval()
        it = iter(self.val_loader)
        scored = 0  # pipeline: this rank's label tokens (the other path counts in ``weights``)
        losses: list[float] = []
        weights: list[int] = []

        def nxt():
            b = next(it)
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in b.items()}

        try:
            if self.pipeline:
                ga = self.cfg.train.grad_accum_steps
                for _ in range(n):
                    try:  # read up front on every rank (see train_step)
                        micro = [nxt() for _ in range(ga)]
                    except StopIteration:
                        break
                    if self.cp is None:
                        losses.append(float(self.engine.eval_batch(self._pipe_iter(micro)).item()))
                    else:
                        with self.cp.pipeline_batch(self.engine.module, self._pipe_layout(micro)):
                            losses.append(float(self.engine.eval_batch(self._pipe_iter(micro)).item()))
                    weights.append(1)
                    # tokens scored (label count); every DP rank reads as many, CP ranks share them
                    scored += sum(int((m["labels"] != -100).sum()) for m in micro)
            else:
                for _ in range(n):
                    try:
                        batch = nxt()
                    except StopIteration:
                        break
                    # weight by real tokens: the loader pads the last eval batch with -100 rows
                    # (the forward runs even for an all-padding batch: under ZeRO-3 it is a
                    # collective every rank must join)
                    # (under CP: this rank's slice and its labels; summed over DP x CP below)
                    _, mean, count = self._forward_loss(batch)
                    loss = float(mean.float().item())
                    if count:
                        losses.append(loss * count)
                        weights.append(count)
        finally:
            self.engine.train()
            if self.cp is not None:
                self.cp.runtime.finish_step()
                self.cp.discard_stats()  # the cp/* metrics describe training steps only
        if self.pipeline:
            if not losses:
                raise ValueError("the validation split yielded no batch: make it larger or train.micro_batch_size smaller")
            self.last_eval_tokens = scored * self.layout.dp
            return sum(losses) / len(losses)
        # token-weighted mean over all data-parallel ranks (and the CP slices)
        group = self._dp_cp_group() if self.cp is not None else self._dp_group()
        tot = mdist.all_reduce_mean(sum(losses), group=group)
        cnt = mdist.all_reduce_mean(float(sum(weights)), group=group)
        if cnt == 0:
            raise ValueError("the validation split yielded no tokens: make it larger or train.micro_batch_size smaller")
        # the tokens this evaluation scored over all ranks (the line and val/tokens say how many)
        self.last_eval_tokens = round(cnt * self.layout.dp * (self.layout.cp if self.cp is not None else 1))
        return tot / cnt

    def _memory_stats(self) -> dict[str, float]:
        module = self.engine.module
        fn = getattr(module, "memory_stats", None)
        if fn is None or not self.cfg.log.memory_stats:
            return {}
        if self.cfg.train.zero_stage == 3:
            # ZeRO-3 keeps only a shard of each weight on a rank: gather the memory's initial
            # weights (the norms reported) for the call; collective, every rank is here
            import deepspeed

            params = [p for n, p in module.named_parameters() if "mem_init" in n]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                stats = fn()
        else:
            stats = fn()
        return {f"memory/{k}": float(v) for k, v in stats.items()}

    def save(self) -> Path:
        state = {
            "step": self.step,
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            "tokens_seen": self.tokens_seen,
            "val_history": self.val_history,
            "train_loader": self.train_loader.state_dict(),
            "rng": get_rng_state(),
        }
        meta = {**self._layout_meta(), "tokens_seen": self.tokens_seen, "run_name": self.cfg.run.name,
                "val_history": self.val_history, "model": self.model_cfg.to_dict(),
                "config": self.cfg.to_dict(),
                # what the shards were tokenized with: export refuses another tokenizer
                "tokenizer_sha256": self.train_loader.tokenizer_sha256,
                # > 0: written during a non-finite streak; pruning keeps the newest checkpoint from before it
                "nonfinite_streak": self.consecutive_skips}
        return self.ckpt.save(self.engine, self.step, state, meta)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """The training run: an optional evaluation at the start, then optimizer steps, each
        followed by its log row, evaluation and checkpoint when they are due, until
        ``train.max_steps``, the time limit, SIGTERM/SIGUSR1 or too many non-finite steps."""
        self._open_run()
        max_steps = self.cfg.train.max_steps
        stop = StopFlag.for_run()  # the CLI's flag when there is one: a signal during setup counts
        end: Optional[RunEnd] = None
        try:
            end = self._end_before_first_step(stop)
            if end is None:
                self._evaluate_at_start()
            while end is None and self.step < max_steps:
                loss, applied, gnorm = self._timed_train_step()
                spike = self._account_step(loss, applied, gnorm)
                self._log_if_due(gnorm, spike)
                # a finished run needs no time check (and all ranks skip the collective alike)
                out_of_time = self.step < max_steps and self.time_limit.reached()
                final = out_of_time or self.step == max_steps
                self._evaluate_if_due(final)
                self._checkpoint_if_due(final, out_of_time)
                if self.cfg.debug.sleep_per_step:  # slows a tiny run so tests can signal it mid-way
                    time.sleep(self.cfg.debug.sleep_per_step)
                end = self._end_at_time_limit() if out_of_time else self._end_on_signal(stop, final)
        except NonFiniteAbort as err:
            end = RunEnd.nonfinite(str(err))
            self.console.say(end.message)
        finally:
            stop.release()
            self.console.close()
        return self._close_run(end or RunEnd())

    def _open_run(self) -> None:
        """The per-run helpers: metrics logger, console, log window, spike monitor, time limit."""
        cfg, t = self.cfg, self.cfg.train
        self.logger = MetricsLogger(cfg, enabled=self.is_main)
        self.console = Console.open(enabled=self.is_main and not self.quiet, progress_bar=cfg.log.progress_bar,
                                    total=t.max_steps, initial=self.step, desc=cfg.run.name)
        # tokens of one optimizer step: over all data-parallel ranks, and on one rank (its slices under CP)
        self.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.layout.dp * self.seq_len
        self.tokens_per_rank = t.micro_batch_size * t.grad_accum_steps * self.seq_len / self.layout.cp
        # both clocks start before the evaluation at the start: the first log row's tokens/s and
        # the time limit include it
        self.window = LogWindow()
        self.time_limit = TimeLimit(t.time_limit_minutes)
        self.spikes = GradSpikeMonitor()
        self.last_checkpoint: Optional[Path] = None
        self._grad_order_checked = False
        if self.cp is not None:
            self.cp.discard_stats()  # the cp/* metrics describe training steps only

    def _evaluate_at_start(self) -> None:
        """The step-0 validation row (``eval.at_start``), unless resuming a run that has one."""
        if self.cfg.eval.at_start and self.step == 0 and not self.val_history:
            self._validate()

    def _timed_train_step(self) -> tuple[float, bool, float]:
        """:meth:`train_step` plus what context parallelism does around it: the gradient-order
        check on the job's first step (its backward) and the step time behind ``cp/wait_frac``."""
        t0 = time.perf_counter()
        check_order = self.cp is not None and not self._grad_order_checked
        if check_order:
            self.cp.arm_grad_order_check(self.engine.module)
        result = self.train_step()
        if check_order:
            self.cp.verify_grad_order()
            self._grad_order_checked = True
        if self.cp is not None:
            self.cp.end_step(time.perf_counter() - t0)
        return result

    def _account_step(self, loss: float, applied: bool, gnorm: float) -> bool:
        """Count the finished step (step, tokens, log window, skips) and warn on a gradient
        spike; returns whether it was one. Raises :class:`NonFiniteAbort` after
        ``train.max_consecutive_skips`` skipped steps in a row."""
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.window.add(loss if applied else None)
        spike = False
        if applied:
            self.consecutive_skips = 0
            warning = self.spikes.update(self.step, gnorm)  # gnorm is global: same on every rank
            if warning is not None:
                spike = True
                self.console.say(warning)
        else:
            self._record_skip(loss, gnorm)
        self.console.advance()
        return spike

    def _record_skip(self, loss: float, gnorm: float) -> None:
        """A step whose update was discarded (non-finite loss or gradient): report it and abort
        once too many came in a row."""
        limit = self.cfg.train.max_consecutive_skips
        self.skipped_total += 1
        self.consecutive_skips += 1
        self.console.say(f"step {self.step}: non-finite loss/gradient (loss={loss}, grad norm={gnorm}); "
                         f"update skipped ({self.consecutive_skips} in a row, {self.skipped_total} total)")
        self.logger.log(self.step, {"train/skipped_steps": self.skipped_total, "train/nonfinite": 1})
        if self.consecutive_skips >= limit:
            raise NonFiniteAbort(
                f"aborting at step {self.step}: {self.consecutive_skips} consecutive steps had a "
                f"non-finite loss or gradient (train.max_consecutive_skips={limit}); "
                "lower train.lr, check the data, or resume from the last checkpoint"
            )

    def _log_if_due(self, gnorm: float, spike: bool) -> None:
        """The ``train/*`` row of a log step (then a new window starts); on other steps only a
        gradient spike gets a row of its own."""
        if not self._is_log_step(self.step):
            if spike:
                self.logger.log(self.step, {"train/grad_spike": 1, "train/grad_norm": gnorm})
            return
        row = self._train_row(gnorm, spike)
        self.logger.log(self.step, row)
        self.console.report(self.step, row)  # bar postfix on a terminal, else one plain line
        self.window.reset()

    def _train_row(self, gnorm: float, spike: bool) -> dict[str, float]:
        """The metrics of the window that ends at this log step. Collective: the memory stats
        (ZeRO-3 gathers) and the CP metrics reduce over ranks, and every rank logs at the same steps."""
        tok_s = self.window.tokens_per_s(self.tokens_per_step)  # before the collectives below
        mean_loss = self.window.mean_loss()
        return {
            "train/loss": mean_loss,
            "train/ppl": perplexity(mean_loss) if math.isfinite(mean_loss) else float("nan"),
            "train/lr": float(self.engine.get_lr()[0]),
            "train/grad_norm": gnorm,
            "train/tokens_per_s": tok_s,
            "train/mfu": mfu(self.flops_per_token, tok_s, self.peak_total),
            "train/tokens_seen": self.tokens_seen,
            "train/skipped_steps": self.skipped_total,
            **({"train/grad_spike": 1} if spike else {}),
            **self.group_grad_norms,
            **memory_gib(self.device),
            **self._memory_stats(),
            **(self.cp.window_metrics(self.tokens_per_rank) if self.cp is not None else {}),
        }

    def _validate(self) -> None:
        """Evaluate now; record, log and print the validation loss of this step."""
        v = self.evaluate()
        self.val_history.append((self.step, v))
        tokens = self.last_eval_tokens
        self.logger.log(self.step, {"val/loss": v, "val/ppl": perplexity(v), "val/tokens": tokens})
        # how much was scored: eval.batches is a sample of the split, `miras-pretrain eval` scores all of it
        self.console.say(f"step {self.step}: val ({val_scope(tokens, self.val_split_tokens)}) loss {v:.4f}  "
                         f"ppl {perplexity(v):.2f}")

    def _evaluate_if_due(self, final: bool) -> None:
        """Every ``eval.interval`` steps, and on the last step of the job."""
        interval = self.cfg.eval.interval
        if (interval and self.step % interval == 0) or final:
            self._validate()

    def _checkpoint_if_due(self, final: bool, out_of_time: bool) -> None:
        """Every ``checkpoint.interval`` steps; on the last step with ``checkpoint.save_at_end``,
        and always when the time limit ends the job (the requeued job resumes from it)."""
        ck = self.cfg.checkpoint
        if (ck.interval and self.step % ck.interval == 0) or (final and (ck.save_at_end or out_of_time)):
            self.last_checkpoint = self.save()

    def _end_at_time_limit(self) -> RunEnd:
        """The job ran out of ``train.time_limit_minutes`` (its checkpoint is already saved)."""
        message = (f"time limit of {self.cfg.train.time_limit_minutes:g} min reached at step {self.step}; "
                   f"checkpoint {self.last_checkpoint}")
        self.console.say(message)
        return RunEnd.time_limit(message)

    def _end_before_first_step(self, stop: StopFlag) -> Optional[RunEnd]:
        """End at once, writing no checkpoint, when any rank was signalled while the job started
        (None otherwise): there is no new step to save, and the run directory keeps at most the
        checkpoints of an earlier job, so the requeued `--resume auto` continues (or starts) as
        if this job had never run. Collective, like :meth:`_end_on_signal`."""
        if mdist.all_reduce_max(1.0 if stop.received is not None else 0.0) == 0:
            return None
        name = signal_name(stop.received) if stop.received is not None else "a signal on another rank"
        message = f"stopped by {name} before the first step (step {self.step}); nothing new to checkpoint"
        self.console.say(message)
        return RunEnd.signal(message)

    def _end_on_signal(self, stop: StopFlag, final: bool) -> Optional[RunEnd]:
        """Checkpoint and end when any rank got SIGTERM/SIGUSR1 (None otherwise). Collective:
        every rank must agree before anyone saves, as a scheduler signals ranks at slightly
        different times. Not on the last step, which has ended the run anyway."""
        if final or mdist.all_reduce_max(1.0 if stop.received is not None else 0.0) == 0:
            return None
        if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}"):
            self.last_checkpoint = self.save()
        # "stopped by signal at step N" is what logs and launch tooling look for: the name goes last
        name = f" ({signal_name(stop.received)})" if stop.received is not None else ""
        message = f"stopped by signal at step {self.step}; checkpoint {self.last_checkpoint}{name}"
        self.console.say(message)
        return RunEnd.signal(message)

    def _close_run(self, end: RunEnd) -> TrainResult:
        """Summary, W&B finish and the loss-curve plot; what the job reports back."""
        if self.is_main and self.val_history:
            self.logger.summary({"val/first_loss": self.val_history[0][1], "val/last_loss": self.val_history[-1][1]})
        wandb_dir = self.logger.wandb_dir
        wandb_url = wandb_run_url(self.logger.run)
        self.logger.finish(exit_code=end.tracker_exit_code)
        png = None
        if self.is_main and self.logger.path is not None and end.plots:
            from miras_pretrain.train.plot import plot_loss_curve

            png = plot_loss_curve(self.logger.path, self.cfg.out_dir / "loss_curve.png", title=self.cfg.run.name)
        if self.is_main and not self.quiet:  # where everything is, after every run (loop.format_run_summary)
            print(format_run_summary(end, step=self.step, max_steps=self.cfg.train.max_steps,
                                     checkpoint=self.last_checkpoint, wandb_dir=wandb_dir, wandb_url=wandb_url,
                                     plot=png, metrics=self.logger.path, val_history=self.val_history), flush=True)
        return TrainResult(exit_code=end.exit_code, step=self.step, out_dir=self.cfg.out_dir,
                           checkpoint=self.last_checkpoint, val_history=list(self.val_history),
                           skipped_steps=self.skipped_total, wandb_dir=wandb_dir, message=end.message,
                           reason=end.reason)


def train(cfg: RunConfig, *, resume: Optional[str] = None, quiet: bool = False, overwrite: bool = False,
          allow_model_change: bool = False) -> TrainResult:
    """Run one training job; always tears the process group down and releases the run directory.

    ``overwrite``: a fresh run may replace an earlier run in ``run.out_dir`` (its checkpoints,
    metrics, plot and W&B run are deleted); otherwise that is a one-line error.
    ``allow_model_change``: resume into a model whose config differs from the checkpoint's."""
    trainer = Trainer(cfg, resume=resume, quiet=quiet, overwrite=overwrite, allow_model_change=allow_model_change)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        for name in ("train_loader", "val_loader"):
            loader = getattr(trainer, name, None)
            if loader is not None and hasattr(loader, "close"):
                loader.close()  # frees streaming's shared memory and cache files
        layout = getattr(trainer, "layout", None)
        if layout is not None:
            teardown_parallel(layout)
        trainer.release_run_dir()
