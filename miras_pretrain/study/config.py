"""The study file (``configs/studies/NAME.yaml``): schema, loading and the checks made before
anything runs.

A study is a list of runs (a model section and overrides each) trained from one base training
config on one data set with one token budget, repeated over seeds, then evaluated with one plan.
Every section is a dataclass built by the project's schema engine (:mod:`miras_pretrain.schema`),
so a bad key or value is the same one-line ``config key 'study.budget.tokens' ...`` error as in a
training config. The checks that need more than one field (budget against the batch, run names,
presets, files) run in :func:`load_study`, which also builds every run's training config with
the trainer's own loader, so a bad override fails here and not in the third run.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Optional

from miras_pretrain import config_yaml, schema

TASKS = ("lm", "mqar")
_NAME_RE_DOC = "letters, digits and . _ + - only"


def _f(default: Any, doc: str, **meta: Any) -> Any:
    """A field with its one-line doc and schema constraints (as miras_pretrain.train.config)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


def _check_name(key: str, value: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", value):
        raise schema.bad_value(key, value, "not a usable name", f"use {_NAME_RE_DOC} (it names directories)")


@dataclass
class Budget:
    """Training tokens per run; ``tokens / (global batch x seq_len)`` is every run's max_steps."""

    tokens: Optional[int] = _f(None, "training tokens per run (a multiple of the tokens per optimizer step)", gt=0,
                     fix="give a positive number of tokens, e.g. 2000000")

    def check(self, p: str) -> None:
        if self.tokens is None:
            raise schema.bad_value(f"{p}.tokens", schema.NO_VALUE, "missing", "give budget: {tokens: N}")


@dataclass
class CorpusSpec:
    """Task lm only: prepare the embedded stdlib corpus (as `miras-pretrain demo` does) under
    ``OUT/data/corpus`` and train every run on it instead of the base config's data streams."""

    max_mb: float = _f(4.0, "corpus size cap in MB (the Python stdlib sources, no download)", gt=0)
    vocab_size: int = _f(4096, "sentencepiece vocabulary; every run's model.vocab_size is set to it", ge=64)


@dataclass
class RecallEval:
    """MQAR accuracy of each trained model on a grid of sequence lengths x key-value pairs."""

    vocab_size: int = _f(64, "MQAR vocabulary (<= every model's vocab_size)", ge=8)
    lengths: list[int] = _f([64], "sequence lengths", ge=8, nonempty=True)
    pairs: list[int] = _f([8], "numbers of key-value pairs", ge=1, nonempty=True)
    samples: int = _f(256, "sequences per grid point", ge=1)
    seed: int = _f(0, "seed of the evaluation sequences", ge=0)


@dataclass
class NeedleEval:
    """S-NIAH accuracy (the `eval --synthetic` tasks) of each exported model; task lm only."""

    tasks: list[str] = _f(["niah_passkey"], "S-NIAH tasks (niah_passkey, niah_number, niah_word)", nonempty=True)
    lengths: list[int] = _f([256], "prompt lengths in tokens (>= 128)", ge=128, nonempty=True)
    samples: int = _f(10, "prompts per task and length", ge=1)

    def check(self, p: str) -> None:
        from miras_pretrain.evaluation.synthetic import NIAH_TASKS

        for i, t in enumerate(self.tasks):
            if t not in NIAH_TASKS:
                raise schema.bad_value(f"{p}.tasks[{i}]", t, "unknown S-NIAH task", f"choose from {', '.join(NIAH_TASKS)}")


@dataclass
class Evaluation:
    """What is measured after each run, besides the final validation loss (always)."""

    recall: Optional[RecallEval] = _f(None, "MQAR accuracy grid; null = off")
    needle: Optional[NeedleEval] = _f(None, "S-NIAH accuracy; null = off")


@dataclass
class RunSpec:
    """One model of the study: trained once per seed."""

    name: Optional[str] = _f(None, "run name (directory OUT/runs/<name>-s<seed>)", nonempty=True)
    model: Any = _f(None, "the training config's model section: a registered name or a mapping "
                          "({preset: moneta, size: tiny, ...})")
    set: dict = _f({}, "dotted overrides for this run only, over the study's set")

    def check(self, p: str) -> None:
        if self.name is None:
            raise schema.bad_value(f"{p}.name", schema.NO_VALUE, "missing", "give every run a name")
        _check_name(f"{p}.name", self.name)
        if self.model is None:
            raise schema.bad_value(f"{p}.model", schema.NO_VALUE, "missing",
                                   "give a model, e.g. {preset: moneta, size: tiny}")
        if not isinstance(self.model, (str, dict)):
            raise schema.bad_value(f"{p}.model", self.model, "expected a registered name or a mapping")


@dataclass
class QuickSpec:
    """The ``--quick`` variant: these fields replace the study's (runs: a subset of run names)."""

    budget: Optional[Budget] = _f(None, "budget of the quick variant")
    seeds: Optional[list[int]] = _f(None, "seeds of the quick variant", ge=0, nonempty=True)
    runs: Optional[list[str]] = _f(None, "names of the runs the quick variant keeps", nonempty=True)
    evaluation: Optional[Evaluation] = _f(None, "evaluation of the quick variant")
    set: Optional[dict] = _f(None, "overrides of the quick variant, over the study's set")
    corpus: Optional[CorpusSpec] = _f(None, "corpus of the quick variant (task lm)")
    mqar_data: Optional[dict] = _f(None, "MQAR data of the quick variant (task mqar)")


@dataclass
class StudyConfig:
    """A whole study file."""

    name: Optional[str] = _f(None, "study name (default output directory runs/studies/<name>)", nonempty=True)
    description: str = _f("", "one line saying what the study compares")
    base: Optional[str] = _f(None, "training config every run starts from: a shipped config name (configs/) or a path",
                   nonempty=True)
    task: Literal["lm", "mqar"] = _f("lm", "lm: language modelling on the base config's data (or corpus:); "
                                           "mqar: synthetic recall data prepared by the study")
    corpus: Optional[CorpusSpec] = _f(None, "task lm: prepare the embedded corpus instead of the base "
                                            "config's data; null = the base config's data")
    mqar_data: Optional[dict] = _f(None, "task mqar: keyword arguments of the MQAR data preparation "
                                         "(miras_pretrain.data.embedded.prepare_assoc_recall)")
    budget: Optional[Budget] = _f(None, "training tokens per run")
    set: dict = _f({}, "dotted overrides for every run (as train --set KEY=VALUE)")
    seeds: list[int] = _f([0], "seeds; each run is trained once per seed (run.seed)", ge=0, nonempty=True)
    evaluation: Evaluation = field(default_factory=Evaluation, metadata={"doc": "evaluation plan"})
    runs: list[RunSpec] = _f([], "the runs", nonempty=True)
    quick: Optional[QuickSpec] = _f(None, "the --quick variant")
    # where the study file is (relative paths in it are resolved against it)
    path: str = field(default="", metadata={"doc": "study file path (set by load_study)"})

    def check(self, p: str) -> None:
        for key in ("name", "base", "budget"):
            if getattr(self, key) is None:
                raise schema.bad_value(f"{p}.{key}", schema.NO_VALUE, "missing", f"give {key}:")
        _check_name(f"{p}.name", self.name)
        if not self.runs:
            raise schema.bad_value(f"{p}.runs", schema.NO_VALUE, "missing", "list at least one run")
        seen: set[str] = set()
        for i, run in enumerate(self.runs):
            if run.name in seen:
                raise schema.bad_value(f"{p}.runs[{i}].name", run.name, "duplicate run name",
                                       "give every run its own name")
            seen.add(run.name)
        if len(set(self.seeds)) != len(self.seeds):
            raise schema.bad_value(f"{p}.seeds", self.seeds, "duplicate seed", "list each seed once")
        if self.task == "mqar" and self.mqar_data is None:
            raise schema.bad_value(f"{p}.mqar_data", schema.NO_VALUE, "missing for task mqar",
                                   "give mqar_data: {vocab_size: 64, seq_len: 64, num_pairs: 8, ...}")
        if self.task != "mqar" and self.mqar_data is not None:
            raise schema.bad_value(f"{p}.mqar_data", self.mqar_data, "only for task mqar", "remove it or set task: mqar")
        if self.task != "lm" and self.corpus is not None:
            raise schema.bad_value(f"{p}.corpus", schema.NO_VALUE, "only for task lm", "remove it")
        if self.task != "lm" and self.evaluation.needle is not None:
            raise schema.bad_value(f"{p}.evaluation.needle", schema.NO_VALUE,
                                   "S-NIAH needs a text tokenizer (task lm)", "remove it")
        if self.mqar_data is not None:
            check_mqar_kwargs(self.mqar_data, f"{p}.mqar_data")
        if self.quick is not None and self.quick.corpus is not None and self.task != "lm":
            raise schema.bad_value(f"{p}.quick.corpus", schema.NO_VALUE, "only for task lm", "remove it")
        if self.quick is not None and self.quick.mqar_data is not None:
            if self.task != "mqar":
                raise schema.bad_value(f"{p}.quick.mqar_data", schema.NO_VALUE, "only for task mqar", "remove it")
            check_mqar_kwargs(self.quick.mqar_data, f"{p}.quick.mqar_data")
        if self.quick is not None and self.quick.runs is not None:
            for i, name in enumerate(self.quick.runs):
                if name not in seen:
                    guess = schema.closest(name, seen)
                    hint = f"did you mean '{guess}'? " if guess else ""
                    raise schema.bad_value(f"{p}.quick.runs[{i}]", name, "not a run of this study",
                                           f"{hint}(runs: {', '.join(r.name for r in self.runs)})")

    def run_names(self) -> list[str]:
        return [r.name for r in self.runs]


# ------------------------------------------------------------------------------------------
# MQAR data preparation: its keyword arguments are the schema of mqar_data
# ------------------------------------------------------------------------------------------


def mqar_prepare_function():
    """The MQAR data preparation function (``fn(out_dir, **mqar_data) -> PreparedData``)."""
    from miras_pretrain.data.embedded import prepare_assoc_recall

    return prepare_assoc_recall


def mqar_parameters() -> dict[str, inspect.Parameter]:
    """The keyword parameters ``mqar_data`` may set (not the output directory or ``overwrite``)."""
    sig = inspect.signature(mqar_prepare_function())
    return {n: p for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY and n != "overwrite"}


def check_mqar_kwargs(data: dict, prefix: str) -> None:
    """Unknown keys and non-integer values of ``mqar_data`` are one-line errors."""
    params = mqar_parameters()
    for key, value in data.items():
        if key not in params:
            raise schema.unknown_key(prefix, key, list(params))
        default = params[key].default
        if isinstance(default, int) and not isinstance(default, bool):
            schema._convert(f"{prefix}.{key}", value, int)  # noqa: SLF001 -- the engine's one converter
    for key in ("vocab_size", "seq_len"):
        if key not in data:
            raise schema.bad_value(f"{prefix}.{key}", schema.NO_VALUE, "missing",
                                   f"give {key} (the models' vocabulary and the training sequence length)")


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------


def shipped_studies_dir() -> Path:
    """``configs/studies/`` of the checkout or the installed package."""
    return Path(str(files("miras_pretrain.configs") / "studies"))


def find_study_file(ref: str | Path) -> Path:
    """A study file path, or the name of a shipped study (``paper_lm_tiny``)."""
    p = Path(ref)
    if p.is_file():
        return p
    for cand in (shipped_studies_dir() / f"{ref}.yaml", shipped_studies_dir() / str(ref)):
        if cand.is_file():
            return cand
    shipped = sorted(q.stem for q in shipped_studies_dir().glob("*.yaml"))
    raise FileNotFoundError(f"--config {ref}: study file not found (shipped studies: {', '.join(shipped)})")


def resolve_base(ref: str, study_path: Path) -> Path:
    """The base training config: a path (relative to the CWD or the study file), else a shipped
    config name (``demo_moneta_tiny.yaml`` in configs/)."""
    p = config_yaml.resolve_path(ref, study_path.parent)
    if p.is_file():
        return p
    shipped = Path(str(files("miras_pretrain.configs") / ref))
    if shipped.is_file():
        return shipped
    names = sorted(q.name for q in Path(str(files("miras_pretrain.configs"))).glob("*.yaml"))
    raise FileNotFoundError(f"study key 'base' = {ref!r}: training config not found (as a path, or shipped: "
                            f"{', '.join(names)})")


def apply_quick(study: StudyConfig) -> StudyConfig:
    """The ``--quick`` variant: the quick section's fields replace the study's."""
    if study.quick is None:
        raise ValueError(f"study {study.name} has no quick: section, so --quick has nothing to run; add one "
                         f"(budget, seeds, runs, evaluation)")
    q = study.quick
    changes: dict[str, Any] = {"quick": None, "name": study.name}
    if q.budget is not None:
        changes["budget"] = q.budget
    if q.seeds is not None:
        changes["seeds"] = list(q.seeds)
    if q.runs is not None:
        changes["runs"] = [r for r in study.runs if r.name in q.runs]
    if q.evaluation is not None:
        changes["evaluation"] = q.evaluation
    if q.set is not None:
        changes["set"] = {**study.set, **q.set}
    if q.corpus is not None:
        changes["corpus"] = q.corpus
    if q.mqar_data is not None:
        changes["mqar_data"] = q.mqar_data
    return dataclasses.replace(study, **changes)


def load_study(ref: str | Path, *, quick: bool = False) -> StudyConfig:
    """Read and validate a study file (a path or a shipped study's name); ``quick`` applies its
    quick section. Cross-checks with the base config and the budget: :func:`plan.plan_study`."""
    path = find_study_file(ref)
    raw = config_yaml.read_mapping(path, "study")
    raw.pop("path", None)
    try:
        study = schema.build(StudyConfig, raw, "study")
    except schema.ConfigError as err:
        raise schema.ConfigError(f"{path}: {err}") from None
    study.path = str(path)
    return apply_quick(study) if quick else study


def tokens_per_step_text(seqs: int, seq_len: int) -> str:
    return f"{seqs} sequences x {seq_len} tokens = {seqs * seq_len:,}"


def budget_steps(tokens: int, seqs: int, seq_len: int, where: str) -> int:
    """``tokens / (seqs x seq_len)``; a one-line error with the two nearest budgets when it does not divide."""
    per = seqs * seq_len
    if tokens % per:
        lo = (tokens // per) * per
        hint = f"use e.g. {lo} or {lo + per}" if lo else f"use e.g. {per}"
        raise schema.ConfigError(
            f"config key 'study.budget.tokens' = {tokens} is not valid: not a multiple of the tokens per optimizer "
            f"step of {where} ({tokens_per_step_text(seqs, seq_len)}); {hint}")
    return tokens // per


