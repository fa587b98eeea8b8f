"""The trainer's context-parallel (CP) glue: config checks, batch slicing, loss scale, metrics.

The CP runtime and its rules live in :mod:`miras_pretrain.parallel.context_parallel`; this
module only adapts them to the training loop (see docs/context_parallel.md, "Trainer"):

* :func:`check_cp_config` -- the CP rules (checked by the runtime's one validator, naming the
  config keys) plus the launch's and the engine's limits, each a one-line ``ValueError``; run
  before any process-group work.
* :class:`TrainerCP` -- per process: the :class:`ContextParallel` runtime bound to megatron's CP
  group, :meth:`TrainerCP.slice` (this rank's part of a batch every rank of the group received
  whole) and the ``cp/*`` metrics of a logging window.

Loss and gradient convention: each CP rank's loss is the model's mean over its own labels times
``cp_loss_scale`` (its share of the micro-batch's counted labels), so the SUM over the CP group
is the CP = 1 loss. The non-pipeline engine gets the DeepSpeed ``mpu`` whose sequence-parallel
names are the CP group: DeepSpeed then reduces gradients over DP x CP and divides by DP only
(= sum over CP). DeepSpeed's pipeline engine knows no CP: its grid's data axis is DP x CP (same
rank order as megatron's tp-cp-dp-pp layout) and it AVERAGES over it, so there the loss is
additionally multiplied by the CP size (:meth:`TrainerCP.pipe_loss_scale`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from miras_pretrain.parallel import state
from miras_pretrain.parallel.context_parallel import (
    ContextParallel, CPContext, CPGroup, CPSlice, FieldNames, slice_batch_for_cp, validate_cp_model,
)

# CPStats fields summed per logging window, in this order (one all-reduce each for SUM and MAX)
_FIELDS = ("wait_s", "comm_s", "bytes_sent", "messages", "tokens")


def launch_world_size() -> int:
    """Number of processes of this job, read from the launcher's environment (before any
    process group exists): torchrun / deepspeed ``WORLD_SIZE``, SLURM ``SLURM_NTASKS`` for one
    process per task, 1 for a lone process."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


# how CP errors name the training config's keys
CONFIG_FIELD_NAMES = FieldNames(
    seq_len="data.seq_len", cp_size="parallel.context_parallel_size",
    scheme="parallel.context_parallel_scheme", chunk_size="model.chunk_size",
    activation_checkpointing="model.activation_checkpointing",
    conv_size="model.conv_size", window="model.window", config_keys=True,
)


def check_cp_config(cfg, model_cfg, seq_len: int, world_size: int, *, data_layout: str = "packed") -> None:
    """Validate the ``parallel`` section against the launch, the model, the data and the engine.

    Args:
        cfg: the ``RunConfig``; model_cfg: its resolved ``ModelConfig``; seq_len: ``data.seq_len``;
        world_size: number of processes of the job; data_layout: ``data.layout``.

    Raises ValueError (one line naming the key and the fix) when the world size is not a
    multiple of tp * pp * cp; when a rule of context parallelism itself fails
    (:func:`~miras_pretrain.parallel.context_parallel.validate_cp_model`: slices of whole
    chunks, scheme vs memory, activation checkpointing, halos); and for the engine's limits with
    CP > 1: ZeRO-3, packed documents (``data.layout: documents``) with pipeline parallelism.
    """
    par = cfg.parallel
    tp, pp, cp = par.tensor_parallel_size, par.pipeline_parallel_size, par.context_parallel_size
    span = tp * pp * cp
    if world_size % span:
        raise ValueError(
            f"config key 'parallel.context_parallel_size' = {cp}: the world size {world_size} is not a multiple of "
            f"parallel.tensor_parallel_size x parallel.pipeline_parallel_size x parallel.context_parallel_size = "
            f"{tp} x {pp} x {cp} = {span}: start a multiple of {span} processes or change these sizes"
        )
    validate_cp_model(model_cfg, seq_len, cp, scheme=par.context_parallel_scheme,
                      names=CONFIG_FIELD_NAMES)
    if cp == 1:
        return
    if cfg.train.zero_stage == 3:
        # measured: the losses drift from CP = 1 from step 2 on. DeepSpeed 0.19.8's ZeRO-3
        # reduce-scatter averages gradients over DP x CP (its sequence-parallel factor is applied
        # on the all-reduce path only), and with reduce_scatter off the global grad norm is still
        # wrong; ZeRO-1/2 are exact (tested)
        raise ValueError(
            f"config key 'train.zero_stage' = 3 is not supported with parallel.context_parallel_size = {cp} "
            "(DeepSpeed's ZeRO-3 does not reduce gradients correctly over context-parallel ranks): use zero_stage 1 or 2"
        )
    if pp > 1 and data_layout == "documents":
        raise ValueError(
            "config key 'data.layout' = 'documents' is not supported with parallel.context_parallel_size > 1 and "
            "parallel.pipeline_parallel_size > 1 (one CP layout per pipeline batch): use data.layout: packed"
        )


@dataclass
class _Window:
    """CP counters summed over the optimizer steps of one logging window (this rank)."""

    steps: int = 0
    seconds: float = 0.0
    sums: list[float] = field(default_factory=lambda: [0.0] * len(_FIELDS))


class TrainerCP:
    """One process's CP state in the trainer (build after ``initialize_parallel(cp=...)``)."""

    def __init__(self, scheme: str, chunk_size: int) -> None:
        self.runtime = ContextParallel(CPGroup.from_megatron(), scheme)
        self.size = self.runtime.group.size
        self.rank = state.context_parallel_rank()
        if self.rank != self.runtime.group.rank:
            raise RuntimeError(f"megatron CP rank {self.rank} != position {self.runtime.group.rank} in its CP group")
        self.chunk_size = chunk_size
        self.window = _Window()

    # ------------------------------------------------------------------ batches
    def slice(self, ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: Any) -> dict[str, Any]:
        """This rank's part of one micro-batch in the model's convention (``ids``/``labels``
        [B, T], ``cu_seqlens`` [N+1] with B == 1 or None). Returns ``slice_batch_for_cp``'s dict:
        ``input_ids``/``labels`` [B, T/cp], ``cu_seqlens`` (local, or None), ``cp_slice``,
        ``cp_loss_scale``."""
        batch = {"input_ids": ids, "labels": labels}
        if cu_seqlens is not None:
            batch["cu_seqlens"] = cu_seqlens
        return slice_batch_for_cp(batch, self.rank, self.size, chunk_size=self.chunk_size)

    @contextlib.contextmanager
    def pipeline_batch(self, module: torch.nn.Module, layout: CPSlice) -> Iterator[CPContext]:
        """Bind one pipeline batch's CP context to the pipeline ``module`` (built by
        ``build_pipeline_module``) around ``engine.train_batch`` / ``eval_batch``: the engine
        calls the stages with activations only, so the context cannot be an argument there."""
        with self.runtime.batch(layout) as context, module.context_parallel(context):
            yield context

    def pipe_loss_scale(self, local: dict[str, Any]) -> float:
        """Loss factor for DeepSpeed's pipeline engine, which averages over DP x CP."""
        return float(local["cp_loss_scale"]) * self.size

    # ------------------------------------------------------------------ gradient order guard
    def arm_grad_order_check(self, module: torch.nn.Module) -> None:
        """Record the order in which this rank's parameter gradients become ready (next step).

        DeepSpeed ZeRO packs gradients into its reduction buckets in that order, so it must be
        the same on every rank of a DP x CP group; CP ranks run different communication nodes
        in backward (the first rank receives no state, the last sends none), which must not
        change it. :meth:`verify_grad_order` turns a violation into a clear error instead of
        silently mixed-up gradients."""
        self._order: list[str] = []
        self._hooks = []
        for name, p in module.named_parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda _p, name=name: self._order.append(name)))

    def verify_grad_order(self) -> None:
        """Compare the recorded order over the DP x CP group (collective); raise on mismatch."""
        import torch.distributed as dist

        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        group = state.data_context_parallel_group()
        orders: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(orders, self._order, group=group)
        if any(o != orders[0] for o in orders):
            bad = next(i for i, o in enumerate(orders) if o != orders[0])
            raise RuntimeError(
                f"context parallelism: parameter gradients became ready in a different order on DP x CP rank {bad} "
                f"than on rank 0 ({len(orders[bad])} vs {len(orders[0])} gradients); DeepSpeed's gradient reduction "
                "would mix parameters up: report this model configuration"
            )

    # ------------------------------------------------------------------ metrics
    def discard_stats(self) -> None:
        """Drop the counters of non-training work (evaluation forwards)."""
        self.runtime.reset_stats()

    def end_step(self, seconds: float) -> None:
        """Fold the runtime's counters of one optimizer step (``seconds`` long) into the window."""
        s = self.runtime.reset_stats()
        w = self.window
        w.steps += 1
        w.seconds += seconds
        for i, name in enumerate(_FIELDS):
            w.sums[i] += float(getattr(s, name))

    def window_metrics(self, tokens_per_rank_step: float) -> dict[str, float]:
        """The ``cp/*`` metrics of the window, reduced over ALL ranks (collective: every rank
        calls it at the same step), then reset. Per optimizer step:

        ``cp/tokens`` tokens of this rank's slices (mean over ranks), ``cp/tokens_max``;
        ``cp/wait_s`` seconds blocked on another rank's memory state or state gradient (max
        over ranks, the slowest rank sets the pace), ``cp/wait_s_mean``; ``cp/wait_frac`` =
        ``cp/wait_s`` / step time; ``cp/comm_s`` other CP communication (halos, all-gathers,
        send completion; max); ``cp/bytes_sent`` and ``cp/messages`` per rank (mean);
        ``cp/layer_tokens`` tokens through the Miras layers per rank (= tokens x Miras layers
        on this rank's pipeline stage; mean)."""
        import torch.distributed as dist

        w, self.window = self.window, _Window()
        n = max(w.steps, 1)
        local = torch.tensor([x / n for x in w.sums] + [tokens_per_rank_step, w.seconds / n], dtype=torch.float64)
        total, peak = local.clone(), local.clone()
        world = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
            total, peak = total.to(dev), peak.to(dev)
            dist.all_reduce(total)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            total, peak = total.cpu(), peak.cpu()
        mean = (total / world).tolist()
        peak = peak.tolist()
        idx = {name: i for i, name in enumerate(_FIELDS)}
        step_s = peak[-1]
        return {
            "cp/tokens": mean[-2],
            "cp/tokens_max": peak[-2],
            "cp/wait_s": peak[idx["wait_s"]],
            "cp/wait_s_mean": mean[idx["wait_s"]],
            "cp/wait_frac": peak[idx["wait_s"]] / step_s if step_s > 0 else 0.0,
            "cp/comm_s": peak[idx["comm_s"]],
            "cp/bytes_sent": mean[idx["bytes_sent"]],
            "cp/messages": mean[idx["messages"]],
            "cp/layer_tokens": mean[idx["tokens"]],
        }
