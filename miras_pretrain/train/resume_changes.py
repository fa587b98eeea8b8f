"""What changed between the config a checkpoint was written with and the resuming run's config.

A checkpoint's ``meta.json`` records the model config (``model``) and the whole run config
(``config``, which holds the optimizer and schedule keys under ``train``). On resume:

* a model field that changes what the network computes is an error unless the user opts in
  with ``--allow-model-change`` (the weights were trained for the old model: a different
  ``chunk_size``, ``eta_max`` or ``rope_theta`` silently changes every loss);
* the optimizer and schedule keys are taken from the new config (the schedule is rebuilt at the
  resumed step), and the trainer prints what changed.
"""

from __future__ import annotations

import re
from typing import Any, Optional

# model fields that do not change what a trained network computes: weight init (already
# done), recomputation in backward, and the choice among exact operator implementations
MODEL_FIELDS_FREE_ON_RESUME = ("init_std", "activation_checkpointing", "backend")
# train.* keys taken from the new config on resume (optimizer hyperparameters and the schedule)
OPTIM_KEYS = ("lr", "warmup_steps", "min_lr_ratio", "max_steps", "weight_decay", "betas", "eps")


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, old, new)]`` for every key whose value differs (a missing key reads as None)."""
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if _norm(old.get(k)) != _norm(new.get(k))]


def _norm(value: Any) -> Any:
    # JSON turns tuples into lists; the comparison must not see that as a change
    return list(value) if isinstance(value, tuple) else value


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``a.b: 1 -> 2, c.d: x -> y``"""
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


def model_changes(old_model: Optional[dict], new_model: dict) -> list[tuple[str, Any, Any]]:
    """The ``model.*`` fields that differ and matter for a trained network (empty when the
    checkpoint predates recording its model config)."""
    if not old_model:
        return []
    old = {k: v for k, v in old_model.items() if k not in MODEL_FIELDS_FREE_ON_RESUME}
    new = {k: v for k, v in new_model.items() if k not in MODEL_FIELDS_FREE_ON_RESUME}
    return _differences(_flatten(old, "model"), _flatten(new, "model"))


def optim_changes(old_config: Optional[dict], new_train: dict) -> list[tuple[str, Any, Any]]:
    """The ``train.*`` optimizer/schedule keys that differ from the checkpoint's run config."""
    old_train = (old_config or {}).get("train")
    if not old_train:
        return []
    pick = lambda t: {f"train.{k}": t.get(k) for k in OPTIM_KEYS}  # noqa: E731
    return _differences(pick(old_train), pick(new_train))


def refuse_model_changes(changes: list[tuple[str, Any, Any]], ckpt_dir: Any) -> None:
    """One-line ValueError listing the changed model fields and the opt-in flag."""
    raise ValueError(
        f"checkpoint {ckpt_dir} was trained with another model config ({format_changes(changes)}): "
        "resume with the checkpoint's model settings, start a new run, or pass --allow-model-change "
        "to load these weights into the changed model"
    )


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (?:torch\.Size\()?"
                            r"(\[[\d, ]*\])\)? from checkpoint, the shape in current model is "
                            r"(?:torch\.Size\()?(\[[\d, ]*\])")
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: \"([\w.]+)\"")


def shape_mismatch_message(err: BaseException, ckpt_dir: Any) -> Optional[str]:
    """A one-line message for a weight that does not fit the model (torch's ``load_state_dict``
    error, as DeepSpeed passes it on), naming the first such tensor; None for other errors."""
    text = str(err)
    m = _SIZE_MISMATCH.search(text)
    if m:
        what = f"tensor {m.group(1)} has shape {m.group(2)} in the checkpoint but {m.group(3)} in this model"
    else:
        k = _KEYS.search(text)
        if not k:
            return None
        where = "this model has no" if k.group(1) == "Unexpected" else "the checkpoint has no"
        what = f"{where} tensor {k.group(2)}"
    return (f"checkpoint {ckpt_dir} does not fit this model: {what}; resume with the checkpoint's model "
            "settings (model.* in its meta.json) or start a new run")
