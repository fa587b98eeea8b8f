"""Training configuration: validated dataclasses loaded from YAML plus ``--set key=value`` overrides.

A training YAML (``configs/<name>.yaml``) has these top-level sections::

    run:        name, out_dir, seed
    model:      a path to a model YAML (configs/models/...), or a mapping of ModelConfig fields,
                optionally with ``from: <model yaml>`` as the base the other keys override
    data:       a mapping of DataConfig fields (miras_pretrain.data), optionally ``from: <yaml>``
    train:      optimisation and parallel layout (TrainConfig)
    parallel:   context (sequence) parallelism (ParallelConfig; tp/pp stay in ``train``)
    eval:       validation cadence (EvalConfig)
    checkpoint: cadence, retention, directory (CheckpointConfig)
    log:        metrics cadence, progress bar, W&B (LogConfig)
    debug:      fault injection for tests (DebugConfig)

Every key is checked: an unknown key or a value of the wrong type/range raises ``ValueError``
with one line naming the dotted key (``train.lr``) and what is accepted. ``model`` and ``data``
are validated by their owners' ``from_dict`` (ModelConfig / DataConfig) in :func:`resolve_model_config`
and :func:`resolve_data_config`, which the trainer calls before any heavy work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# --------------------------------------------------------------------------------------------
# generic dataclass <- mapping conversion with one-line errors
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to ``tp`` or raise a one-line ValueError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ValueError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ValueError(
            f"config key '{key}' = {value!r} is not valid: expected {_type_name(tp)}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(
                f"config key '{key}' = {value!r} is not valid: choose one of "
                + ", ".join(repr(c) for c in choices)
            )
        return value
    if origin in (list, tuple):
        (inner, *_rest) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' = {value!r} is not valid: expected a list")
        out = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key '{key}' = {value!r} is not valid: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # YAML reads 1e3 as a string: accept integral numbers written that way
            try:
                f = float(value)
            except (TypeError, ValueError):
                f = None
            if f is None or isinstance(value, bool) or f != int(f):
                raise ValueError(f"config key '{key}' = {value!r} is not valid: expected an integer")
            return int(f)
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"config key '{key}' = {value!r} is not valid: expected a number")
        try:
            # PyYAML parses "3e-3" (no dot) as a string; accept it as the number it means
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key '{key}' = {value!r} is not valid: expected a number") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}' = {value!r} is not valid: expected a string")
        return value
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' = {value!r} is not valid: expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return section_from_dict(tp, value, key)
    return value


def section_from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config section '{prefix}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise ValueError(
                f"unknown config key '{prefix}.{k}' (valid keys in '{prefix}': {', '.join(fields)})"
            )
        kwargs[k] = _coerce(f"{prefix}.{k}", v, hints[k])
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"config key '{key}' {msg}")


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunSection:
    """Where the run lives and how it is seeded."""

    name: str = "run"
    # run directory: checkpoints/, wandb/, metrics.jsonl, loss_curve.png, resolved config
    out_dir: str = "runs/run"
    seed: int = 1234

    def validate(self, p: str) -> None:
        _require(bool(self.name), f"{p}.name", "must not be empty")
        _require(bool(self.out_dir), f"{p}.out_dir", "must not be empty")
        _require(self.seed >= 0, f"{p}.seed", f"= {self.seed} must be >= 0")


@dataclass
class TrainConfig:
    """Optimisation and parallel layout.

    ``global batch = micro_batch_size * grad_accum_steps * data_parallel_size`` sequences of
    the data section's sequence length (data-parallel size = world / (tp * pp * cp): the ranks
    of a context-parallel group share their sequences).
    """

    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 3e-3
    # cosine decays from lr to lr * min_lr_ratio at max_steps (after warmup)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # global L2 gradient-norm clip; 0 disables clipping
    grad_clip: float = 1.0
    zero_stage: Literal[1, 2, 3] = 1
    # auto = bf16 on CUDA, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # parameter-name substrings that get no weight decay (besides every tensor with ndim < 2,
    # which covers norms, biases and gate biases)
    no_decay_patterns: list[str] = field(
        default_factory=lambda: ["norm", "bias", "mem_init"]
    )
    # abort after this many consecutive optimizer steps skipped for non-finite loss/gradients
    max_consecutive_skips: int = 10
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed default 1e5 when
    # null); tests set 0 so a tiny model is really partitioned
    zero3_persistence_threshold: Optional[int] = None
    # wall-clock limit of this job's training loop (minutes): when reached, evaluate, save a
    # checkpoint and exit with the requeue code (75) so a resubmitted job continues; null = none
    time_limit_minutes: Optional[float] = None
    # "cpu" or "cuda"; auto picks cuda when available
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self, p: str) -> None:
        _require(self.max_steps > 0, f"{p}.max_steps", f"= {self.max_steps} must be > 0")
        _require(self.micro_batch_size > 0, f"{p}.micro_batch_size", "must be > 0")
        _require(self.grad_accum_steps > 0, f"{p}.grad_accum_steps", "must be > 0")
        _require(self.lr > 0, f"{p}.lr", f"= {self.lr} must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", "must be in [0, 1]")
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{p}.betas",
            f"= {self.betas} must be two numbers in [0, 1)",
        )
        _require(self.eps > 0, f"{p}.eps", "must be > 0")
        _require(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.tensor_parallel >= 1, f"{p}.tensor_parallel", "must be >= 1")
        _require(self.pipeline_parallel >= 1, f"{p}.pipeline_parallel", "must be >= 1")
        _require(self.max_consecutive_skips >= 1, f"{p}.max_consecutive_skips", "must be >= 1")
        _require(self.time_limit_minutes is None or self.time_limit_minutes > 0,
                 f"{p}.time_limit_minutes", "must be > 0 or null")


@dataclass
class ParallelConfig:
    """Context (sequence) parallelism: one sequence split into ``context_parallel_size``
    contiguous slices, one per rank of a CP group (docs/context_parallel.md).

    The world size must be a multiple of ``train.tensor_parallel * train.pipeline_parallel *
    context_parallel_size``; the rest is data parallelism. ``context_parallel_scheme``:
    ``auto`` = all-gather for affine memories (linear memory, dot/l2 bias, none/decay
    retention), state passing otherwise; ``state_passing`` for every Miras layer;
    ``all_gather`` (affine memories only). The checks that need the model and data sections
    (sequence length, scheme vs memory, halos) run in :func:`miras_pretrain.train.cp.check_cp_config`.
    """

    context_parallel_size: int = 1
    context_parallel_scheme: Literal["auto", "state_passing", "all_gather"] = "auto"

    def validate(self, p: str) -> None:
        _require(self.context_parallel_size >= 1, f"{p}.context_parallel_size",
                 f"= {self.context_parallel_size} must be >= 1 (1 = no context parallelism)")


@dataclass
class EvalConfig:
    """Validation perplexity on the held-out split every ``interval`` steps and at the end."""

    interval: int = 200  # 0 = only at the end
    batches: int = 16  # micro-batches per evaluation (per data-parallel rank)
    at_start: bool = True  # evaluate before the first step (gives the "first" val loss)

    def validate(self, p: str) -> None:
        _require(self.interval >= 0, f"{p}.interval", "must be >= 0")
        _require(self.batches >= 1, f"{p}.batches", "must be >= 1")


@dataclass
class CheckpointConfig:
    """Sharded DeepSpeed checkpoints under ``dir`` (default ``<out_dir>/checkpoints``)."""

    interval: int = 500  # 0 = only at the end (and on a signal)
    keep_last: int = 3
    dir: Optional[str] = None
    save_at_end: bool = True

    def validate(self, p: str) -> None:
        _require(self.interval >= 0, f"{p}.interval", "must be >= 0")
        _require(self.keep_last >= 1, f"{p}.keep_last", "must be >= 1")


@dataclass
class LogConfig:
    """Metrics cadence, console and W&B."""

    interval: int = 10
    progress_bar: bool = True
    # W&B: "auto" = online when wandb_project is set and WANDB_API_KEY is in the environment,
    # offline (files under <out_dir>/wandb, no network) otherwise
    wandb: bool = True
    wandb_mode: Literal["auto", "offline", "online", "disabled"] = "auto"
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    # peak FLOP/s of ONE device for MFU; null = built-in table (CUDA name) or a CPU estimate
    peak_flops: Optional[float] = None
    memory_stats: bool = True  # log model.memory_stats() (per-layer memory-state statistics)

    def validate(self, p: str) -> None:
        _require(self.interval >= 1, f"{p}.interval", "must be >= 1")
        _require(
            self.wandb_mode != "online" or bool(self.wandb_project),
            f"{p}.wandb_mode",
            "= 'online' needs log.wandb_project set (and WANDB_API_KEY in the environment)",
        )
        _require(self.peak_flops is None or self.peak_flops > 0, f"{p}.peak_flops", "must be > 0")


@dataclass
class DebugConfig:
    """Fault injection used by tests; leave empty in real runs."""

    # optimizer steps (1-based) whose loss is multiplied by NaN before backward
    nan_loss_steps: list[int] = field(default_factory=list)
    # seconds to sleep after every optimizer step (lets tests deliver signals mid-run)
    sleep_per_step: float = 0.0

    def validate(self, p: str) -> None:
        _require(all(s >= 1 for s in self.nan_loss_steps), f"{p}.nan_loss_steps", "entries must be >= 1")
        _require(self.sleep_per_step >= 0, f"{p}.sleep_per_step", "must be >= 0")


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


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.lr=1e-3", "model.n_layers=2"]`` -> ``[(key, yaml-parsed value)]``."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not valid: write --set section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if "." not in key or key.split(".", 1)[0] not in SECTIONS:
            raise ValueError(
                f"--set key '{key}' is not valid: write section.key with section one of {', '.join(SECTIONS)}"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
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
        if isinstance(nxt, str):  # model: path -> {"from": path} so keys can be overridden
            nxt = {"from": nxt}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise ValueError(f"--set key '{key}': '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path} (check the path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ValueError(f"{what} file {path} is not valid YAML: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} must contain a mapping at the top level")
    return data


def resolve_path(path: str | Path, base_dir: str | Path) -> Path:
    """A path from a config: as given if it exists (relative to CWD), else relative to the
    config file's directory and its parent (so ``configs/models/x.yaml`` works from anywhere)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (Path(base_dir), Path(base_dir).parent):
        if (base / p).exists():
            return base / p
    return p


def _expand_from(section: str, value: Any, base_dir: str) -> dict:
    """``model: path`` or ``model: {from: path, k: v}`` -> a flat mapping of fields."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = {"from": value}
    if not isinstance(value, dict):
        raise ValueError(f"config section '{section}' must be a mapping or a path to a YAML file")
    value = dict(value)
    src = value.pop("from", None)
    if src is None:
        return value
    path = resolve_path(src, base_dir)
    base = _read_yaml(path, f"{section}.from")
    base.update(value)
    return base


def config_from_dict(raw: dict, overrides: list[str] | None = None, base_dir: str = ".") -> RunConfig:
    """Validate a raw mapping (+ ``--set`` overrides) into a :class:`RunConfig`."""
    raw = dict(raw)
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    for k in raw:
        if k not in SECTIONS:
            raise ValueError(f"unknown config section '{k}' (valid: {', '.join(SECTIONS)})")
    kwargs: dict[str, Any] = {"base_dir": str(base_dir)}
    hints = typing.get_type_hints(RunConfig)
    for name in SECTIONS:
        if name in ("model", "data"):
            kwargs[name] = _expand_from(name, raw.get(name), base_dir)
        else:
            kwargs[name] = section_from_dict(hints[name], raw.get(name), name)
    return RunConfig(**kwargs)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML), apply ``--set`` overrides and validate every section."""
    path = Path(path)
    raw = _read_yaml(path, "config")
    return config_from_dict(raw, overrides, base_dir=str(path.parent))


def resolve_model_config(cfg: RunConfig):
    """The model section as the model helper's validated ``ModelConfig``."""
    from miras_pretrain.model.config import ModelConfig

    if not cfg.model:
        raise ValueError("config section 'model' is empty: give a path such as configs/models/moneta_tiny.yaml")
    try:
        return ModelConfig.from_dict(dict(cfg.model))
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg if "model" in msg.lower() else f"model: {msg}") from None


def resolve_data_config(cfg: RunConfig):
    """The data section as the data helper's validated ``DataConfig``."""
    from miras_pretrain.data import DataConfig

    try:
        return DataConfig.from_dict(dict(cfg.data))
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg if "data" in msg.lower() else f"data: {msg}") from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (the file a resumed run and a reader can trust)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
