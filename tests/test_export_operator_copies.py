"""The exported model runs the training operator's own rule modules, not a second copy.

The export writes ``miras_kernels.spec``, ``.rules`` and ``.chunk_step`` next to
``modeling_miras.py`` under ``miras_``-prefixed names; the copies must equal the sources apart
from their single-dot imports of each other, and the modeling file must import every copy itself
(transformers copies only a local modeling file's direct relative imports) and define none of the
rules. Loading, logits and generation of exports are checked in ``test_export_parity.py`` and
``test_export_fresh_process.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from miras_pretrain.export import export_hf
from miras_pretrain.export.hf import TEMPLATE_DIR
from miras_pretrain.export.operator_files import OPERATOR_MODULES, exported_source, operator_dir
from miras_pretrain.testing.tiny_models import tiny_config, tiny_tokenizer
from miras_pretrain.model import build_model

ROOT = Path(__file__).resolve().parents[1]
IMPORT_LINE = re.compile(r"^from \.(\w+) import .*$")


def _defined_names(source: str) -> set[str]:
    """Top-level functions, classes and assigned names of a module."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = tiny_config("moneta", "MA")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("exp") / "copies-moneta"
    export_hf(cfg, build_model(cfg).state_dict(), tok, out)
    return out


def test_operator_sources_are_the_package_folder():
    assert operator_dir().resolve() == (ROOT / "kernels").resolve()


@pytest.mark.parametrize("module", list(OPERATOR_MODULES))
def test_copies_equal_sources_apart_from_sibling_imports(module, export_dir):
    source = (ROOT / "kernels" / f"{module}.py").read_text(encoding="utf-8").splitlines()
    copy = (export_dir / f"{OPERATOR_MODULES[module]}.py").read_text(encoding="utf-8").splitlines()
    assert len(copy) == len(source)
    for src_line, copy_line in zip(source, copy):
        if src_line == copy_line:
            continue
        src_import, copy_import = IMPORT_LINE.match(src_line), IMPORT_LINE.match(copy_line)
        assert src_import and copy_import, (src_line, copy_line)
        assert OPERATOR_MODULES[src_import.group(1)] == copy_import.group(1)
        assert src_line.split(" import ", 1)[1] == copy_line.split(" import ", 1)[1]


def test_copies_import_only_each_other(export_dir):
    exported = set(OPERATOR_MODULES.values())
    for name in exported:
        tree = ast.parse((export_dir / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in exported, (name, node.module)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert all(m.split(".")[0] in ("torch", "math", "dataclasses", "typing", "__future__",
                                               "collections") for m in mods), (name, mods)


def test_modeling_file_imports_every_copy_and_defines_no_rule():
    from transformers.dynamic_module_utils import get_relative_imports

    modeling = TEMPLATE_DIR / "modeling_miras.py"
    assert set(get_relative_imports(modeling)) == {"configuration_miras", *OPERATOR_MODULES.values()}
    defined = _defined_names(modeling.read_text(encoding="utf-8"))
    for module in OPERATOR_MODULES:
        rules = _defined_names(exported_source(module)) - {"__all__"}
        assert not defined & rules, f"modeling_miras.py redefines {sorted(defined & rules)} of {module}.py"
    assert not defined & {"MemorySpec", "materialize", "output_grad", "grad_factors", "SMOOTH_ABS_EPS",
                          "MEMORY_LN_EPS", "_memory_chunk", "_grad_factors", "_output_grad"}


def test_export_refuses_an_operator_module_that_imports_an_uncopied_sibling(monkeypatch, tmp_path):
    from miras_pretrain.export import operator_files

    (tmp_path / "spec.py").write_text("from .inputs import State\n")
    monkeypatch.setattr(operator_files, "operator_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="does not copy"):
        operator_files.exported_source("spec")


@pytest.mark.parametrize("memory,retention,learner,channel", [
    ("linear", "lq", "gd", True), ("linear", "kl", "momentum", True), ("linear", "decay", "momentum", True),
    ("mlp", "kl", "momentum", False), ("mlp", "lq", "gd", False), ("mlp", "none", "gd", False),
])
def test_chunk_step_in_two_runs_equals_the_token_loop(memory, retention, learner, channel):
    """The step the exported cache runs: one chunk fed as two runs (the second starting mid-chunk
    at the chunk-start weights) equals the operator's definition, the token loop, in float64."""
    from miras_kernels import MirasSpec
    from miras_kernels.chunk_step import memory_chunk_step
    from miras_kernels.pytorch.recurrent import miras_memory_recurrent

    torch.manual_seed(0)
    B, T, H, D, cut = 2, 12, 2, 8, 5
    spec = MirasSpec(memory=memory, bias="l2", retention=retention, learner=learner, expansion=2)
    f64 = dict(dtype=torch.float64)
    q, k, v = (torch.nn.functional.normalize(torch.randn(B, T, H, D, **f64), dim=-1) for _ in range(3))
    alpha = None if retention == "none" else 0.8 + 0.2 * torch.rand(B, T, H, *([D] if channel else []), **f64)
    eta = 0.5 * torch.rand(B, T, H, **f64)
    mu = 0.5 * torch.rand(B, T, H, **f64) if learner == "momentum" else None
    X = {n: 0.3 * torch.randn(B, H, *s, **f64) for n, s in spec.weight_shapes(D, D).items()}
    S = {n: 0.1 * torch.randn_like(x) for n, x in X.items()} if mu is not None else {}
    init = {**X, **{"S_" + n: s for n, s in S.items()}}
    y_ref, final = miras_memory_recurrent(q, k, v, alpha, eta, spec=spec, chunk_size=T, mu=mu,
                                          initial_state=init, output_final_state=True)

    frozen = {n: spec.materialize(x) for n, x in X.items()}
    ys = []
    for run in (slice(0, cut), slice(cut, T)):
        head_major = lambda t: None if t is None else t[:, run].transpose(1, 2)  # noqa: E731
        y, X, S = memory_chunk_step(spec, *(head_major(t) for t in (q, k, v, alpha, eta, None, mu)), X, S, frozen)
        ys.append(y.transpose(1, 2))
    assert (torch.cat(ys, 1) - y_ref).abs().max().item() <= 1e-12
    for name, state in {**X, **{"S_" + n: s for n, s in S.items()}}.items():
        assert (state - final[name]).abs().max().item() <= 1e-12, name
