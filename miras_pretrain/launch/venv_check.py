"""Which torch build a virtualenv holds, read from its files (no interpreter started, no import).

``launch slurm --gpus-per-node N`` activates a venv in the job; a CPU build of torch there would
train on the CPU with gloo in fp32 on GPU nodes. :func:`torch_build` reads ``torch/version.py``
of the venv (a file of plain assignments that every torch wheel ships) so the refusal costs
milliseconds at submission.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TorchBuild:
    """``version`` is torch.__version__; ``cuda``/``hip`` are torch.version.cuda/hip (None: not
    that kind of build)."""

    version: str
    cuda: str | None
    hip: str | None

    @property
    def gpu(self) -> bool:
        """A build that can run on GPUs (CUDA or ROCm)."""
        return self.cuda is not None or self.hip is not None


def torch_build(venv: Path) -> TorchBuild | None:
    """The torch build installed in ``venv`` (a virtualenv directory); None when it has no torch."""
    candidates = sorted(Path(venv).glob("lib*/python3*/site-packages/torch/version.py"))
    if not candidates:
        return None
    values: dict[str, object] = {}
    for node in ast.parse(candidates[0].read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and value is not None:
            try:
                values[target.id] = ast.literal_eval(value)
            except ValueError:
                continue  # not a literal (none of the fields read here)
    return TorchBuild(version=str(values.get("__version__", "unknown")),
                      cuda=values.get("cuda") or None, hip=values.get("hip") or None)
