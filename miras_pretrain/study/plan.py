"""Study -> one training config per (run x seed), validated by the trainer's own loader.

Each planned run gets ``OUT/configs/<run>-s<seed>.yaml`` (the fully resolved training config:
model fields expanded, paths absolute, ``train.max_steps`` from the budget,
``train.global_batch_size`` fixed so the batch -- and so the budget -- is the same on any process
count) and the run directory ``OUT/runs/<run>-s<seed>``. Everything here is checked before
anything runs: a bad override, preset, budget or missing data file is one line.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from miras_pretrain import config_yaml, schema
from miras_pretrain.study.config import StudyConfig, budget_steps, resolve_base


@dataclass
class PlannedRun:
    """One training run of the study."""

    run: str  # the study's run name
    seed: int
    out_dir: Path  # OUT/runs/<id>
    config_path: Path  # OUT/configs/<id>.yaml
    config: dict  # the resolved training config written there
    max_steps: int
    tokens_per_step: int
    seq_len: int
    parameters: int
    state: dict  # state size per layer (see state_size)

    @property
    def id(self) -> str:
        return f"{self.run}-s{self.seed}"

    @property
    def result_path(self) -> Path:
        """Written after the run's evaluation: its presence means the run is finished."""
        return self.out_dir / "study_result.json"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "train.log"

    def to_json(self) -> dict:
        return {"id": self.id, "run": self.run, "seed": self.seed, "out_dir": str(self.out_dir),
                "config": str(self.config_path), "max_steps": self.max_steps,
                "tokens_per_step": self.tokens_per_step, "seq_len": self.seq_len,
                "parameters": self.parameters, "state": self.state}


@dataclass
class StudyPlan:
    """Every planned run, plus what the study prepares before them."""

    study: StudyConfig
    out: Path
    runs: list[PlannedRun] = field(default_factory=list)
    # (kind, directory, keyword arguments) of the data the study prepares, or None
    data: Optional[tuple[str, Path, dict]] = None

    @property
    def plan_path(self) -> Path:
        return self.out / "plan.json"

    def write(self) -> None:
        """``OUT/configs/*.yaml`` and ``OUT/plan.json`` (the SLURM array reads the configs in this order)."""
        (self.out / "configs").mkdir(parents=True, exist_ok=True)
        for r in self.runs:
            text = yaml.safe_dump(r.config, sort_keys=False)
            if not r.config_path.is_file() or r.config_path.read_text() != text:
                r.config_path.write_text(text)
        doc = {"study": self.study.name, "study_file": self.study.path, "task": self.study.task,
               "budget_tokens": self.study.budget.tokens, "seeds": list(self.study.seeds),
               "runs": [r.to_json() for r in self.runs]}
        self.plan_path.write_text(json.dumps(doc, indent=1))


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def set_dotted(tree: dict, key: str, value: Any, where: str) -> None:
    """``tree[a][b] = value`` for ``key = "a.b"`` (a ``model: name`` becomes ``{from: name}`` so its
    fields can be overridden, as ``train --set`` does); ``where`` names the override in errors."""
    from miras_pretrain.train.config import SECTIONS

    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        guess = schema.closest(parts[0], SECTIONS)
        hint = f"did you mean '{guess}.{'.'.join(parts[1:])}'? " if guess and len(parts) > 1 else ""
        raise schema.bad_value(f"{where}.{key}", schema.NO_VALUE, "not a training config key",
                               f"{hint}write section.key with section one of {', '.join(SECTIONS)}")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif isinstance(nxt, str):
            nxt = node[part] = {"from": nxt}
        if not isinstance(nxt, dict):
            raise schema.bad_value(f"{where}.{key}", value, f"'{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def state_size(model_cfg) -> dict:
    """What a model must keep per sequence to continue it, per layer (fp32 bytes): the Miras
    memory's weights (fixed, whatever the context; twice with momentum) or attention's key and
    value cache (per token). ``bytes_fixed`` and ``bytes_per_token`` are averaged over layers."""
    kinds = model_cfg.layer_kinds()
    spec, h, dh = model_cfg.spec, model_cfg.n_heads, model_cfg.head_dim
    fixed = per_token = 0.0
    for kind in kinds:
        if kind == "miras":
            entries = sum(r * c for r, c in spec.weight_shapes(dh, dh).values())
            fixed += 4.0 * h * entries * (2 if spec.learner == "momentum" else 1)
        elif kind == "sliding_attention":
            fixed += 4.0 * 2 * model_cfg.d_model * model_cfg.window  # a full window of keys and values
        else:
            per_token += 4.0 * 2 * model_cfg.d_model
    n = len(kinds)
    return {"bytes_fixed": fixed / n, "bytes_per_token": per_token / n}


def _absolute_streams(data: dict, base_dir: Path) -> dict:
    """Local stream and tokenizer paths made absolute (the generated config lives elsewhere)."""
    data = dict(data)
    streams = []
    for s in data.get("streams") or []:
        path = s.get("path") if isinstance(s, dict) else s
        if isinstance(path, str) and "://" not in path:
            p = config_yaml.resolve_path(path, base_dir)
            path = str(p.resolve()) if p.exists() else path
        streams.append({**s, "path": path} if isinstance(s, dict) else path)
    if streams:
        data["streams"] = streams
    tok = data.get("tokenizer")
    if isinstance(tok, str):
        p = config_yaml.resolve_path(tok, base_dir)
        data["tokenizer"] = str(p.resolve()) if p.exists() else tok
    return data


def _check_base_data(data: dict, base: Path) -> None:
    """Task lm on the base config's data: every local stream must be prepared (manifest.json)."""
    streams = data.get("streams") or []
    if not streams:
        raise schema.ConfigError(f"study key 'base' = {str(base)!r}: its data section has no streams; prepare "
                                 "data (miras-pretrain data prepare) and name it there, or add corpus: to the study")
    for i, s in enumerate(streams):
        path = s.get("path") if isinstance(s, dict) else s
        if isinstance(path, str) and "://" not in path and not (Path(path) / "manifest.json").is_file():
            raise FileNotFoundError(
                f"data.streams[{i}] {path} of the base config {base}: not a prepared dataset (no manifest.json); "
                "prepare it (miras-pretrain data prepare, or miras-pretrain demo for the demo corpus) or add "
                "corpus: {max_mb: 4} to the study to prepare the embedded corpus")
    tok = data.get("tokenizer")
    if isinstance(tok, str) and not Path(tok).is_file():
        raise FileNotFoundError(f"data.tokenizer {tok} of the base config {base}: not found")


def _data_section(study: StudyConfig, base_data: dict, base: Path, out: Path) -> tuple[dict, Optional[tuple], Optional[int]]:
    """(data section of every run, data the study prepares, vocabulary every model must use)."""
    if study.task == "mqar":
        kw = dict(study.mqar_data)
        root = out / "data" / "mqar"
        data = {"streams": [str(root.resolve())], "layout": "packed", "seq_len": int(kw["seq_len"]),
                "num_workers": base_data.get("num_workers", 0), "tokenizer": None}
        return data, ("mqar", root, kw), int(kw["vocab_size"])
    if study.corpus is not None:
        root = out / "data" / "corpus"
        data = {**{k: v for k, v in base_data.items() if k not in ("streams", "tokenizer")},
                "streams": [str((root / "data").resolve())], "tokenizer": str((root / "tokenizer.model").resolve())}
        data.setdefault("layout", "packed")
        kw = {"vocab_size": study.corpus.vocab_size, "max_bytes": int(study.corpus.max_mb * 1e6),
              "seq_len": int(data.get("seq_len", 512)), "layout": data["layout"]}
        return data, ("corpus", root, kw), study.corpus.vocab_size
    _check_base_data(base_data, base)
    return base_data, None, None


# ------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------


def plan_study(study: StudyConfig, out: str | Path) -> StudyPlan:
    """Every (run x seed) as a validated training config; raises one-line errors."""
    from miras_pretrain.model import count_parameters
    from miras_pretrain.train.config import config_from_dict, resolve_data_config, resolve_model_config

    out = Path(out).resolve()
    check_recall_available(study)
    base = resolve_base(study.base, Path(study.path or "."))
    base_raw = config_yaml.read_mapping(base, "base config")
    # the base's own paths and model section, resolved against its directory
    base_cfg = config_from_dict(base_raw, base_dir=str(base.parent))
    base_data = _absolute_streams(base_cfg.data, base.parent)
    data, prepared, vocab = _data_section(study, base_data, base, out)
    plan = StudyPlan(study=study, out=out, data=prepared)
    for spec in study.runs:
        for seed in study.seeds:
            where = f"run '{spec.name}'"
            raw = copy.deepcopy(base_raw)
            raw["model"] = copy.deepcopy(spec.model)
            if vocab is not None:
                if isinstance(raw["model"], str):
                    raw["model"] = {"from": raw["model"]}
                given = raw["model"].get("vocab_size")
                if given is not None and given != vocab:
                    raise schema.bad_value(f"study.runs.{spec.name}.model.vocab_size", given,
                                           f"the study's data has vocabulary {vocab}", "remove it or make it equal")
                raw["model"]["vocab_size"] = vocab
            raw["data"] = copy.deepcopy(data)
            for key, value in study.set.items():
                set_dotted(raw, key, value, "study.set")
            for key, value in spec.set.items():
                set_dotted(raw, key, value, f"study.runs.{spec.name}.set")
            rid = f"{spec.name}-s{seed}"
            run_dir = out / "runs" / rid
            set_dotted(raw, "run.seed", seed, "study")
            set_dotted(raw, "run.name", f"{study.name}.{rid}", "study")
            set_dotted(raw, "run.out_dir", str(run_dir), "study")
            # the console is a log file: plain lines, not a progress bar
            set_dotted(raw, "log.progress_bar", False, "study")
            try:
                cfg = config_from_dict(raw, base_dir=str(base.parent))
                mcfg = resolve_model_config(cfg)
                dcfg = resolve_data_config(cfg)
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"{where}: {err}") from None
            seqs = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.train.grad_accum_steps
            steps = budget_steps(study.budget.tokens, seqs, dcfg.seq_len, where)
            set_dotted(raw, "train.max_steps", steps, "study")
            # fixed in sequences, so a SLURM job with more processes trains the same batch
            set_dotted(raw, "train.global_batch_size", seqs, "study")
            cfg = config_from_dict(raw, base_dir=str(base.parent))
            resolved = cfg.to_dict()
            _check_eval_fits(study, mcfg, where)
            plan.runs.append(PlannedRun(
                run=spec.name, seed=seed, out_dir=run_dir, config_path=out / "configs" / f"{rid}.yaml",
                config=resolved, max_steps=steps, tokens_per_step=seqs * dcfg.seq_len, seq_len=dcfg.seq_len,
                parameters=count_parameters(mcfg), state=state_size(mcfg)))
    return plan


def check_recall_available(study: StudyConfig) -> None:
    """evaluation.recall needs ``miras_pretrain.evaluation.recall.recall_accuracy``: say so now,
    not after the first run has trained."""
    if study.evaluation.recall is None:
        return
    import importlib

    try:
        fn = getattr(importlib.import_module("miras_pretrain.evaluation.recall"), "recall_accuracy", None)
    except ImportError:
        fn = None
    if fn is None:
        raise schema.ConfigError("config key 'study.evaluation.recall' is not valid: this installation has no "
                                 "miras_pretrain.evaluation.recall.recall_accuracy; update miras-pretrain or remove "
                                 "evaluation.recall")


def _check_eval_fits(study: StudyConfig, mcfg, where: str) -> None:
    """The evaluation plan must fit every model (recall vocabulary, sequence room for the pairs)."""
    rec = study.evaluation.recall
    if rec is None:
        return
    if rec.vocab_size > mcfg.vocab_size:
        raise schema.bad_value("study.evaluation.recall.vocab_size", rec.vocab_size,
                               f"larger than the vocabulary {mcfg.vocab_size} of {where}", "lower it")
    from miras_pretrain.data.embedded import check_assoc_recall_shape

    for n in rec.lengths:
        for k in rec.pairs:
            try:
                check_assoc_recall_shape(seq_len=n, vocab_size=rec.vocab_size, num_pairs=k)
            except ValueError as err:
                raise schema.bad_value("study.evaluation.recall", schema.NO_VALUE, f"grid point length {n} x {k} "
                                       f"pairs: {err}", "change lengths, pairs or vocab_size") from None
