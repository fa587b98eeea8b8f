"""Context parallelism (CP = 2 and CP = 4) vs one process, on 4 gloo processes.

One launch of 4 workers runs every case: CP = 4 (one group of 4) and CP = 2 (groups {0, 1} and
{2, 3}, which run the same case). Each worker builds the model from the same seed, computes the
CP = 1 reference itself (plain forward on the whole batch), then the CP forward/backward on its
slice; parameter gradients are summed over the CP group (what DeepSpeed does with the mpu's
sequence-data-parallel group). Checked for a single Miras mixer (output, input gradient, every
parameter gradient) and for the whole model (loss, every gradient), for moneta, yaad, memora,
titans (state passing), gated_delta (state passing AND all-gather, which must also agree with
each other) and deltanet (all-gather; both exact delta rules, ``chunk_rule="exact"``), dense [B=2] input and packed documents crossing rank boundaries off the chunk grid,
with a hybrid (sliding-window + full attention) model for the packed case.

Tolerance: fp32, ``rtol = atol = 1e-5`` (torch.testing.assert_close semantics). State passing
reproduces the CP = 1 arithmetic up to the shapes of the projections' matmuls; the all-gather
scheme re-associates the state recurrence (prefix fold of per-rank affine maps), which stays far
below 1e-5 here. Yaad runs with float64 parameters and memory state, tolerance ``1e-5`` relative to
``max(1, max|ref|)`` of each tensor (the model's norms, gates and loss compute in fp32 inside by
design, so fp32 summation-order noise of ~1e-7 relative remains): its smoothed Huber
gradient has curvature 1/sqrt(1e-6) = 1e3 near e = 0 and a discontinuous l2/l1 switch, so the
CP = 1 run ITSELF changes its fp32 gradients by ~1e2 (at a gradient scale of ~1e4) when the input
is perturbed by 1e-7 relative -- no fp32 comparison of two summation orders is meaningful there,
while float64 shows the CP run is exact. ``eta_max = 0.1`` keeps the other presets well
conditioned (with 1.0, Memora's fp32 gradients move by 1e-1 under the same 1e-7 perturbation).
Memora runs in float64 too: even at eta_max = 0.1 its softmax-retention gradients amplify fp32
summation-order noise (the fp32 chunked op itself is ~1e-5 relative from float64 on its q/alpha
gradients), and CP = 4 on packed input landed at 1.03e-5 absolute on one k_proj entry of 7.7e-3.
The fp32 CP path for Memora-like state passing is still covered by moneta and titans here and by
the trainer runs in tests/test_cp_train.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from miras_pretrain.testing.context_parallel_launch import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOL = dict(rtol=1e-5, atol=1e-5)
TOL64 = 1e-5  # relative to max(1, max|ref|), float64 cases
ETA_MAX = 0.1
DTYPES = {"yaad": torch.float64, "memora": torch.float64}  # everything else float32
V, D, T_DENSE, T_PACKED = 64, 16, 32, 48
PACKED_CU = [0, 13, 37, 38, 40, 48]  # crosses 12/24/36 (CP=4) and 24 (CP=2) off the chunk grid
CASES = [
    ("moneta", "auto"), ("yaad", "auto"), ("memora", "auto"), ("titans", "auto"),
    ("gated_delta", "state_passing"), ("gated_delta", "all_gather"),
    ("deltanet", "all_gather"),  # exact delta rule (WY chunks): still affine in the incoming state
]


def _cfg(preset: str, pattern: str = "M", n_layers: int = 2):
    from miras_pretrain.model import ModelConfig

    return ModelConfig(vocab_size=V, d_model=D, n_layers=n_layers, n_heads=2, ffn_hidden=32,
                       layer_pattern=pattern, miras={"preset": preset}, chunk_size=4, gate_rank=4,
                       window=5, backend="chunked", eta_max=ETA_MAX)


def _batch(packed: bool) -> dict:
    g = torch.Generator().manual_seed(3)
    if packed:
        ids = torch.randint(0, V, (1, T_PACKED), generator=g)
        cu = torch.tensor(PACKED_CU, dtype=torch.int32)
    else:
        ids = torch.randint(0, V, (2, T_DENSE), generator=g)
        cu = None
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[:, 5] = -100  # uneven label counts per rank: the loss scale must account for it
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, errors: list[str]) -> None:
    if ref.dtype == torch.float64:
        tol = TOL64 * max(1.0, float(ref.abs().max()))
        tol_kw = dict(rtol=TOL64, atol=tol)
    else:
        tol_kw = TOL
    try:
        torch.testing.assert_close(got, ref, **tol_kw)
    except AssertionError as err:
        errors.append(f"{what}: {str(err).splitlines()[-2:]}")


def _sum_grads(params, grp) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    out = {}
    for n, p in params:
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=grp.group)
        out[n] = g
    return out


def _layer_case(preset, scheme, grp, packed, errors, tag):
    from miras_pretrain.model.miras_mixer import MirasMixer
    from miras_pretrain.parallel.context_parallel import ContextParallel, slice_batch_for_cp

    cfg = _cfg(preset)
    torch.manual_seed(0)
    mixer = MirasMixer(cfg, out_std=0.02)
    b = _batch(packed)
    B, T = b["input_ids"].shape
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    x_ref = x.clone().requires_grad_()
    y_ref = mixer(x_ref, b["cu_seqlens"])
    (y_ref * dy).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad(set_to_none=True)

    cp = ContextParallel(grp, scheme)
    local = slice_batch_for_cp(b, grp.rank, grp.size, chunk_size=cfg.chunk_size)
    lay = local["cp_slice"]
    x_loc = x[:, lay.start:lay.end].clone().requires_grad_()
    with cp.batch(lay) as ctx:
        y = mixer(x_loc, local.get("cu_seqlens"), ctx)
    (y * dy[:, lay.start:lay.end]).sum().backward()
    cp.finish_step()
    _close(y, y_ref[:, lay.start:lay.end], f"{tag} layer output", errors)
    _close(x_loc.grad, x_ref.grad[:, lay.start:lay.end], f"{tag} layer input grad", errors)
    for n, gsum in _sum_grads(mixer.named_parameters(), grp).items():
        _close(gsum, ref_grads[n], f"{tag} layer grad {n}", errors)
    return y.detach()


def _model_case(preset, scheme, grp, packed, errors, tag):
    from miras_pretrain.model import build_model
    from miras_pretrain.parallel.context_parallel import ContextParallel, cp_loss_reduce, slice_batch_for_cp

    cfg = _cfg(preset, "MAT", 3) if packed else _cfg(preset)
    torch.manual_seed(0)
    model = build_model(cfg)
    b = _batch(packed)
    ref_loss = model(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"])
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    cp = ContextParallel(grp, scheme)
    local = slice_batch_for_cp(b, grp.rank, grp.size, chunk_size=cfg.chunk_size)
    with cp.batch(local["cp_slice"]) as ctx:
        loss = model(local["input_ids"], labels=local["labels"], cu_seqlens=local.get("cu_seqlens"), cp=ctx)
        loss = loss * local["cp_loss_scale"]
    loss.backward()
    cp.finish_step()
    _close(cp_loss_reduce(loss, grp), ref_loss.detach(), f"{tag} model loss", errors)
    grads = _sum_grads(model.named_parameters(), grp)
    for n, g in grads.items():
        _close(g, ref_grads[n], f"{tag} model grad {n}", errors)
    if cp.stats.tokens != local["input_ids"].numel() * sum(k == "miras" for k in cfg.layer_kinds()):
        errors.append(f"{tag}: stats.tokens={cp.stats.tokens}")
    if grp.size > 1 and cp.stats.messages == 0:
        errors.append(f"{tag}: no CP message was sent")
    return {n: g for n, g in grads.items()}


def _worker(rank: int, world: int, workdir: str) -> None:
    import torch.distributed as dist

    from miras_pretrain.parallel.context_parallel import CPGroup

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {4: CPGroup([0, 1, 2, 3], dist.group.WORLD),
              2: CPGroup([0, 1] if rank < 2 else [2, 3], pairs[rank // 2])}
    errors: list[str] = []
    kept: dict = {}
    for size, grp in groups.items():
        for preset, scheme in CASES:
            torch.set_default_dtype(DTYPES.get(preset, torch.float32))
            for packed in (False, True):
                tag = f"CP={size} {preset}/{scheme} {'packed' if packed else 'dense'}"
                kept[(size, preset, scheme, packed, "layer")] = _layer_case(preset, scheme, grp, packed, errors, tag)
                kept[(size, preset, scheme, packed, "model")] = _model_case(preset, scheme, grp, packed, errors, tag)
    torch.set_default_dtype(torch.float32)
    torch.save({"errors": errors, "kept": kept}, Path(workdir) / f"cp_{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("cp")
    spawn(_worker, 4, str(path), timeout=280.0)
    return [torch.load(path / f"cp_{r}.pt") for r in range(4)]


def test_cp_matches_single_process(results):
    """Every layer output, input gradient, loss and parameter gradient of CP = 2 and CP = 4
    equals the CP = 1 run within 1e-5 (all presets, dense and packed)."""
    errors = [e for r, out in enumerate(results) for e in out["errors"]]
    assert not errors, "\n".join(errors[:20])


def test_gated_delta_schemes_agree(results):
    """State passing and all-gather give the same outputs and gradients (1e-5)."""
    for out in results:
        kept = out["kept"]
        for size in (2, 4):
            for packed in (False, True):
                a = kept[(size, "gated_delta", "state_passing", packed, "layer")]
                b = kept[(size, "gated_delta", "all_gather", packed, "layer")]
                torch.testing.assert_close(a, b, **TOL)
                ga = kept[(size, "gated_delta", "state_passing", packed, "model")]
                gb = kept[(size, "gated_delta", "all_gather", packed, "model")]
                for n in ga:
                    torch.testing.assert_close(ga[n], gb[n], **TOL, msg=n)
