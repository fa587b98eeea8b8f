"""The input contract of the Miras memory operator, shared by every backend.

:func:`validate_inputs` checks every argument of :func:`miras_kernels.miras_memory` once, the same
way for the token loop, the chunk-parallel torch path and both Triton kernel families (one-line
``ValueError`` naming the field and the fix), and brings the initial state to one form: the keys
the caller gave, each ``[N, H, r, c]``; a state key the caller left out starts at zero on every
backend (:meth:`CheckedInputs.state_or_zeros`; only ``memory="mlp"`` requires its weights).

Each backend then takes the checked inputs into its own layout:

* :func:`prepare_inputs` -- the torch forms: compute dtype (at least float32, so bf16/fp16 inputs
  accumulate their state in fp32), head-major ``[B, H, T, ...]``; :func:`run_documents` runs a
  dense core once per batch (or once per document for varlen input) and assembles the outputs.
* :func:`linear_kernel_inputs` -- the linear Triton kernels: token-major contiguous tensors, fp32
  log-gates, fp32 states.
* the MLP Triton kernels build their flat buffers in ``miras_kernels.miras_mlp.chunk``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from .common.varlen import VarlenMeta
from .spec import MirasSpec

State = dict[str, torch.Tensor]
# core(spec, chunk_size, q, k, v, alpha, eta, delta, mu, state) -> (y, final state); all
# tensors head-major: q/k [B, H, T, dk], v [B, H, T, dv], gates [B, H, T] (alpha may be
# [B, H, T, dk]), state values [B, H, r, c].
Core = Callable[..., tuple[torch.Tensor, State]]


@dataclass
class CheckedInputs:
    """Arguments that passed :func:`validate_inputs`, token-major and in the caller's dtypes.

    q, k ``[B, T, H, dk]``; v ``[B, T, H, dv]``; eta ``[B, T, H]``; alpha ``[B, T, H]`` or
    ``[B, T, H, dk]`` (None for retention ``none``: alpha = 1 there); delta, mu ``[B, T, H]`` (None
    unless the bias is huber / the learner momentum). ``initial_state`` holds the keys the caller
    gave, each ``[N, H, r, c]`` (a ``[H, r, c]`` state is broadcast, so its gradient sums over N);
    ``N`` = B, or the number of documents of ``cu_seqlens`` (their ``[start, end)`` in ``bounds``);
    ``cu_seqlens`` is then the ``[N+1]`` int32 device offsets of ``varlen``.
    """

    spec: MirasSpec
    chunk_size: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor | None
    eta: torch.Tensor
    delta: torch.Tensor | None
    mu: torch.Tensor | None
    initial_state: State
    cu_seqlens: torch.Tensor | None
    bounds: list[tuple[int, int]] | None
    n_states: int
    output_final_state: bool
    varlen: VarlenMeta | None = None  # host + device document metadata (None without cu_seqlens)

    def state_or_zeros(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``initial_state[key]`` ``[N, H, r, c]``, or zeros of that shape when it was left out."""
        if key in self.initial_state:
            return self.initial_state[key]
        r, c = self.spec.weight_shapes(self.q.shape[-1], self.v.shape[-1])[key.removeprefix("S_")]
        return torch.zeros(self.n_states, self.q.shape[2], r, c, dtype=dtype, device=self.q.device)


@dataclass
class MemoryInputs:
    """Validated, head-major, compute-dtype inputs of the torch forms (see module docstring)."""

    spec: MirasSpec
    chunk_size: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor | None
    eta: torch.Tensor
    delta: torch.Tensor | None
    mu: torch.Tensor | None
    initial_state: State  # missing entries are created as zeros per document
    bounds: list[tuple[int, int]] | None  # document [start, end) for varlen, else None
    output_final_state: bool
    out_dtype: torch.dtype


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t, dims: str, ndim: int | None, device: torch.device) -> None:
    """Type, rank (unless ndim is None), floating dtype and device of one input."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {dims} (got {type(t).__name__})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have shape {dims} (got {_shape(t)})")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (got {t.dtype}): cast it with .float()")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: move all inputs to one device")


def _check_gate(name: str, t, B: int, T: int, H: int, device, why: str) -> None:
    if t is None:
        raise ValueError(f"{name} is required {why}: pass a [B, T, H] tensor")
    _check_tensor(name, t, "[B, T, H]", None, device)
    if tuple(t.shape) != (B, T, H):
        raise ValueError(f"{name} must have shape [B, T, H] = [{B}, {T}, {H}] (got {_shape(t)})")


def _head_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> contiguous [B, H, T, ...] in the compute dtype."""
    return t.to(dtype).transpose(1, 2).contiguous()


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    *,
    spec: MirasSpec,
    chunk_size: int = 64,
    delta: torch.Tensor | None = None,
    mu: torch.Tensor | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | VarlenMeta | None = None,
) -> CheckedInputs:
    """Check the arguments of ``miras_memory`` (the contract of every backend; shapes in
    :class:`CheckedInputs`) and return them with the initial state as ``[N, H, r, c]`` tensors."""
    if not isinstance(spec, MirasSpec):
        raise ValueError(
            f"spec must be a MirasSpec (got {type(spec).__name__}): use MirasSpec.preset(name) or MirasSpec(...)"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid: use an integer >= 1 (e.g. 64)")
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor of shape [B, T, H, dk] (got {type(q).__name__})")
    device = q.device
    _check_tensor("q", q, "[B, T, H, dk]", 4, device)
    _check_tensor("k", k, "[B, T, H, dk]", 4, device)
    _check_tensor("v", v, "[B, T, H, dv]", 4, device)
    B, T, H, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {_shape(q)} (got {_shape(k)})")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [B, T, H, dv] = [{B}, {T}, {H}, dv] (got {_shape(v)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype (got {q.dtype}, {k.dtype}, {v.dtype}): cast them")
    dv = v.shape[-1]
    if spec.memory == "mlp" and dk != dv:
        raise ValueError(
            f"v's head dim dv={dv} must equal dk={dk} for memory='mlp' (M(x) = x + LN(...) keeps the size)"
        )

    # --- gates ------------------------------------------------------------------------------
    _check_gate("eta", eta, B, T, H, device, "(the inner learning rate)")
    if spec.needs_alpha:
        if alpha is None:
            raise ValueError(
                f"alpha is required for retention={spec.retention!r}: pass a [B, T, H] tensor in (0, 1]"
            )
        _check_tensor("alpha", alpha, "[B, T, H] or [B, T, H, dk]", None, device)
        if alpha.dim() == 4:
            if spec.memory != "linear":
                raise ValueError(
                    f"alpha of shape {_shape(alpha)} is per-channel, which only memory='linear' supports: "
                    "pass [B, T, H] for memory='mlp'"
                )
            if tuple(alpha.shape) != (B, T, H, dk):
                raise ValueError(
                    f"alpha must have shape [B, T, H] or [B, T, H, dk] = [{B}, {T}, {H}, {dk}] (got {_shape(alpha)})"
                )
        elif tuple(alpha.shape) != (B, T, H):
            raise ValueError(
                f"alpha must have shape [B, T, H] = [{B}, {T}, {H}] (or [B, T, H, dk] for memory='linear') "
                f"(got {_shape(alpha)})"
            )
    else:
        alpha = None  # retention 'none' has alpha = 1 by definition; a passed gate is ignored
    if spec.needs_delta:
        _check_gate("delta", delta, B, T, H, device, "for bias='huber' (the Huber threshold)")
    else:
        delta = None
    if spec.needs_mu:
        _check_gate("mu", mu, B, T, H, device, "for learner='momentum' (the momentum gate)")
    else:
        mu = None

    # --- documents ----------------------------------------------------------------------------
    bounds = None
    n_states = B
    varlen = None
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, (torch.Tensor, VarlenMeta)) or (
            isinstance(cu_seqlens, torch.Tensor)
            and (cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 2)
        ):
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N+1] of document offsets (0, ..., T)")
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size B == 1 (got B={B}): pack the documents into one row")
        # a VarlenMeta (or its offsets tensor) was validated when the batch was built: nothing is
        # read from the device here; a bare tensor is read once (common/varlen.py)
        varlen = VarlenMeta.from_cu_seqlens(cu_seqlens, total=T)
        if varlen.device != device:
            varlen = varlen.to(device)
        cu_seqlens = varlen.cu_seqlens
        bounds = varlen.bounds
        n_states = varlen.n_docs

    # --- initial state --------------------------------------------------------------------------
    shapes = spec.weight_shapes(dk, dv)
    state: State = {}
    if initial_state is None:
        if spec.memory == "mlp":
            raise ValueError(
                "initial_state is required for memory='mlp': pass {'W1': [H, d, e*d], 'W2': [H, e*d, d]} "
                "(the model owns the learned initial weights)"
            )
    else:
        if not isinstance(initial_state, Mapping):
            raise ValueError(
                f"initial_state must be a dict with keys {list(spec.state_keys())} (got {type(initial_state).__name__})"
            )
        unknown = sorted(set(initial_state) - set(spec.state_keys()))
        if unknown:
            raise ValueError(f"initial_state has unknown key(s) {unknown}: valid keys are {list(spec.state_keys())}")
        for name in spec.weight_names():
            if name not in initial_state:
                raise ValueError(f"initial_state is missing key {name!r}: it needs {list(spec.weight_names())}")
        lead = "N" if bounds is not None else "B"
        for key, t in initial_state.items():
            r, c = shapes[key.removeprefix("S_")]
            want = f"[{lead}, H, {r}, {c}] or [H, {r}, {c}] = [{n_states}, {H}, {r}, {c}]"
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"initial_state[{key!r}] must be a floating-point tensor {want}")
            if t.device != device:
                raise ValueError(f"initial_state[{key!r}] is on {t.device} but q is on {device}: move it")
            if tuple(t.shape) == (H, r, c):
                t = t.unsqueeze(0).expand(n_states, H, r, c)
            elif tuple(t.shape) != (n_states, H, r, c):
                raise ValueError(f"initial_state[{key!r}] must have shape {want} (got {_shape(t)})")
            state[key] = t

    return CheckedInputs(
        spec=spec, chunk_size=chunk_size, q=q, k=k, v=v, alpha=alpha, eta=eta, delta=delta, mu=mu,
        initial_state=state, cu_seqlens=cu_seqlens, bounds=bounds, n_states=n_states,
        output_final_state=bool(output_final_state), varlen=varlen,
    )


def prepare_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    *,
    spec: MirasSpec,
    chunk_size: int = 64,
    delta: torch.Tensor | None = None,
    mu: torch.Tensor | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | VarlenMeta | None = None,
) -> MemoryInputs:
    """:func:`validate_inputs`, then the torch forms' layout: compute dtype (at least float32),
    head-major ``[B, H, T, ...]`` (state ``[N, H, r, c]``; left-out keys stay absent and
    :func:`run_documents` starts them at zero)."""
    x = validate_inputs(q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
                        initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens)
    cdt = torch.promote_types(q.dtype, torch.float32)
    return MemoryInputs(
        spec=spec,
        chunk_size=chunk_size,
        q=_head_major(x.q, cdt),
        k=_head_major(x.k, cdt),
        v=_head_major(x.v, cdt),
        alpha=None if x.alpha is None else _head_major(x.alpha, cdt),
        eta=_head_major(x.eta, cdt),
        delta=None if x.delta is None else _head_major(x.delta, cdt),
        mu=None if x.mu is None else _head_major(x.mu, cdt),
        initial_state={key: t.to(cdt) for key, t in x.initial_state.items()},
        bounds=x.bounds,
        output_final_state=x.output_final_state,
        out_dtype=q.dtype,
    )


@dataclass
class LinearKernelInputs:
    """Inputs of a linear-family Triton launch. q, k ``[B, T, H, dk]``, v ``[B, T, H, dv]``
    (contiguous, caller's dtype); gates ``[B, T, H]`` fp32 (``la``/``lmu`` = log alpha / log mu,
    None when the spec has no such gate; ``delta`` None unless huber); states ``h0``/``s0``
    ``[N, H, dv, dk]`` fp32 (``h0`` None: the memory starts at zero; ``s0`` zeros when the caller
    left out ``S_W``); ``cu_seqlens`` int32 on q's device; ``n_seq`` = N."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    la: torch.Tensor | None
    lmu: torch.Tensor | None
    eta: torch.Tensor
    delta: torch.Tensor | None
    h0: torch.Tensor | None
    s0: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    n_seq: int


def linear_kernel_inputs(x: CheckedInputs) -> LinearKernelInputs:
    """The linear kernels' layout of checked inputs: gates become fp32 log-gates so the kernels
    work with cumulative sums (autograd differentiates the ``log`` here). A per-channel alpha
    ``[B, T, H, dk]`` has no kernel: ``miras_kernels.supports`` refuses it before this runs."""
    spec = x.spec
    h0 = s0 = None
    if "W" in x.initial_state:
        h0 = x.initial_state["W"].float().contiguous()
        if spec.needs_mu:
            # an omitted momentum state starts at zero, as on the torch path
            s0 = x.state_or_zeros("S_W").float().contiguous()
    cu = None if x.cu_seqlens is None else x.cu_seqlens.to(device=x.q.device, dtype=torch.int32).contiguous()
    return LinearKernelInputs(
        q=x.q.contiguous(), k=x.k.contiguous(), v=x.v.contiguous(),
        la=None if x.alpha is None else torch.log(x.alpha.float().contiguous()),
        lmu=None if x.mu is None else torch.log(x.mu.float().contiguous()),
        eta=x.eta.float().contiguous(),
        delta=None if x.delta is None else x.delta.float().contiguous(),
        h0=h0, s0=s0, cu_seqlens=cu, n_seq=x.n_states,
    )


def _full_state(inp: MemoryInputs, rows: slice, n: int) -> State:
    """The initial state of a batch slice, with zeros for what the caller left out."""
    dk, dv = inp.q.shape[-1], inp.v.shape[-1]
    H = inp.q.shape[1]
    shapes = inp.spec.weight_shapes(dk, dv)
    out: State = {}
    for key in inp.spec.state_keys():
        if key in inp.initial_state:
            out[key] = inp.initial_state[key][rows]
        else:
            r, c = shapes[key.removeprefix("S_")]
            out[key] = inp.q.new_zeros(n, H, r, c)
    return out


def run_documents(inp: MemoryInputs, core: Core) -> tuple[torch.Tensor, State | None]:
    """Run ``core`` over the batch (or each document: its state and chunk grid restart at the
    document start) and return y ``[B, T, H, dv]`` in the input dtype and the final state."""
    tensors = (inp.q, inp.k, inp.v, inp.alpha, inp.eta, inp.delta, inp.mu)
    if inp.bounds is None:
        y, final = core(inp.spec, inp.chunk_size, *tensors, _full_state(inp, slice(None), inp.q.shape[0]))
    else:
        # split (one concatenation in backward) rather than per-document slices
        sizes = [e - s for s, e in inp.bounds]
        docs = zip(*([None] * len(sizes) if t is None else t.split(sizes, dim=2) for t in tensors))
        ys, finals = [], []
        for j, pieces in enumerate(docs):
            yj, fj = core(inp.spec, inp.chunk_size, *pieces, _full_state(inp, slice(j, j + 1), 1))
            ys.append(yj)
            finals.append(fj)
        y = torch.cat(ys, dim=2)
        final = {key: torch.cat([f[key] for f in finals], dim=0) for key in inp.spec.state_keys()}
    y = y.transpose(1, 2).to(inp.out_dtype)
    return y, (final if inp.output_final_state else None)
