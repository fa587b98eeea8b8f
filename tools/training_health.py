"""Training health of every preset on the demo recipe: max gradient norm and validation loss.

Trains each model (every ``MirasSpec`` preset, the Transformer++ and the Samba-style hybrids, at
the tiny size) on the demo's recipe -- embedded corpus, ``configs/demo_moneta_tiny.yaml``'s batch,
learning rate, warmup and clipping -- for ``--steps`` steps with the real trainer (DeepSpeed, one
process, one thread each, ``--parallel`` runs at a time), then reads ``metrics.jsonl``:

* ``max grad norm``: the largest pre-clipping gradient norm after warm-up (step > ``--after``);
* ``val``: validation loss at the last step, and its ratio to Moneta's.

Prints a table and writes JSON. ``tests/test_training_health.py`` runs it and asserts the limits
(docs/training_health.md)::

    .venv/bin/python tools/training_health.py --out runs/health --json runs/health/health.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from miras_pretrain.testing.tiny_training import child_env, train_command  # noqa: E402

# name -> model section (a registered tiny model, or one with the Miras preset swapped for the
# grid points the registry does not name)
MODELS: dict[str, object] = {
    "moneta": "moneta_tiny",
    "yaad": "yaad_tiny",
    "memora": "memora_tiny",
    "titans": "titans_tiny",
    "ttt_mlp": {"from": "titans_tiny", "miras": {"preset": "ttt_mlp"}},
    "deltanet": "deltanet_tiny",
    "gated_delta": "gated_delta_tiny",
    "linear_attn": {"from": "gated_delta_tiny", "miras": {"preset": "linear_attn"}},
    "gla": {"from": "gated_delta_tiny", "miras": {"preset": "gla"}},
    "transformer": "transformer_tiny",
    "moneta_hybrid": "moneta_hybrid_tiny",
    "yaad_hybrid": "yaad_hybrid_tiny",
    "memora_hybrid": "memora_hybrid_tiny",
}
REFERENCE = "moneta"

# Recall check (MQAR, Zoology style: loss on the answers only): small enough for CI, and a setting
# the Transformer++ and Gated DeltaNet learn within the budget. Chance accuracy is 1/30.
MQAR_MODELS = ("transformer", "gated_delta", "yaad", "memora")
MQAR = {"vocab": 64, "length": 32, "batch": 64, "steps": 300, "lr": 1e-2, "d_model": 64}


def prepare_corpus(out: Path, corpus_mb: float):
    """The demo's embedded corpus (vocab 4096, packed rows of the demo's seq_len)."""
    from miras_pretrain.data import prepare_embedded_corpus

    demo = yaml.safe_load((REPO / "configs" / "demo_moneta_tiny.yaml").read_text())
    return prepare_embedded_corpus(str(out / "corpus"), vocab_size=4096, seq_len=demo["data"]["seq_len"],
                                   layout=demo["data"]["layout"], max_bytes=int(corpus_mb * 1e6))


def run_config(name: str, out: Path, prepared, steps: int) -> Path:
    """The demo config with ``name``'s model, ``steps`` steps, every step logged, one final eval."""
    cfg = yaml.safe_load((REPO / "configs" / "demo_moneta_tiny.yaml").read_text())
    model = MODELS[name]
    run_dir = out / name
    cfg["run"].update(name=f"health_{name}", out_dir=str(run_dir))
    cfg["model"] = model
    cfg["data"].update(streams=[prepared.root], tokenizer=prepared.tokenizer_path,
                       cache_dir=str(run_dir / "data_cache"))
    cfg["train"].update(max_steps=steps)
    cfg["eval"].update(interval=steps, at_start=False)
    cfg["checkpoint"].update(interval=0, save_at_end=False)
    cfg["log"].update(interval=1, wandb=False, progress_bar=False)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def summarize(metrics: Path, after: int) -> dict:
    """Max gradient norm after step ``after`` and the last validation loss from metrics.jsonl."""
    grad, val = {}, {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "train/grad_norm" in row:
            grad[row["step"]] = row["train/grad_norm"]
        if "val/loss" in row:
            val[row["step"]] = row["val/loss"]
    late = sorted(g for s, g in grad.items() if s > after)
    return {"max_grad_norm": late[-1] if late else float("nan"),
            "median_grad_norm": late[len(late) // 2] if late else float("nan"),
            "steps_above_100": sum(g > 100 for g in late),
            "max_grad_norm_step": max((s for s in grad if s > after), key=grad.get, default=None),
            "first_grad_norm": grad.get(min(grad)) if grad else float("nan"),
            "val_loss": val[max(val)] if val else float("nan"), "val_step": max(val) if val else None}


def run_pool(jobs: list[tuple[str, list[str], dict, Path]], parallel: int, on_done) -> None:
    """Run ``(name, argv, env, log_path)`` jobs as subprocesses of the repository root,
    ``parallel`` at a time, calling ``on_done(name, returncode, seconds)`` as each one ends."""
    pending = list(jobs)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            name, argv, env, log_path = pending.pop(0)
            with log_path.open("w") as logf:  # the child keeps its own handle
                proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
            running[name] = (proc, time.perf_counter())
        time.sleep(0.5)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                on_done(name, proc.returncode, time.perf_counter() - t0)


def _failure(log_path: Path, code: int, secs: float) -> dict:
    return {"exit_code": code, "log_tail": log_path.read_text()[-2000:], "seconds": secs}


def run_all(names: list[str], out: Path, *, steps: int = 100, after: int = 20, parallel: int = 2,
            corpus_mb: float = 1.5, log=print) -> dict[str, dict]:
    """Train every model in ``names`` and return {name: summary} (with ``val_ratio`` to Moneta's
    when Moneta is among them). A run that fails is reported with its exit code and log tail."""
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_corpus(out, corpus_mb)
    results: dict[str, dict] = {}
    jobs = []
    for name in names:
        tmp = out / name / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        # --overwrite: a rerun into the same --out replaces that model's earlier run (its rows would
        # otherwise mix into the summary; the trainer refuses a fresh run over an old one)
        jobs.append((name, train_command(run_config(name, out, prepared, steps), extra=["--overwrite"]), child_env(tmp),
                     out / f"{name}.log"))

    def done(name: str, code: int, secs: float) -> None:
        if code != 0:
            results[name] = _failure(out / f"{name}.log", code, secs)
            log(f"{name}: FAILED (exit {code}) after {secs:.0f}s")
            return
        r = results[name] = {**summarize(out / name / "metrics.jsonl", after), "seconds": secs, "exit_code": 0}
        log(f"{name}: max grad norm after step {after} {r['max_grad_norm']:.3g}, "
            f"val loss {r['val_loss']:.3f} at step {r['val_step']} ({secs:.0f}s)")

    run_pool(jobs, parallel, done)
    ref = results.get(REFERENCE, {}).get("val_loss")
    for r in results.values():
        if ref and "val_loss" in r:
            r["val_ratio"] = r["val_loss"] / ref
    return {n: results[n] for n in names}


def mqar_one(name: str, steps: int = MQAR["steps"], seed: int = 0) -> dict:
    """Train a 2-layer model of preset ``name`` on MQAR (fresh batches every step, answer-only
    loss, AdamW + warmup/cosine, clipping 1.0) and return held-out recall accuracy and the max
    gradient norm after step 20. One thread; deterministic for a given seed."""
    import torch

    from miras_pretrain.evaluation.synthetic import mqar_batch
    from miras_pretrain.model import build_model
    from miras_pretrain.train.optim import lr_factor, param_groups

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    V, L, d = MQAR["vocab"], MQAR["length"], MQAR["d_model"]
    attention = name == "transformer"
    model = build_model({"vocab_size": V, "d_model": d, "n_layers": 2, "n_heads": 2, "ffn_hidden": 2 * d,
                         "layer_pattern": "T" if attention else "M",
                         "miras": {"preset": "moneta" if attention else name},
                         "chunk_size": 16, "gate_rank": 16, "window": L})
    groups = param_groups(model, weight_decay=0.1, no_decay_patterns=["mem_init"])
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                            lr=MQAR["lr"], betas=(0.9, 0.95))
    max_gn, t0 = 0.0, time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = MQAR["lr"] * lr_factor(step, warmup_steps=10, max_steps=steps, min_lr_ratio=0.1)
        x, y = mqar_batch(V, L, MQAR["batch"], seed=seed * 1_000_000 + step)
        model(x, labels=y).backward()
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if step >= 20:
            max_gn = max(max_gn, gn)
        opt.step()
        opt.zero_grad(set_to_none=True)
    xv, yv = mqar_batch(V, L, 256, seed=10_000 + seed)
    with torch.no_grad():
        pred = model(xv).argmax(-1)
    mask = yv != -100
    acc = float((pred[mask] == yv[mask]).float().mean())
    return {"accuracy": acc, "max_grad_norm": max_gn, "seconds": time.perf_counter() - t0}


def mqar_all(names: list[str], out: Path, *, steps: int = MQAR["steps"], parallel: int = 2,
             log=print) -> dict[str, dict]:
    """:func:`mqar_one` for every name, ``parallel`` processes at a time (one thread each)."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    jobs = [(name, [sys.executable, str(Path(__file__).resolve()), "--mqar-one", name, "--steps", str(steps),
                    "--json", str(out / f"mqar_{name}.json")], child_env(out), out / f"mqar_{name}.log")
            for name in names]

    def done(name: str, code: int, secs: float) -> None:
        if code != 0:
            results[name] = _failure(out / f"mqar_{name}.log", code, secs)
            log(f"mqar {name}: FAILED (exit {code})")
            return
        r = results[name] = {**json.loads((out / f"mqar_{name}.json").read_text()), "exit_code": 0}
        log(f"mqar {name}: accuracy {r['accuracy']:.3f}, max grad norm {r['max_grad_norm']:.3g} "
            f"({r['seconds']:.0f}s)")

    run_pool(jobs, parallel, done)
    return {n: results[n] for n in names}


def table(results: dict[str, dict], after: int) -> str:
    lines = [f"| model | grad norm at step 1 | after step {after}: median / max grad norm (steps > 100) | "
             f"val loss | val / {REFERENCE} | seconds |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r.get("exit_code"):
            lines.append(f"| {name} | failed (exit {r['exit_code']}) | | | | {r['seconds']:.0f} |")
            continue
        lines.append(f"| {name} | {r['first_grad_norm']:.3g} | {r['median_grad_norm']:.3g} / "
                     f"{r['max_grad_norm']:.3g} ({r['steps_above_100']}) | "
                     f"{r['val_loss']:.3f} | {r.get('val_ratio', float('nan')):.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--after", type=int, default=20, help="warm-up steps left out of the max grad norm")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--corpus-mb", type=float, default=1.5)
    ap.add_argument("--out", default="runs/health")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--mqar", action="store_true", help="run the MQAR recall check instead "
                    f"({', '.join(MQAR_MODELS)}; --steps defaults to {MQAR['steps']})")
    ap.add_argument("--mqar-one", default=None, help=argparse.SUPPRESS)  # one recall run (a child)
    args = ap.parse_args(argv)
    if args.mqar_one:
        res = mqar_one(args.mqar_one, steps=args.steps)
        Path(args.json).write_text(json.dumps(res))
        return 0
    if args.mqar:
        steps = MQAR["steps"] if args.steps == 100 else args.steps
        res = mqar_all(list(MQAR_MODELS), Path(args.out) / "mqar", steps=steps, parallel=args.parallel)
        print("| model | recall accuracy | max grad norm after step 20 |\n|---|---|---|")
        for n, r in res.items():
            print(f"| {n} | {r.get('accuracy', float('nan')):.3f} | {r.get('max_grad_norm', float('nan')):.3g} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"mqar": MQAR, "steps": steps, "results": res}, indent=2))
        return 0 if all(r.get("exit_code") == 0 for r in res.values()) else 1
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    results = run_all(names, Path(args.out), steps=args.steps, after=args.after,
                      parallel=args.parallel, corpus_mb=args.corpus_mb)
    print(table(results, args.after))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"steps": args.steps, "after": args.after, "results": results},
                                              indent=2))
    return 0 if all(r.get("exit_code") == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
