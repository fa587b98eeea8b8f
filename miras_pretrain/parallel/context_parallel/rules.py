"""The rules a context-parallel (CP) run must satisfy: the one validator of them.

The runtime (batch slicing, the schemes) and the training config check the same rules here. They
differ only in how an error names what to change -- the runtime names the model's fields
(``ModelConfig.window=20``), the config check the YAML keys (``config key 'model.window' = 20``)
-- which :class:`FieldNames` carries. Every error is one line that names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMES = ("auto", "state_passing", "all_gather")


@dataclass(frozen=True)
class FieldNames:
    """How errors name each quantity. ``config_keys=True`` shows ``config key 'k' = v``
    (the training config), else ``k=v`` (Python arguments and ``ModelConfig`` fields)."""

    seq_len: str = "sequence length"
    cp_size: str = "context_parallel_size"
    scheme: str = "context_parallel scheme"
    chunk_size: str = "chunk_size"
    activation_checkpointing: str = "ModelConfig.activation_checkpointing"
    conv_size: str = "ModelConfig.conv_size"
    window: str = "ModelConfig.window"
    config_keys: bool = False

    def show(self, field: str, value: Any) -> str:
        """``field`` (an attribute name of this class) with ``value``, in this naming style."""
        name = getattr(self, field)
        return f"config key '{name}' = {value}" if self.config_keys else f"{name}={value!r}"


RUNTIME_NAMES = FieldNames()


def check_lengths(seq_len: int, cp_size: int, chunk_size: int | None, names: FieldNames = RUNTIME_NAMES) -> None:
    """T must split into ``cp_size`` equal slices, each whole chunks when ``chunk_size`` is given:
    the memory's chunk grid restarts at every document start, so only then does CP use the
    CP = 1 grid. Context parallelism never pads."""
    if chunk_size is not None and seq_len % (cp_size * chunk_size):
        step = cp_size * chunk_size
        raise ValueError(
            f"{names.show('seq_len', seq_len)} is not a multiple of {names.cp_size} x {names.chunk_size} = "
            f"{cp_size} x {chunk_size} = {step}: use a multiple of {step} (a CP rank's slice, {seq_len} / {cp_size} "
            f"tokens, is not a multiple of the model's chunk_size={chunk_size}, so CP={cp_size} and CP=1 would use "
            "different chunk grids; context parallelism does not pad)"
        )
    if seq_len % cp_size:
        raise ValueError(
            f"{names.show('seq_len', seq_len)} is not divisible by {names.cp_size}={cp_size}: use a sequence length "
            f"that is a multiple of {cp_size} (context parallelism does not pad)"
        )


def check_scheme(scheme: str, names: FieldNames = RUNTIME_NAMES) -> None:
    """``scheme`` must be one of :data:`SCHEMES`."""
    if scheme not in SCHEMES:
        raise ValueError(f"{names.show('scheme', scheme)} is not valid: choose one of {', '.join(SCHEMES)}")


def resolve_scheme(scheme: str, spec: Any, names: FieldNames = RUNTIME_NAMES) -> str:
    """The exact scheme a Miras layer with memory ``spec`` runs: ``auto`` is all-gather for
    affine memories (``spec.is_affine``) and state passing for the rest; ``all_gather`` on a
    non-affine memory is an error (its update is not a linear map of the incoming state)."""
    check_scheme(scheme, names)
    if scheme == "auto":
        return "all_gather" if spec.is_affine else "state_passing"
    if scheme == "all_gather" and not spec.is_affine:
        raise ValueError(
            f"{names.show('scheme', repr(scheme) if names.config_keys else scheme)} needs an affine memory (linear "
            f"memory, dot/l2 bias, none/decay retention) but the model's memory is "
            f"{spec.memory}/{spec.bias}/{spec.retention}: use 'auto' or 'state_passing'"
        )
    return scheme


def validate_cp_model(cfg: Any, seq_len: int, cp_size: int, *, scheme: str = "auto",
                      names: FieldNames = RUNTIME_NAMES) -> None:
    """Check a ``ModelConfig`` against a CP layout of ``cp_size`` ranks and sequences of
    ``seq_len`` tokens: the scheme fits the memory (also at CP = 1, so a config does not break
    when the CP size grows), slices are whole chunks, no activation checkpointing (the recomputed
    forward would exchange states again), and the conv / sliding-window halos fit in one slice.
    One ``ValueError`` per problem, naming the field with ``names``."""
    if "M" in cfg.layer_pattern:
        resolve_scheme(scheme, cfg.spec, names)
    else:
        check_scheme(scheme, names)
    if cp_size == 1:
        return
    check_lengths(seq_len, cp_size, cfg.chunk_size, names)
    local = seq_len // cp_size
    if cfg.activation_checkpointing:
        raise ValueError(
            f"{names.show('activation_checkpointing', True)} is not supported with {names.cp_size} > 1 "
            "(the recomputed forward would exchange states again): set it to false"
        )
    if cfg.conv_size - 1 > local:
        raise ValueError(
            f"{names.show('conv_size', cfg.conv_size)}: the conv halo needs conv_size - 1 <= {local} tokens per CP "
            "rank: use a longer sequence, a smaller CP size or a smaller conv"
        )
    if "A" in cfg.layer_pattern and cfg.window - 1 > local:
        raise ValueError(
            f"{names.show('window', cfg.window)}: a sliding-window layer under CP needs window - 1 <= {local} "
            "(the tokens per CP rank): use a longer sequence, a smaller CP size or a smaller window"
        )
