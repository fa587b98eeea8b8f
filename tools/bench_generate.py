"""Cached generation speed of exported models vs prompt length.

For each model (a registered model with random weights, exported to a temp dir and loaded
with transformers, i.e. the artefact users get) and each prompt length: prefill the prompt
through the cache in pieces of ``--prefill-chunk`` tokens, then decode ``--new-tokens`` tokens
greedily one at a time and report decode tokens/s and the cache size. Miras presets should be
flat in the prompt length (O(1) per token), the Transformer++ should slow down (its KV cache and
per-token attention grow linearly); a hybrid is flat beyond its window.

    python tools/bench_generate.py                       # 1K, 8K, 32K on the tiny presets
    python tools/bench_generate.py --quick               # seconds; used by the test suite
    python tools/bench_generate.py --models moneta_170m transformer_170m --device cuda

Prints a table and writes JSON to ``--out`` (default bench_results/bench_generate.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ["moneta_tiny", "yaad_tiny", "gated_delta_tiny", "moneta_hybrid_tiny", "transformer_tiny"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="registered model names (miras-pretrain models)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny run: lengths 64/256, 4 new tokens, 2 models")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "bench_generate.json"))
    return p.parse_args(argv)


def export_random(name: str, tmp: Path) -> Path:
    from miras_pretrain.export import export_hf
    from miras_pretrain.testing.tiny_models import tiny_tokenizer
    from miras_pretrain.model import ModelConfig, build_model

    cfg = ModelConfig.from_ref(name)
    tok = tmp / "tok" / "tok.model"
    if not tok.is_file():
        tiny_tokenizer(tmp / "tok")
    torch.manual_seed(0)
    return export_hf(cfg, build_model(cfg).state_dict(), tok, tmp / f"bench-{name}")


@torch.no_grad()
def bench_one(model, length: int, new_tokens: int, prefill_chunk: int, device: str) -> dict:
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    cache = None
    t0 = time.perf_counter()
    for s in range(0, length, prefill_chunk):
        out = model(input_ids=prompt[:, s:s + prefill_chunk], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    prefill_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"prompt": length, "decode_tok_s": new_tokens / dt, "ms_per_token": 1000 * dt / new_tokens,
            "prefill_s": prefill_s, "cache_mib": cache.nbytes() / 2**20}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.models = [m for m in args.models if m in ("moneta_tiny", "transformer_tiny")] or args.models[:2]
        args.lengths, args.new_tokens = [64, 256], 4
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        for name in args.models:
            d = export_random(name, Path(tmp))
            model = AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=True).to(args.device).eval()
            for length in args.lengths:
                r = bench_one(model, length, args.new_tokens, args.prefill_chunk, args.device)
                rows.append({"model": name, **r})
                print(f"  {name:20s} prompt {length:6d}: {r['decode_tok_s']:8.1f} tok/s", flush=True)
            del model
    head = f"{'model':20s} {'prompt':>7s} {'tok/s':>9s} {'ms/tok':>8s} {'prefill s':>10s} {'cache MiB':>10s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:20s} {r['prompt']:7d} {r['decode_tok_s']:9.1f} {r['ms_per_token']:8.2f} "
              f"{r['prefill_s']:10.2f} {r['cache_mib']:10.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "new_tokens": args.new_tokens, "prefill_chunk": args.prefill_chunk}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
