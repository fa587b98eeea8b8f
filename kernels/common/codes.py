"""The integer codes the Triton kernels take as constexprs, shared by both kernel families.

Host code looks a spec's knob up here and passes the code; the kernels branch on it at compile
time. Plain Python (no triton import), so configuration and dispatch code can read it too.
"""

from __future__ import annotations

# attentional bias (constexpr ``BIAS``): the loss l(M(k), v) whose gradient the memory takes
BIAS_CODES = {"dot": 0, "l2": 1, "lp": 2, "huber": 3}
# retention (constexpr ``RET`` of the decoding kernels, ``MAT`` of the linear lq/kl kernels):
# 0 = affine state (none/decay), 1 = lq (W = s(X) X), 2 = kl (W = c softmax(Z))
RETENTION_CODES = {"none": 0, "decay": 0, "lq": 1, "kl": 2}


def bias_scalar(spec) -> float:
    """The MLP kernels' runtime ``p`` argument: the bias's one scalar (lp: the exponent p; huber:
    the smooth-sign eps ``huber_eps``; unused by dot and l2), so no kernel signature carries both."""
    return float(spec.huber_eps) if spec.bias == "huber" else float(spec.p)
