#!/usr/bin/env python
"""Training-step check and timing for tools/gpu_check.sh: tokens/s, MFU and peak memory of a model
on one device, with the DeepSpeed engine when deepspeed is importable and plain torch otherwise.

    python tools/gpu_check_train.py --model moneta_340m --seq-len 4096 --batch 2 --steps 3 --out train.json
    python tools/gpu_check_train.py --check-step --model moneta_tiny --out step.json   # one step, checked

Timing: one warm-up step (compiles the Triton kernels) then ``--steps`` timed optimizer steps of
``batch x seq_len`` random tokens. Engine: ``miras_pretrain.train.engine.build_engine`` (DeepSpeed
ZeRO-1, bf16, torch AdamW: what ``miras-pretrain train`` builds) when deepspeed is importable;
otherwise the same model under ``torch.autocast(bfloat16)`` with fp32 weights and torch AdamW
(fused on CUDA) -- the row's ``engine`` field says which, so numbers from the two are not
mistaken for each other. MFU = flops_per_token x tokens/s / device peak
(``miras_pretrain.train.metrics.device_peak_flops``).

``--check-step``: one forward + backward + optimizer step with the memory layers on
``--backend`` (triton by default on CUDA), checked: the loss is finite, every gradient is finite and
the loss equals the PyTorch chunked backend's on the same batch within 2e-2 relative (bf16
autocast on both). Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bf16 autocast on both sides: the two backends' losses differ by bf16 rounding of activations
CHECK_LOSS_RTOL = 2e-2


def _model(ref: str, backend: str, device, layers: int | None = None):
    import torch

    from miras_pretrain.model import ModelConfig, build_model

    cfg = ModelConfig.from_ref(ref)
    cfg = dataclasses.replace(cfg, backend=backend, n_layers=layers or cfg.n_layers)
    torch.manual_seed(0)
    return cfg, build_model(cfg).to(device)


def _autocast(device):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def check_step(args, device) -> dict:
    """One checked training step (see module docstring)."""
    import torch

    cfg, model = _model(args.model, args.backend, device, args.layers)
    _, ref_model = _model(args.model, "chunked", device, args.layers)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device,
                      generator=torch.Generator(device=device).manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with _autocast(device):
        loss = model(x, labels=x)
        with torch.no_grad():
            ref_loss = ref_model(x, labels=x)
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    opt.step()
    rel = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12)
    ok = bool(torch.isfinite(loss)) and not bad and rel <= CHECK_LOSS_RTOL
    return {"model": args.model, "backend": args.backend, "device": str(device), "loss": loss.item(),
            "chunked_loss": ref_loss.item(), "loss_rel_diff": rel, "loss_rtol": CHECK_LOSS_RTOL,
            "nonfinite_grads": bad[:10], "ok": ok}


def time_steps(args, device) -> dict:
    """Warm-up + timed steps (see module docstring)."""
    import torch

    from miras_pretrain.model import count_parameters, flops_per_token
    from miras_pretrain.train.metrics import device_peak_flops, memory_gib

    cfg, model = _model(args.model, args.backend, device, args.layers)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    if args.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("--engine deepspeed: deepspeed is not importable (use --engine auto or torch)")
    have_ds = args.engine != "torch" and importlib.util.find_spec("deepspeed") is not None
    if have_ds:
        from miras_pretrain.train import dist as mdist
        from miras_pretrain.train.config import config_from_dict
        from miras_pretrain.train.engine import build_engine

        mdist.init_distributed(device)   # a one-process group, as the trainer starts it

        tcfg = config_from_dict({"train": {"max_steps": args.steps + 1, "micro_batch_size": args.batch,
                                           "warmup_steps": 0, "zero_stage": 1}})
        engine, _ = build_engine(model, tcfg, device)
        engine_name = "deepspeed (ZeRO-1, bf16, torch AdamW)"

        def step():
            loss = engine(x, labels=x)
            engine.backward(loss)
            engine.step()
            return loss
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        why = "asked for" if args.engine == "torch" else "deepspeed not importable"
        engine_name = f"plain torch ({why}): fp32 weights, bf16 autocast, AdamW"

        def step():
            with _autocast(device):
                loss = model(x, labels=x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    def timed() -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, loss.detach().float().item()

    warm_s, _ = timed()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [timed() for _ in range(args.steps)]
    dt = sum(t for t, _ in runs) / len(runs)
    tok_s = args.batch * args.seq_len / dt
    fpt = float(flops_per_token(cfg, args.seq_len))
    peak = device_peak_flops(device)
    return {"model": args.model, "layers": cfg.n_layers, "backend": args.backend, "engine": engine_name, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "seq_len": args.seq_len, "batch": args.batch, "params": int(count_parameters(cfg)),
            "warmup_step_s": warm_s, "steps_timed": len(runs), "step_s": dt, "tokens_per_s": tok_s,
            "flops_per_token": fpt, "peak_flops": peak, "mfu": fpt * tok_s / peak,
            "losses": [loss for _, loss in runs], **memory_gib(device)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="moneta_340m", help="a registered model (miras-pretrain models)")
    ap.add_argument("--layers", type=int, default=None, help="override the model's n_layers (a shorter check)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    ap.add_argument("--backend", default=None, help="memory operator backend (default triton on CUDA, chunked on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--engine", choices=["auto", "deepspeed", "torch"], default="auto",
                    help="auto: DeepSpeed when importable, else plain torch")
    ap.add_argument("--check-step", action="store_true", help="one checked step instead of timing")
    ap.add_argument("--out", required=True, help="JSON output path")
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1 (got {args.steps})")
    sys.path.insert(0, str(REPO))
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (use --device cpu)")
    args.backend = args.backend or ("triton" if device.type == "cuda" else "chunked")
    if args.check_step:
        row = check_step(args, device)
    else:
        try:
            row = time_steps(args, device)
        finally:
            if args.engine != "torch" and importlib.util.find_spec("deepspeed") is not None:
                from miras_pretrain.train import dist as mdist

                mdist.destroy()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))
    print(json.dumps(row))
    return 0 if row.get("ok", True) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
