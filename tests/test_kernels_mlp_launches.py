"""Launch structure of the MLP-memory Triton kernels (issue 18): the chunk loop runs inside the
driver kernels (``kernels/miras_mlp/chunk_drivers.py``), so one layer's forward + backward is a
fixed, small number of launches whatever the sequence length; the drivers are generated from the
phase lists (and must stay in step with them); the layer reads no device memory on the host.

Launches are counted by wrapping the Triton interpreter's launch entry
(``tools/bench_kernels_mlp.count_layer_launches``): ``dry`` mode records (kernel, programs) and
skips the kernel bodies on ``meta`` tensors, so the full 340M shapes cost nothing; a real
interpreter run at tiny shapes must record the same launches as the dry run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from miras_kernels.miras_mlp import chunk_miras_mlp
from miras_kernels.spec import MirasSpec
from miras_pretrain.testing.devices import on_gpu

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("moneta", "yaad", "memora", "titans")
# issue 18's target: at most this many Triton launches per layer forward + backward
MAX_LAUNCHES = 40


def _tool():
    spec = importlib.util.spec_from_file_location("bench_kernels_mlp", ROOT / "tools" / "bench_kernels_mlp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


interpreter_only = pytest.mark.skipif(on_gpu(), reason="counts launches through the Triton interpreter (CPU)")


@interpreter_only
@pytest.mark.parametrize("preset", PRESETS)
def test_launches_per_layer_are_few_and_independent_of_T(preset):
    """B 4, H 16, d 64 / 128, chunk 64: the same launches at T 4096 and 16384, at most 40, each
    over N * H programs; the driver that runs is the one of the preset's path."""
    tool = _tool()
    for D in (64, 128):
        recs = {T: tool.count_layer_launches(preset, 4, 16, D, T, 64) for T in (4096, 16384)}
        assert recs[4096] == recs[16384], (preset, D)
        assert 0 < len(recs[4096]) <= MAX_LAUNCHES
        assert all(n == 4 * 16 for _, n in recs[4096])
    names = [k for k, _ in recs[4096]]
    path = {"moneta": "_lq", "memora": "_kl", "yaad": "", "titans": ""}[preset]
    assert names == [f"mlp_fwd{path}_driver", f"mlp_bwd{path}_driver"], names


@interpreter_only
def test_dry_count_equals_a_real_run():
    """The dry count (meta tensors, bodies skipped) records exactly the launches of a real
    interpreter run of the same layer, dense and varlen (documents of unequal chunk counts)."""
    tool = _tool()
    for kw in ({"B": 2, "T": 40}, {"B": 1, "T": 40, "cu_seqlens": [0, 7, 7, 40]}):
        B, T = kw["B"], kw["T"]
        cu = kw.get("cu_seqlens")
        dry = tool.count_layer_launches("titans", B, 2, 16, T, 16, expansion=2, dry=True, cu_seqlens=cu)
        real = tool.count_layer_launches("titans", B, 2, 16, T, 16, expansion=2, dry=False, cu_seqlens=cu)
        assert dry == real and len(real) == 2, (dry, real)
        n_seq = B if cu is None else len(cu) - 1
        assert all(n == n_seq * 2 for _, n in real)


def test_drivers_are_generated_from_the_phase_lists():
    """chunk_drivers.py is what driver_gen renders from the current phase lists, and every driver
    calls its path's phases in the order the per-phase host loop launches them."""
    from miras_kernels.miras_mlp import driver_gen
    from miras_kernels.miras_mlp.chunk_drivers import DRIVER_PHASES
    from miras_kernels.miras_mlp.chunk_kernels import BWD_KERNELS, FWD_KERNELS
    from miras_kernels.miras_mlp.chunk_kl_kernels import kl_phases
    from miras_kernels.miras_mlp.chunk_lq_kernels import BWD_LQ_KERNELS, FWD_LQ_KERNELS

    assert driver_gen.TARGET.read_text() == driver_gen.render(), "rerun python -m miras_kernels.miras_mlp.driver_gen"
    want = {"mlp_fwd_driver": FWD_KERNELS, "mlp_bwd_driver": BWD_KERNELS, "mlp_fwd_lq_driver": FWD_LQ_KERNELS,
            "mlp_bwd_lq_driver": BWD_LQ_KERNELS, "mlp_fwd_kl_driver": kl_phases(False, False),
            "mlp_bwd_kl_driver": kl_phases(True, False), "mlp_bwd_kl_mom_driver": kl_phases(True, True)}
    assert set(DRIVER_PHASES) == set(want)
    src = driver_gen.TARGET.read_text()
    for dname, phases in want.items():
        assert DRIVER_PHASES[dname][1] == tuple(n for n, _ in phases)
        body = src.split(f"def {dname}(")[1].split("\n@triton.jit")[0]
        called = [line.strip()[2:] for line in body.splitlines() if line.strip().startswith("# mlp_")]
        assert called == [n for n, _ in phases], dname
        # a barrier after every phase: the phases hand data through global scratch
        assert body.count("tl.debug_barrier()") == len(phases)
    r = subprocess.run([sys.executable, "-m", "miras_kernels.miras_mlp.driver_gen", "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def _layer_inputs(spec, B, T, H, D, e):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = {"q": F.normalize(r(B, T, H, D), dim=-1), "k": F.normalize(r(B, T, H, D), dim=-1), "v": r(B, T, H, D),
         "alpha": torch.sigmoid(r(B, T, H) + 3), "eta": torch.sigmoid(r(B, T, H)) * 0.3,
         "delta": F.softplus(r(B, T, H)) + 0.5, "mu": torch.sigmoid(r(B, T, H) + 1)}
    st = {"W1": r(H, D, D * e) / (D * e) ** 0.5, "W2": r(H, D * e, D) / D ** 0.5}
    if spec.retention == "kl":
        st = {n: w.abs() + 0.1 for n, w in st.items()}
    if spec.learner == "momentum":
        st.update({"S_W1": r(H, D, D * e) * 0.01, "S_W2": r(H, D * e, D) * 0.01})
    for t in list(x.values()) + list(st.values()):
        t.requires_grad_(True)
    return x, st


@interpreter_only
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["titans", "moneta", "memora"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_mlp_kernel_layer_has_no_host_sync(preset, varlen):
    """chunk_miras_mlp forward + backward (the lq, kl and momentum paths; yaad's affine path is in
    tests/test_no_host_sync.py through the model layer), dense and packed with a VarlenMeta built
    on the host: no host read of device memory (the detector of tests/test_no_host_sync.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_no_host_sync import NoHostSync

    from miras_kernels import VarlenMeta

    spec = MirasSpec.preset(preset, expansion=2)
    B, T = (1, 40) if varlen else (2, 24)
    x, st = _layer_inputs(spec, B, T, 2, 16, 2)
    cu = VarlenMeta.from_host([0, 9, 9, 40]) if varlen else None
    with NoHostSync() as mode:
        y, fin = chunk_miras_mlp(x["q"], x["k"], x["v"], x["alpha"] if spec.needs_alpha else None, x["eta"],
                                 spec=spec, chunk_size=16, delta=x["delta"] if spec.needs_delta else None,
                                 mu=x["mu"] if spec.needs_mu else None, initial_state=st, output_final_state=True,
                                 cu_seqlens=cu)
        loss = y.square().sum() + sum(w.square().sum() for w in fin.values())
        leaves = [t for t in list(x.values()) + list(st.values()) if t.requires_grad]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert not mode.violations, "\n".join(sorted(set(mode.violations)))
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_aot_compile_shipped_drivers(tmp_path):
    """Every driver a GPU launch runs (configs.MLP_DRIVER_SHIPPED, on its arch; currently Yaad's,
    Titans' and Memora's forward and backward at d 64, e 4, C 64 on sm_90) compiles without a GPU,
    specialised as a launch is, with ZERO spills and shared memory within the card's limit (under
    the installed Triton; the 3.7.1 run is in docs/kernels_mlp.md, "AOT compile"). About 6-10 minutes
    on an idle 2-core machine."""
    import json
    import os

    from miras_kernels.configs import MLP_DRIVER_SHIPPED

    archs = sorted({key[0] for key in MLP_DRIVER_SHIPPED})
    assert archs, "no driver shipped: the GPU would run the per-phase path everywhere"
    code = (
        "import json,sys; sys.path.insert(0, %r)\n"
        "from miras_kernels.miras_mlp.aot import driver_specs, compile_entry\n"
        "print(json.dumps([compile_entry(e, a) for a in %r for e in driver_specs(arch=a)]))\n"
    ) % (str(ROOT), archs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = json.loads(out.stdout.strip().splitlines()[-1])
    # a forward and a backward driver per shipped (arch, config, variant)
    assert len(reports) == 2 * len(MLP_DRIVER_SHIPPED)
    for rep in reports:
        limit = 164 * 1024 if rep["arch"] == "sm_80" else 227 * 1024
        assert rep["spill_bytes"] == 0 and rep["shared_bytes"] <= limit and rep["registers"] <= 255, rep


@interpreter_only
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["titans", "moneta", "memora"])
def test_drivers_equal_the_per_phase_launches(preset, monkeypatch):
    """The drivers compute exactly what the per-phase host loop computes (the path a GPU takes
    where a driver is not AOT-checked, configs.mlp_driver_shipped): bitwise equal outputs, final
    states and gradients in the interpreter, varlen with an empty and a one-token document."""
    from miras_kernels import VarlenMeta

    spec = MirasSpec.preset(preset, expansion=2)
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MIRAS_MLP_PER_PHASE", mode)
        x, st = _layer_inputs(spec, 1, 40, 2, 16, 2)
        y, fin = chunk_miras_mlp(x["q"], x["k"], x["v"], x["alpha"] if spec.needs_alpha else None, x["eta"],
                                 spec=spec, chunk_size=16, delta=x["delta"] if spec.needs_delta else None,
                                 mu=x["mu"] if spec.needs_mu else None, initial_state=st, output_final_state=True,
                                 cu_seqlens=VarlenMeta.from_host([0, 1, 1, 40]))
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum(w.square().sum() for w in fin.values())
        leaves = [t for t in list(x.values()) + list(st.values()) if t.requires_grad]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        out[mode] = [y, *fin.values(), *(g for g in grads if g is not None)]
    assert len(out["0"]) == len(out["1"])
    for a, b in zip(out["0"], out["1"]):
        assert torch.equal(a, b)


def test_kernel_report_lists_every_driver_and_fails_only_on_shipped_ones(monkeypatch):
    """``tools/kernel_report.py --family drivers`` plans every driver candidate of
    ``aot.driver_specs`` on every arch, marks as shipped exactly what ``MLP_DRIVER_SHIPPED`` runs
    there, and counts a spill as a failure only for a shipped driver (a candidate's spill is
    reported: a launch there takes the per-phase path). The compiles themselves are the slow test
    above; here the compiler reports an 8-byte spill for every driver."""
    sys.path.insert(0, str(ROOT / "tools"))
    import kernel_report as kr
    from miras_kernels.configs import MLP_DRIVER_SHIPPED
    from miras_kernels.miras_mlp import aot

    specs = aot.driver_specs()
    jobs = kr.driver_jobs([80, 90])
    assert sorted(jobs) == sorted((i, a) for i in range(len(specs)) for a in (80, 90))
    shipped = [(i, a) for i, a in jobs if kr.driver_shipped(specs[i][3], a)]
    assert len(shipped) == 2 * len(MLP_DRIVER_SHIPPED)  # forward + backward per shipped tuple
    assert {a for _, a in shipped} == {key[0] for key in MLP_DRIVER_SHIPPED}
    monkeypatch.setattr(aot, "compile_entry",
                        lambda entry, arch: {"registers": 255, "spill_bytes": 8, "shared_bytes": 1024,
                                                         "aligned_args": []})
    row = kr.compile_driver_one(shipped[0])
    assert row["variant"] == "shipped" and row["error"] == "spills 8 bytes"
    candidate = next(j for j in jobs if j not in shipped)
    row = kr.compile_driver_one(candidate)
    assert row["variant"] == "candidate" and row["error"] == "" and "spills 8 bytes" in row["note"]
    only_bwd = kr.driver_jobs([90], ["mlp_bwd_driver"])
    assert only_bwd and all(specs[i][3].startswith("mlp_bwd_driver[") for i, _ in only_bwd)
