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

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from miras_pretrain.train import dist as mdist
from miras_pretrain.train.checkpoint import CheckpointManager, check_resume_layout, find_latest, read_meta
from miras_pretrain.train.config import RunConfig, dump_config, resolve_model_config
from miras_pretrain.train.cp import TrainerCP, check_cp_config, launch_world_size
from miras_pretrain.train import data_bridge
from miras_pretrain.train.engine import build_engine, resolve_precision
from miras_pretrain.train.grad_stats import GradSpikeMonitor, grad_norms_by_group
from miras_pretrain.train.metrics import device_peak_flops, memory_gib, mfu
from miras_pretrain.train.rng import get_rng_state, seed_all, set_rng_state
from miras_pretrain.train.signals import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, StopFlag
from miras_pretrain.train.tracking import MetricsLogger


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


@dataclass
class _Layout:
    tp: int
    pp: int
    dp: int  # data parallel size WITHOUT the CP dimension (the loader's view)
    dp_rank: int
    world: int
    cp: int = 1

    @property
    def megatron(self) -> bool:
        """Whether megatron's parallel_state owns the process groups."""
        return self.tp > 1 or self.pp > 1 or self.cp > 1


def _setup_parallel(cfg: RunConfig, device: torch.device) -> _Layout:
    t = cfg.train
    cp = cfg.parallel.context_parallel_size
    if t.tensor_parallel > 1 or t.pipeline_parallel > 1 or cp > 1:
        from miras_pretrain.parallel import state as pstate

        mdist._fill_env_for_single_process()
        pstate.initialize_parallel(t.tensor_parallel, t.pipeline_parallel, cp=cp, seed=cfg.run.seed)
        return _Layout(t.tensor_parallel, t.pipeline_parallel, pstate.data_parallel_world_size(),
                       pstate.data_parallel_rank(), mdist.world_size(), cp)
    mdist.init_distributed(device)
    return _Layout(1, 1, mdist.world_size(), mdist.rank(), mdist.world_size())


def _teardown(layout: _Layout) -> None:
    if layout.megatron:
        from miras_pretrain.parallel import state as pstate

        pstate.destroy_parallel()
        mdist.reset_deepspeed_groups()
        mdist.restore_env()
    else:
        mdist.destroy()


def _build_model(model_cfg, layout: _Layout, cfg: RunConfig):
    """Plain model, or DeepSpeed pipeline stages when pipeline_parallel > 1."""
    if layout.pp > 1:
        from miras_pretrain.model import build_pipeline_module

        # activation checkpointing per block is done by the blocks themselves
        # (ModelConfig.activation_checkpointing), so the pipeline's own interval stays 0
        module = build_pipeline_module(model_cfg)
        _init_stage_like_single_process(module, model_cfg, cfg.run.seed)
        return module
    from miras_pretrain.model import build_model

    return build_model(model_cfg)


@torch.no_grad()
def _init_stage_like_single_process(module, model_cfg, seed: int) -> None:
    """Give this pipeline stage the weights the single-process model (same seed) has.

    Each stage builds only its own layers, so drawing their initial weights from the generator
    would differ from the one-process model's draws. Instead the whole model is built once on
    this rank from ``seed`` (TP-sharded exactly like the stage under TP: megatron's CPU init
    slices the full draw) and the stage copies its layers out of it; afterwards the full model
    is dropped. Costs one model build per rank at start-up.
    """
    from miras_pretrain.model import build_model
    from miras_pretrain.parallel.checkpoint import full_name

    seed_all(seed)
    ref = dict(build_model(model_cfg).named_parameters())
    for name, p in module.named_parameters():
        src = ref[full_name(module, name)]
        if src.shape != p.shape:
            raise RuntimeError(f"pipeline init: {name} {tuple(p.shape)} vs model {tuple(src.shape)}")
        p.copy_(src)
    del ref


def _grad_norm(engine) -> float:
    g = engine.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if hasattr(g, "item") else g)


class Trainer:
    """Holds the engine, loaders and counters of one job. Use :func:`train`."""

    def __init__(self, cfg: RunConfig, *, resume: Optional[str] = None, quiet: bool = False) -> None:
        self.cfg = cfg
        self.resume = resume
        self.quiet = quiet
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
        if cfg.train.activation_checkpointing and not self.model_cfg.activation_checkpointing:
            self.model_cfg = dataclasses.replace(self.model_cfg, activation_checkpointing=True)
        self.data_cfg = data_bridge.resolve(cfg)
        self.seq_len = data_bridge.seq_len_of(self.data_cfg)
        check_cp_config(cfg, self.model_cfg, self.seq_len, launch_world_size(), data_layout=self.data_cfg.layout)
        self.device = pick_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.layout = _setup_parallel(cfg, self.device)
        self.rank = mdist.rank()
        self.is_main = self.rank == 0
        seed_all(cfg.run.seed)
        # the CP runtime (None without CP): ranks of one CP group share every batch, each runs its slice
        self.cp = (TrainerCP(cfg.parallel.context_parallel_scheme, self.model_cfg.chunk_size)
                   if self.layout.cp > 1 else None)

        model = _build_model(self.model_cfg, self.layout, cfg)
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
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last)
        self.flops_per_token = self._flops_per_token()
        self.peak_total = device_peak_flops(self.device, cfg.log.peak_flops) * self.layout.world
        if self.is_main:
            cfg.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, cfg.out_dir / "config.yaml")
            (cfg.out_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))
        if self.resume:
            self._resume()
        self.train_iter = iter(self.train_loader)

    def _flops_per_token(self) -> float:
        from miras_pretrain.model import flops_per_token

        return float(flops_per_token(self.model_cfg, self.seq_len))

    def _layout_meta(self) -> dict[str, Any]:
        return {"world_size": self.layout.world, "tp": self.layout.tp, "pp": self.layout.pp,
                "cp": self.layout.cp, "dp": self.layout.dp, "zero_stage": self.cfg.train.zero_stage,
                "cp_scheme": self.cfg.parallel.context_parallel_scheme}

    def _resume(self) -> None:
        root = self.cfg.checkpoint_dir
        if self.resume == "auto":
            ckpt_dir = find_latest(root)
            if ckpt_dir is None:
                if self.is_main and not self.quiet:
                    print(f"resume auto: no complete checkpoint under {root}; starting from step 0", flush=True)
                return
        else:
            ckpt_dir = Path(self.resume)
            if not (ckpt_dir / "meta.json").is_file():
                raise FileNotFoundError(
                    f"--resume {self.resume}: not a complete checkpoint directory (no meta.json); "
                    "use --resume auto or a step_* directory"
                )
        check_resume_layout(read_meta(ckpt_dir), self._layout_meta(), ckpt_dir)
        state = self.ckpt.load(self.engine, ckpt_dir)
        self.step = int(state["step"])
        self.skipped_total = int(state["skipped_total"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.tokens_seen = int(state["tokens_seen"])
        self.val_history = [tuple(v) for v in state.get("val_history", [])]
        self.train_loader.load_state_dict(state["train_loader"])
        set_rng_state(state["rng"])
        if self.is_main and not self.quiet:
            print(f"resumed from {ckpt_dir} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ pieces of a step
    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.train_iter)
        except StopIteration:  # a new epoch over the training split
            self.train_iter = iter(self.train_loader)
            batch = next(self.train_iter)
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(loss to backpropagate, mean loss of this rank's tokens, their count)`` for one
        micro-batch. Without CP the first two are the same. Under CP the first is this rank's
        share of the micro-batch mean (``mean * cp_loss_scale``: the shares sum to the CP = 1
        loss over the CP group) and the count is the labels of this rank's slice."""
        ids, labels, cu = data_bridge.model_inputs(batch)
        if self.cp is None:
            loss = self._engine_loss(ids, labels, cu)
            return loss, loss, int((labels != -100).sum())
        local = self.cp.slice(ids, labels, cu)
        with self.cp.runtime.batch(local["cp_slice"]):
            loss = self._engine_loss(local["input_ids"], local["labels"], local.get("cu_seqlens"))
        return loss * local["cp_loss_scale"], loss, int((local["labels"] != -100).sum())

    def _engine_loss(self, ids: torch.Tensor, labels: torch.Tensor, cu: Optional[torch.Tensor]) -> torch.Tensor:
        """The engine's mean loss over ``labels``; ``cu_seqlens`` is passed only for packed
        documents (dense batches keep the model's plain signature)."""
        if cu is not None:
            return self.engine(ids, labels=labels, cu_seqlens=cu)
        return self.engine(ids, labels=labels)

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
                with self.cp.runtime.batch(self._pipe_layout(micro)):
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

            return pstate._ps().get_data_parallel_group()
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
                        with self.cp.runtime.batch(self._pipe_layout(micro)):
                            losses.append(float(self.engine.eval_batch(self._pipe_iter(micro)).item()))
                    weights.append(1)
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
            return sum(losses) / len(losses)
        # token-weighted mean over all data-parallel ranks (and the CP slices)
        group = self._dp_cp_group() if self.cp is not None else self._dp_group()
        tot = mdist.all_reduce_mean(sum(losses), group=group)
        cnt = mdist.all_reduce_mean(float(sum(weights)), group=group)
        if cnt == 0:
            raise ValueError("the validation split yielded no tokens: make it larger or train.micro_batch_size smaller")
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
                "config": self.cfg.to_dict()}
        return self.ckpt.save(self.engine, self.step, state, meta)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        cfg = self.cfg
        t = cfg.train
        logger = MetricsLogger(cfg, enabled=self.is_main)
        stop = StopFlag().install()
        bar = None
        if self.is_main and cfg.log.progress_bar and not self.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc=cfg.run.name, unit="step",
                       dynamic_ncols=True, smoothing=0.1)
        say = (bar.write if bar is not None else print) if (self.is_main and not self.quiet) else (lambda *_: None)
        tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.layout.dp * self.seq_len
        last_ckpt: Optional[Path] = None
        exit_code = EXIT_OK
        message = ""
        reason = "done"
        loop_t0 = time.perf_counter()
        limit_s = t.time_limit_minutes * 60 if t.time_limit_minutes else None
        window_losses: list[float] = []
        window_t0 = time.perf_counter()
        window_steps = 0
        spikes = GradSpikeMonitor()
        try:
            if cfg.eval.at_start and self.step == 0 and not self.val_history:
                v = self.evaluate()
                self.val_history.append((0, v))
                logger.log(0, {"val/loss": v, "val/ppl": math.exp(min(v, 50.0))})
                say(f"step 0: val loss {v:.4f}  ppl {math.exp(min(v, 50.0)):.2f}")
            # per-rank tokens of one optimizer step (this rank's slices under CP)
            tokens_per_rank = t.micro_batch_size * t.grad_accum_steps * self.seq_len / self.layout.cp
            if self.cp is not None:
                self.cp.discard_stats()
            check_order = self.cp is not None
            while self.step < t.max_steps:
                step_t0 = time.perf_counter()
                if check_order:
                    self.cp.arm_grad_order_check(self.engine.module)
                loss, applied, gnorm = self.train_step()
                if check_order:  # once per job: the first step's backward
                    self.cp.verify_grad_order()
                    check_order = False
                if self.cp is not None:
                    self.cp.end_step(time.perf_counter() - step_t0)
                self.step += 1
                window_steps += 1
                self.tokens_seen += tokens_per_step
                spike = False
                if applied:
                    self.consecutive_skips = 0
                    window_losses.append(loss)
                    warning = spikes.update(self.step, gnorm)  # gnorm is global: same on every rank
                    if warning is not None:
                        spike = True
                        say(warning)
                else:
                    self.skipped_total += 1
                    self.consecutive_skips += 1
                    say(f"step {self.step}: non-finite loss/gradient (loss={loss}, grad norm={gnorm}); "
                        f"update skipped ({self.consecutive_skips} in a row, {self.skipped_total} total)")
                    logger.log(self.step, {"train/skipped_steps": self.skipped_total, "train/nonfinite": 1})
                    if self.consecutive_skips >= t.max_consecutive_skips:
                        raise NonFiniteAbort(
                            f"aborting at step {self.step}: {self.consecutive_skips} consecutive steps had a "
                            f"non-finite loss or gradient (train.max_consecutive_skips={t.max_consecutive_skips}); "
                            "lower train.lr, check the data, or resume from the last checkpoint"
                        )
                if bar is not None:
                    bar.update(1)
                log_step = self._is_log_step(self.step)
                if spike and not log_step:  # the spike's own row; the log step's row carries it otherwise
                    logger.log(self.step, {"train/grad_spike": 1, "train/grad_norm": gnorm})
                if log_step:
                    dt = max(time.perf_counter() - window_t0, 1e-9)
                    tok_s = tokens_per_step * window_steps / dt
                    mean_loss = sum(window_losses) / len(window_losses) if window_losses else float("nan")
                    row = {
                        "train/loss": mean_loss,
                        "train/ppl": math.exp(min(mean_loss, 50.0)) if math.isfinite(mean_loss) else float("nan"),
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
                        # collective over all ranks (every rank logs at the same steps)
                        **(self.cp.window_metrics(tokens_per_rank) if self.cp is not None else {}),
                    }
                    logger.log(self.step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{row['train/lr']:.2e}",
                                        tok_s=f"{tok_s:.0f}", refresh=False)
                    window_losses, window_steps, window_t0 = [], 0, time.perf_counter()
                final = self.step == t.max_steps
                # the time limit must be agreed on by all ranks (clocks differ slightly)
                out_of_time = limit_s is not None and not final and mdist.all_reduce_max(
                    1.0 if time.perf_counter() - loop_t0 > limit_s else 0.0) > 0
                if out_of_time:
                    final = True
                if (cfg.eval.interval and self.step % cfg.eval.interval == 0) or final:
                    v = self.evaluate()
                    self.val_history.append((self.step, v))
                    logger.log(self.step, {"val/loss": v, "val/ppl": math.exp(min(v, 50.0))})
                    say(f"step {self.step}: val loss {v:.4f}  ppl {math.exp(min(v, 50.0)):.2f}")
                if (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0) or (
                        final and (cfg.checkpoint.save_at_end or out_of_time)):
                    last_ckpt = self.save()
                if cfg.debug.sleep_per_step:
                    time.sleep(cfg.debug.sleep_per_step)
                # every rank must agree before anyone saves: a scheduler signals ranks at
                # slightly different times
                if out_of_time:
                    message = (f"time limit of {t.time_limit_minutes:g} min reached at step {self.step}; "
                               f"checkpoint {last_ckpt}")
                    say(message)
                    exit_code, reason = EXIT_REQUEUE, "time_limit"
                    break
                if not final and mdist.all_reduce_max(1.0 if stop.received is not None else 0.0) > 0:
                    if last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:08d}"):
                        last_ckpt = self.save()
                    message = f"stopped by signal at step {self.step}; checkpoint {last_ckpt}"
                    say(message)
                    exit_code, reason = EXIT_REQUEUE, "signal"
                    break
        except NonFiniteAbort as err:
            message = str(err)
            exit_code, reason = EXIT_NONFINITE, "nonfinite"
            say(message)
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        if self.is_main and self.val_history:
            logger.summary({"val/first_loss": self.val_history[0][1], "val/last_loss": self.val_history[-1][1]})
        wandb_dir = logger.wandb_dir
        logger.finish(exit_code=0 if exit_code in (EXIT_OK, EXIT_REQUEUE) else exit_code)
        if self.is_main and logger.path is not None and reason in ("done", "time_limit"):
            from miras_pretrain.train.plot import plot_loss_curve

            plot_loss_curve(logger.path, cfg.out_dir / "loss_curve.png", title=cfg.run.name)
        return TrainResult(exit_code=exit_code, step=self.step, out_dir=cfg.out_dir, checkpoint=last_ckpt,
                           val_history=list(self.val_history), skipped_steps=self.skipped_total,
                           wandb_dir=wandb_dir, message=message, reason=reason)


def train(cfg: RunConfig, *, resume: Optional[str] = None, quiet: bool = False) -> TrainResult:
    """Run one training job; always tears the process group down."""
    trainer = Trainer(cfg, resume=resume, quiet=quiet)
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
            _teardown(layout)
