"""Head dim 128 with chunk 64: the GPU configuration (d, e, C) = (128, {2, 4}, 64) of the MLP-memory
kernels (kernels/miras_mlp), shipped once every phase compiled spill-free on sm_80/sm_90.

What made it spill-free (chunk_kernels.py / chunk_lq_kernels.py / configs.mlp_phase_warps, see docs/kernels_mlp.md "AOT
compile"): ``mid`` (bias map, then the LN part, dU and dV parked in free scratch slots between CTA
barriers), ``readout2`` (its two dots after a barrier), ``state_dk`` (momentum terms in a second
hidden-block loop), ``first`` (dz parked in region R_A, dk summed in a second loop after a
barrier), ``lq_adj1`` (d Gam from the [C, BH] product do Lam, not a [D, C] tile), and per-phase
warps at d = 128, C = 64 (hidden/first 4, mid 16, state_dk 8). The restructured phases run the same
code at every shape, so tests/test_kernels_mlp.py (d = 16) checks them for every bias, learner and
retention; here the d = 128, C = 64 shape itself runs in the interpreter (a partial and a full
chunk, B = H = 1) against the float64 token loop -- forward, final state and every gradient --
with the tolerances of tests/test_kernels_mlp.py (2e-4 * (max |ref| + 1)).
"""

from __future__ import annotations

import pytest

from miras_kernels.configs import MLP_NOT_SHIPPED as NOT_SHIPPED, MLP_SHIPPED as SHIPPED
from miras_kernels.configs import mlp_config_shipped as gpu_config_supported, mlp_phase_warps as phase_warps
from test_kernels_mlp import SPECS, _check, _inputs, _tol

pytestmark = pytest.mark.triton


def test_d128_is_not_shipped_under_the_gpu_installs_triton():
    """d = 128 compiles spill-free under Triton 3.8.0 but not under 3.7.1, the Triton that torch
    2.13.0's CUDA build requires (mlp_bwd_read2 with momentum spills at every warp count the tables
    allow): on a GPU it falls back to the PyTorch path with that reason. Its per-phase warps stay
    in the tables for when the GPU install moves to Triton 3.8."""
    for e in (2, 4):
        for c in (16, 64):
            assert (128, e, c) not in SHIPPED and (128, e, c) in NOT_SHIPPED
            for arch in (80, 90):
                ok, why = gpu_config_supported(128, e, c, arch)
                assert not ok and "3.7.1" in why, why
    assert phase_warps("mlp_bwd_mid", 128, 64) == 16 and phase_warps("mlp_bwd_mid", 128, 16) == 8
    assert phase_warps("mlp_bwd_first", 128, 64) == 4 and phase_warps("mlp_fwd_hidden", 128, 64) == 4
    assert phase_warps("mlp_bwd_state_dk", 128, 64, lq=True) == 8
    assert phase_warps("mlp_bwd_state_dk", 32, 16, lq=True) == 8 and phase_warps("mlp_bwd_first", 64, 16) == 4


@pytest.mark.parametrize("name", ["titans", "lp_decay", pytest.param("moneta", marks=pytest.mark.slow)])
def test_d128_chunk64_matches_token_loop(name):
    """d = 128, e = 2, C = 64, T = 70 (one full, one partial chunk): titans (l2 + momentum: the
    momentum loop of state_dk, mid's barrier path; ~10 s), lp_decay (lp: mid's bias part; ~8 s) and
    moneta (lp + lq: lq_adj1's d Gam through do Lam; ~70 s, slow). Not Yaad: at d = 128 its Huber
    l1 branch (curvature ~1e3 delta near e_j = 0) amplifies fp32 rounding in dk to 2.3e-3 relative,
    over the 1e-3 bound, with the code before this change too (bit-identical outputs and gradients
    in the interpreter); tests/test_kernels_mlp.py covers Huber at d = 16."""
    spec = SPECS[name]
    _check(spec, 64, _inputs(1, 70, 1, 128, 2), tol=_tol(spec))
