"""Training configuration: one YAML file plus ``--set key=value`` overrides, validated by the
schema engine (:mod:`miras_pretrain.schema`) into a :class:`RunConfig`.

Top-level sections (every field is in docs/training.md's config reference)::

    run:        name, out_dir, seed
    model:      a registered name (moneta_340m), a model YAML path, or a mapping of ModelConfig
                fields, optionally on ``preset`` + ``size`` or ``from: <name or path>``
    data:       DataConfig fields (miras_pretrain.data), optionally ``from: <yaml>``
    train:      optimisation (TrainConfig)
    parallel:   tensor, pipeline and context parallel sizes (ParallelConfig)
    eval:       validation cadence and size (EvalConfig)
    checkpoint: cadence, retention, directory (CheckpointConfig)
    log:        metrics cadence, progress bar, W&B (LogConfig)
    debug:      fault injection for tests (DebugConfig)

Every key is checked at load: an unknown key names the closest valid one, a key that moved
names its new home (:data:`MOVED_KEYS`), a bad value names the dotted key and the fix -- one line,
``config key 'train.lr' = -1.0 is not valid: must be > 0``. ``model`` and ``data`` stay plain
mappings on the RunConfig (the checkpoint stores them so); :func:`resolve_model_config` and
:func:`resolve_data_config` validate them, and the trainer calls both before any heavy work.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from miras_pretrain import config_yaml, schema
from miras_pretrain.parallel.context_parallel.rules import SCHEMES as CP_SCHEMES

# Keys that have a new home; a config that still uses one gets a one-line error naming it.
MOVED_KEYS: dict[str, str] = {
    "train.tensor_parallel": "parallel.tensor_parallel_size",
    "train.pipeline_parallel": "parallel.pipeline_parallel_size",
    "train.activation_checkpointing": "model.activation_checkpointing",
    "data.micro_batch_size": "train.micro_batch_size",
    "data.eval_batches": "eval.batches",
}


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Print a config warning to stderr, once per process (the demo and the trainer load a
    config several times) and only on the launch's first rank (``RANK`` unset or 0)."""
    if message in _warned or os.environ.get("RANK", "0") != "0":
        return
    _warned.add(message)
    print(message, file=sys.stderr, flush=True)


def _f(default: Any, doc: str, **meta: Any) -> Any:
    """A field with its config-reference line and constraints (schema metadata)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


def _moved_from(section: str) -> dict[str, str]:
    """``MOVED_KEYS`` of one section, by bare key (what :func:`schema.build` takes)."""
    return {k.split(".", 1)[1]: v for k, v in MOVED_KEYS.items() if k.startswith(section + ".")}


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunSection:
    """Where the run lives and how it is seeded."""

    name: str = _f("run", "run name (W&B run, SLURM job name)", nonempty=True)
    out_dir: str = _f("runs/run", "run directory: checkpoints/, wandb/, metrics.jsonl, loss_curve.png, "
                                  "the resolved config", nonempty=True)
    seed: int = _f(1234, "initialisation seed", ge=0)


@dataclass
class TrainConfig:
    """Optimisation.

    ``global batch = micro_batch_size * grad_accum_steps * data_parallel_size`` sequences of
    the data section's sequence length (data-parallel size = world / (tp * pp * cp): the ranks
    of a context-parallel group share their sequences).
    """

    max_steps: int = _f(1000, "optimizer steps", gt=0)
    micro_batch_size: int = _f(8, "sequences per data-parallel rank per micro-step (the loaders' batch)",
                               gt=0)
    grad_accum_steps: int = _f(1, "micro-steps per optimizer step", gt=0)
    lr: float = _f(3e-3, "peak AdamW learning rate", gt=0)
    min_lr_ratio: float = _f(0.1, "cosine decays from lr to lr * min_lr_ratio at max_steps", ge=0, le=1)
    warmup_steps: int = _f(100, "linear warmup steps", ge=0)
    weight_decay: float = _f(0.1, "AdamW weight decay", ge=0)
    betas: list[float] = _f([0.9, 0.95], "AdamW betas", length=2, ge=0, lt=1,
                            fix="two numbers in [0, 1)")
    eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = _f(1.0, "global L2 gradient-norm clip; 0 disables clipping", ge=0,
                          fix="use >= 0 (0 disables clipping)")
    zero_stage: Literal[1, 2, 3] = _f(1, "DeepSpeed ZeRO stage (pipelines: 1)")
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "auto = bf16 on CUDA, fp32 on CPU")
    no_decay_patterns: list[str] = _f(["norm", "bias", "mem_init"],
                                      "parameter-name substrings without weight decay (tensors with "
                                      "ndim < 2 never decay)")
    max_consecutive_skips: int = _f(10, "abort after this many consecutive steps skipped for "
                                        "non-finite loss or gradients", ge=1)
    zero3_persistence_threshold: Optional[int] = _f(
        None, "ZeRO-3 keeps parameters smaller than this whole on every rank; null = DeepSpeed's 1e5 "
              "(tests: 0)", ge=0)
    time_limit_minutes: Optional[float] = _f(
        None, "wall-clock limit of the training loop: evaluate, checkpoint, exit 75 (requeue); "
              "null = none", gt=0, fix="use a number > 0 or null")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available")
    threads: Optional[int] = _f(
        None, "torch CPU threads per process (--threads N sets it); null = CPUs / local processes, capped "
              "by OMP_NUM_THREADS and SLURM_CPUS_PER_TASK (miras_pretrain/threads.py)", ge=1,
        fix="use an integer >= 1, or null for the automatic choice")
    global_batch_size: Optional[int] = _f(
        None, "sequences per optimizer step over all data-parallel ranks; when set, grad_accum_steps is "
              "derived from it (global / (micro_batch_size * data-parallel size)) so the batch stays the same "
              "on any GPU count; null = micro_batch_size * grad_accum_steps * data-parallel size", gt=0,
        fix="use a number of sequences > 0 or null")
    init_from: Optional[str] = _f(
        None, "start a new run from these model weights (fresh optimizer, step 0): a consolidated .pt "
              "(tools/consolidate.py) or an `export hf` directory; null = random initialisation",
        nonempty=True, fix="give a path to a consolidated .pt or an exported directory, or null")

    def check(self, p: str) -> None:
        # not an error (a short smoke run of a long config is legitimate), but the lr then never
        # reaches train.lr and the cosine decay never runs: say so in one line
        if self.warmup_steps > self.max_steps:
            warn_once(f"warning: {p}.warmup_steps={self.warmup_steps} is larger than {p}.max_steps={self.max_steps}: "
                      f"the lr never reaches {p}.lr and never decays; lower {p}.warmup_steps")


@dataclass
class ParallelConfig:
    """How the processes split the model and the sequence (docs/training.md, docs/context_parallel.md).

    The world size must be a multiple of ``tensor_parallel_size * pipeline_parallel_size *
    context_parallel_size``; the rest is data parallelism. ``context_parallel_scheme``:
    ``auto`` = all-gather for affine memories (linear memory, dot/l2 bias, none/decay
    retention), state passing otherwise; ``state_passing`` for every Miras layer;
    ``all_gather`` (affine memories only). The rules that need the model and data sections
    (sequence length, scheme vs memory, halos) run in :func:`miras_pretrain.train.cp.check_cp_config`.
    """

    tensor_parallel_size: int = _f(1, "megatron-core tensor parallelism", ge=1)
    pipeline_parallel_size: int = _f(1, "DeepSpeed pipeline stages (use ZeRO-1)", ge=1)
    context_parallel_size: int = _f(1, "ranks that split one sequence (1 = no context parallelism)", ge=1,
                                    fix="use 1 for no context parallelism")
    context_parallel_scheme: str = _f("auto", "how Miras states cross CP ranks", choices=CP_SCHEMES)


@dataclass
class EvalConfig:
    """Validation perplexity on the held-out split every ``interval`` steps and at the end."""

    interval: int = _f(200, "steps between evaluations; 0 = only at the end", ge=0)
    batches: int = _f(16, "micro-batches per evaluation and data-parallel rank (caps the eval loader)",
                      ge=1)
    at_start: bool = _f(True, "evaluate before the first step")


@dataclass
class CheckpointConfig:
    """Sharded DeepSpeed checkpoints under ``dir`` (default ``<out_dir>/checkpoints``)."""

    interval: int = _f(500, "steps between checkpoints; 0 = only at the end (and on a signal)", ge=0)
    keep_last: int = _f(3, "checkpoints kept", ge=1)
    dir: Optional[str] = _f(None, "checkpoint directory; null = <run.out_dir>/checkpoints")
    save_at_end: bool = _f(True, "save after the last step")


@dataclass
class LogConfig:
    """Metrics cadence, console and W&B."""

    interval: int = _f(10, "steps between metric lines", ge=1)
    progress_bar: bool = _f(True, "console progress bar with loss, lr, tokens/s and MFU, when stdout and stderr "
                                  "are terminals; otherwise (a batch job's log) one plain line per log.interval")
    wandb: bool = _f(True, "log to W&B")
    wandb_mode: Literal["auto", "offline", "online", "disabled"] = _f(
        "auto", "auto = online when wandb_project and WANDB_API_KEY are set, else offline "
                "(files under <out_dir>/wandb)")
    wandb_project: Optional[str] = _f(None, "W&B project")
    wandb_entity: Optional[str] = _f(None, "W&B entity")
    peak_flops: Optional[float] = _f(None, "peak FLOP/s of one device for MFU; null = built-in table "
                                           "or a CPU estimate", gt=0)
    memory_stats: bool = _f(True, "log per-layer memory-state statistics")

    def check(self, p: str) -> None:
        if self.wandb_mode == "online" and not self.wandb_project:
            raise schema.bad_value(f"{p}.wandb_mode", self.wandb_mode, "needs log.wandb_project",
                                   "set log.wandb_project (and WANDB_API_KEY in the environment)")


@dataclass
class DebugConfig:
    """Fault injection used by tests; leave empty in real runs."""

    nan_loss_steps: list[int] = _f([], "optimizer steps (1-based) whose loss is multiplied by NaN", ge=1)
    sleep_per_step: float = _f(0.0, "seconds slept after every step (lets tests send signals)", ge=0)


@dataclass
class RunConfig:
    """The whole training configuration (one YAML file)."""

    run: RunSection = field(default_factory=RunSection)
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    # directory that relative paths inside model/data are resolved against (config file's dir)
    base_dir: str = "."

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.out_dir / "checkpoints"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return d


SECTIONS = ("run", "model", "data", "train", "parallel", "eval", "checkpoint", "log", "debug")
# the sections the schema engine builds here (model and data are validated on resolve)
_SECTION_TYPES = {"run": RunSection, "train": TrainConfig, "parallel": ParallelConfig, "eval": EvalConfig,
                  "checkpoint": CheckpointConfig, "log": LogConfig, "debug": DebugConfig}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.lr=1e-3", "model.n_layers=2"]`` -> ``[(key, yaml-parsed value)]``."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise schema.ConfigError(f"--set {item!r} is not valid: write --set section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        section = key.split(".", 1)[0]
        if "." not in key or section not in SECTIONS:
            guess = schema.closest(section, SECTIONS)
            hint = f" (did you mean '{guess}'?)" if guess and "." in key else ""
            raise schema.ConfigError(f"--set key '{key}' is not valid: write section.key with section one "
                                     f"of {', '.join(SECTIONS)}{hint}")
        try:
            value = config_yaml.loads(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = {}
            node[part] = nxt
        if isinstance(nxt, str):  # model: name/path -> {"from": ...} so keys can be overridden
            nxt = {"from": nxt}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise schema.ConfigError(f"--set key '{key}' is not valid: '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _expand_data(value: Any, base_dir: str) -> dict:
    """``data: path`` or ``data: {from: path, k: v}`` -> a flat mapping of fields."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = {"from": value}
    if not isinstance(value, dict):
        raise schema.bad_value("data", value, "expected a mapping or a path to a YAML file")
    value = dict(value)
    src = value.pop("from", None)
    if src is None:
        return value
    base = config_yaml.read_mapping(config_yaml.resolve_path(src, base_dir), "data.from")
    base.update(value)
    return base


def _refuse_moved(section: str, mapping: Any) -> None:
    if isinstance(mapping, dict):
        for key, new in _moved_from(section).items():
            if key in mapping:
                raise schema.moved_key(f"{section}.{key}", new)


def config_from_dict(raw: dict, overrides: list[str] | None = None, base_dir: str = ".") -> RunConfig:
    """Validate a raw mapping (+ ``--set`` overrides) into a :class:`RunConfig`."""
    from miras_pretrain.model.config import expand_model_section

    raw = dict(raw)
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    for k in raw:
        if k not in SECTIONS:
            raise schema.unknown_key("", k, list(SECTIONS))
    kwargs: dict[str, Any] = {"base_dir": str(base_dir)}
    for name in SECTIONS:
        if name == "model":
            kwargs[name] = expand_model_section(raw.get(name), base_dir)
            _refuse_moved(name, kwargs[name])
        elif name == "data":
            kwargs[name] = _expand_data(raw.get(name), base_dir)
            _refuse_moved(name, kwargs[name])
        else:
            kwargs[name] = schema.build(_SECTION_TYPES[name], raw.get(name), name, moved=_moved_from(name))
    return RunConfig(**kwargs)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML), apply ``--set`` overrides and validate every section."""
    path = Path(path)
    raw = config_yaml.read_mapping(path, "config")
    return config_from_dict(raw, overrides, base_dir=str(path.parent))


def resolve_model_config(cfg: RunConfig):
    """The model section as a validated ``ModelConfig``."""
    from miras_pretrain.model.config import ModelConfig

    if not cfg.model:
        raise schema.bad_value("model", cfg.model, "empty",
                               "name a model such as moneta_tiny (miras-pretrain models lists them) "
                               "or a model YAML path")
    return ModelConfig.from_dict(dict(cfg.model))


def resolve_data_config(cfg: RunConfig):
    """The data section as a validated ``DataConfig``, its loader batch size and evaluation cap
    taken from their one home in a training config (``train.micro_batch_size``, ``eval.batches``)."""
    from miras_pretrain.data import DataConfig

    data = DataConfig.from_dict(dict(cfg.data))
    # the number of micro-batches one evaluation reads: a pipeline step reads grad_accum_steps
    per_eval = cfg.eval.batches * (cfg.train.grad_accum_steps if cfg.parallel.pipeline_parallel_size > 1 else 1)
    return dataclasses.replace(data, micro_batch_size=cfg.train.micro_batch_size, eval_batches=per_eval)


def derived_grad_accum(cfg: RunConfig, world_size: int) -> int:
    """``train.grad_accum_steps`` for ``world_size`` processes: derived from
    ``train.global_batch_size`` when that is set (ValueError with the numbers when it does not
    divide), else the configured value."""
    t, par = cfg.train, cfg.parallel
    if t.global_batch_size is None:
        return t.grad_accum_steps
    model_par = par.tensor_parallel_size * par.pipeline_parallel_size * par.context_parallel_size
    dp = max(1, world_size // model_par)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size {t.global_batch_size} is not a multiple of train.micro_batch_size "
            f"{t.micro_batch_size} x {dp} data-parallel ranks ({world_size} processes / {model_par} model-parallel) "
            f"= {per_step}: change micro_batch_size, the process count or global_batch_size")
    return t.global_batch_size // per_step


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (the file a resumed run and a reader can trust)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
