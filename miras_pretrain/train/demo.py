"""``miras-pretrain demo``: the whole pipeline on one CPU machine in a few minutes.

1. prepare the embedded corpus (the Python stdlib's own source, no download) and train a
   sentencepiece tokenizer on it (data package: ``prepare_embedded_corpus``);
2. size the run to the time budget: time a few forward/backward passes of the tiny Moneta at the
   demo's batch shape and derive ``train.max_steps`` (so the cosine schedule fits the budget);
3. train with the regular trainer (DeepSpeed ZeRO-1, one process, fp32 on CPU), evaluating the
   held-out split at the start, periodically and at the end;
4. print first vs last validation loss/perplexity; where the checkpoint, the offline W&B run
   and the loss-curve PNG are is the trainer's run summary (printed at the end of every run).

The training config is ``configs/demo_moneta_tiny.yaml`` (shipped in the package as
``miras_pretrain.configs``); ``--set`` overrides any of its keys.
"""

from __future__ import annotations

import math
import time
from importlib.resources import files
from pathlib import Path
from typing import Optional

from miras_pretrain.train.config import RunConfig, load_config

DEMO_CONFIG = "demo_moneta_tiny.yaml"
# corpus cap: enough text that the demo never repeats an epoch, small enough to prepare fast
DEFAULT_CORPUS_MB = 4.0


def demo_config_path() -> Path:
    """The demo's training config, shipped as package data: pyproject.toml maps the checkout's
    configs/ folder onto ``miras_pretrain.configs``, so the demo runs from any directory, from the
    checkout and from an installed wheel. A real file path, because the config names its model
    YAML relative to its own directory."""
    path = Path(str(files("miras_pretrain.configs") / DEMO_CONFIG))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package: reinstall miras-pretrain")
    return path


def _time_step(cfg: RunConfig, repeats: int = 1) -> float:
    """Seconds per optimizer step of the configured model at the configured batch shape
    (forward + backward + AdamW on random tokens; the median of ``repeats`` after a warm-up)."""
    import torch

    from miras_pretrain.model import build_model
    from miras_pretrain.train.config import resolve_model_config
    from miras_pretrain.train.data_bridge import resolve

    mcfg = resolve_model_config(cfg)
    dcfg = resolve(cfg)
    B, T = cfg.train.micro_batch_size * cfg.train.grad_accum_steps, dcfg.seq_len
    torch.manual_seed(0)
    model = build_model(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, mcfg.vocab_size, (B, T))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = model(x, labels=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    del model, opt
    return sorted(times[1:])[len(times[1:]) // 2]


def _pick_threads(requested: Optional[int]) -> int:
    """Torch threads for the demo, decided (and printed once) as for every command:
    :func:`miras_pretrain.threads.apply_threads` (``--threads``, else CPUs / local processes
    capped by OMP_NUM_THREADS / SLURM_CPUS_PER_TASK, fewer on a busy machine). The training
    config gets the same count as ``train.threads``, so the trainer keeps it."""
    from miras_pretrain.threads import apply_threads

    return apply_threads(requested, label="    torch threads").threads


def _banner(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def run_demo(out: str = "runs/demo", minutes: float = 6.0, steps: Optional[int] = None,
             corpus_mb: Optional[float] = None, overrides: Optional[list[str]] = None,
             threads: Optional[int] = None) -> int:
    """Run the demo; returns the process exit code (0 when validation loss fell)."""
    if minutes <= 0:
        raise ValueError(f"--minutes {minutes} must be > 0")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads} must be >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1")
    t_start = time.perf_counter()
    out_dir = Path(out)
    corpus_dir = out_dir / "corpus"
    # validate the config (and the user's --set keys) before spending time on data
    base_overrides = [f"run.out_dir={out_dir}"]
    cfg = load_config(demo_config_path(), base_overrides + list(overrides or []))

    from miras_pretrain.data import prepare_embedded_corpus
    from miras_pretrain.train.config import resolve_model_config

    mcfg = resolve_model_config(cfg)
    seq_len = int(cfg.data.get("seq_len", 256))
    _banner(f"1/4 corpus + tokenizer -> {corpus_dir}  (Python stdlib source, vocab {mcfg.vocab_size})")
    t0 = time.perf_counter()
    mb = DEFAULT_CORPUS_MB if corpus_mb is None else corpus_mb
    prepared = prepare_embedded_corpus(
        str(corpus_dir), vocab_size=mcfg.vocab_size, seq_len=seq_len,
        layout=cfg.data.get("layout", "documents"), max_bytes=int(mb * 1e6),
        # <out>/corpus is the demo's own: reused when unchanged, rebuilt for another size
        overwrite=True,
    )
    splits = prepared.manifest.splits
    print(f"    {'reused' if prepared.reused else 'prepared'} in {time.perf_counter() - t0:.1f}s: "
          f"train {splits['train'].num_tokens:,} tokens, val {splits['val'].num_tokens:,} tokens; "
          f"tokenizer {prepared.tokenizer_path}", flush=True)
    cfg = load_config(
        demo_config_path(),
        base_overrides
        + [f"data.streams=[{prepared.root}]", f"data.tokenizer={prepared.tokenizer_path}"]
        + list(overrides or []),
    )

    _banner("2/4 sizing the run to the time budget")
    n_threads = _pick_threads(threads)
    if steps is None:
        step_s = _time_step(cfg)
        evals_s = 0.0
        budget = minutes * 60.0
        # eval passes cost ~1/3 of a training step per batch (forward only); reserve for them
        n_steps = max(10, int(budget / step_s))
        n_evals = 2 + (n_steps // cfg.eval.interval if cfg.eval.interval else 0)
        evals_s = n_evals * cfg.eval.batches * step_s / 3 / max(1, cfg.train.grad_accum_steps)
        n_steps = max(10, int((budget - evals_s) / step_s))
        print(f"    {step_s:.2f}s per step measured -> {n_steps} steps for a {minutes:g}-minute budget", flush=True)
    else:
        n_steps = steps
        print(f"    {n_steps} steps (--steps)", flush=True)
    # safety net on a machine slower than the calibration said: stop (evaluate + checkpoint)
    # when the budget is overrun by half
    sized = [f"train.max_steps={n_steps}", f"train.time_limit_minutes={minutes * 1.5:g}", f"train.threads={n_threads}",
             f"train.warmup_steps={min(cfg.train.warmup_steps, max(1, n_steps // 10))}"]
    if cfg.eval.interval > n_steps:
        sized.append(f"eval.interval={max(1, n_steps // 2)}")
    if cfg.checkpoint.interval > n_steps:
        sized.append(f"checkpoint.interval={n_steps}")
    cfg = load_config(
        demo_config_path(),
        base_overrides
        + [f"data.streams=[{prepared.root}]", f"data.tokenizer={prepared.tokenizer_path}"]
        + sized + list(overrides or []),
    )

    _banner(f"3/4 training a tiny Moneta ({n_steps} steps, DeepSpeed ZeRO-{cfg.train.zero_stage}, CPU)")
    from miras_pretrain.model import count_parameters
    from miras_pretrain.train.trainer import train

    print(f"    model: {count_parameters(resolve_model_config(cfg)):,} parameters; "
          f"batch {cfg.train.micro_batch_size} x {seq_len} tokens", flush=True)
    t0 = time.perf_counter()
    # running the demo again means running it again: its earlier run in the same --out is
    # replaced (overwrite, with a printed line), as the prepared corpus there is reused
    result = train(cfg, resume=None, overwrite=True)
    train_s = time.perf_counter() - t0

    _banner("4/4 results")
    if result.reason not in ("done", "time_limit") or not result.val_history:
        print(f"    training stopped early (exit code {result.exit_code}): {result.message}", flush=True)
        return result.exit_code or 1
    (s0, v0), (s1, v1) = result.val_history[0], result.val_history[-1]
    # where the checkpoint, W&B run, loss curve and metrics are: the trainer's run summary, just above
    print(f"    validation loss: step {s0}: {v0:.4f} (ppl {math.exp(v0):.1f})  ->  "
          f"step {s1}: {v1:.4f} (ppl {math.exp(v1):.1f})", flush=True)
    print(f"    time: training {train_s / 60:.1f} min, total {(time.perf_counter() - t_start) / 60:.1f} min",
          flush=True)
    if not v1 < v0:
        print("    validation loss did not fall: something is wrong", flush=True)
        return 1
    return 0
