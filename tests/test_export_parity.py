"""Export -> load with transformers -> same logits as the training model; cached decoding ==
full recompute.

Tolerances: exported logits vs training logits in fp32: 1e-5 absolute (the required bound; the
full pass runs the training operator's chunk algebra: we measure 0 for the affine retentions and
<= 3e-6 for lq/kl, whose per-token weights training forms in a separate scan). Cached / piecewise prefill vs the training
logits in fp32: 5e-5 (the chunk grid is kept exactly, only the summation order differs; Yaad's
token-by-token path measures 1.4e-5). The same comparison with the model in float64 drops to
<= 6e-8 (asserted <= 1e-6; RMSNorms, gates and logits are computed in fp32 by design, as in
training, so single fp32 ulps remain): the cache follows the training semantics and the fp32 gap
is rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

from miras_pretrain.export import export_hf, load_exported_state_dict
from miras_pretrain.testing.tiny_models import tiny_config, tiny_tokenizer
from miras_pretrain.model import build_model

TOL = 1e-5
TOL_CACHED_FP32 = 5e-5
TOL_CACHED_FP64 = 1e-6

CASES = {
    "moneta": ("moneta", "M"),
    "yaad": ("yaad", "M"),
    "memora": ("memora", "M"),
    "titans": ("titans", "M"),
    "gated_delta": ("gated_delta", "M"),
    "deltanet": ("deltanet", "M"),
    "transformer": ("moneta", "T"),
    "hybrid": ("yaad", "MA"),
}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _export(name, tok_path, tmp_path_factory, **over):
    from transformers import AutoModelForCausalLM

    preset, pattern = CASES[name]
    cfg = tiny_config(preset, pattern, **over)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = tmp_path_factory.mktemp("exp") / f"parity-{name}"
    export_hf(cfg, model.state_dict(), tok_path, out, max_shard_size="64KB")
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    return cfg, model, hf, out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_training_model_and_cache_pieces(name, tok_path, tmp_path_factory):
    cfg, model, hf, out = _export(name, tok_path, tmp_path_factory)
    x = torch.randint(0, cfg.vocab_size, (2, 37))  # 37: several chunks of 8 + a partial one
    with torch.no_grad():
        ref = model(x)
        full = hf(input_ids=x, use_cache=False).logits
        assert (full - ref).abs().max().item() <= TOL
        # prefill in pieces that start and end inside chunks, on chunk boundaries, and token by
        # token across a boundary: must equal the single full pass
        for cuts in ([13, 14, 24, 25], [8, 16], [3, 4, 5, 6, 7, 8, 9, 30]):
            got = _pieces(hf, x, cuts)
            assert (got - ref).abs().max().item() <= TOL_CACHED_FP32, cuts
        hf.double()
        full64 = hf(input_ids=x, use_cache=False).logits
        got64 = _pieces(hf, x, [3, 4, 5, 6, 7, 8, 9, 13, 30])
        assert (got64 - full64).abs().max().item() <= TOL_CACHED_FP64


def _pieces(hf, x, cuts):
    """Logits of x fed through the cache in pieces ending at ``cuts``."""
    cache, parts, prev = None, [], 0
    for c in cuts + [x.shape[1]]:
        o = hf(input_ids=x[:, prev:c], past_key_values=cache, use_cache=True)
        cache, prev = o.past_key_values, c
        parts.append(o.logits)
    assert cache.get_seq_length() == x.shape[1]
    return torch.cat(parts, 1)


@pytest.mark.parametrize("name", ["moneta", "transformer", "hybrid"])
def test_cached_generation_equals_full_recompute(name, tok_path, tmp_path_factory):
    cfg, model, hf, _ = _export(name, tok_path, tmp_path_factory)
    prompt = torch.randint(3, cfg.vocab_size, (1, 21))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=2, eos_token_id=None,
              attention_mask=torch.ones_like(prompt))
    seen = []  # input lengths per forward call: the cached run must feed one token per step
    orig = hf.forward
    hf.forward = lambda *a, **k: seen.append(k["input_ids"].shape[1]) or orig(*a, **k)
    with torch.no_grad():
        cached = hf.generate(prompt, use_cache=True, **kw)
        assert seen == [21] + [1] * 19
        full = hf.generate(prompt, use_cache=False, **kw)
        assert seen[20:] == list(range(21, 41))
        assert cached.shape[1] == 41
        assert torch.equal(cached, full)
        # and the greedy continuation is the training model's argmax at every step
        logits = model(cached[:, :-1])
        assert torch.equal(logits[0, 20:].argmax(-1), cached[0, 21:])


def test_miras_cache_size_is_constant_in_prompt_length(tok_path, tmp_path_factory):
    _, _, hf, _ = _export("moneta", tok_path, tmp_path_factory)
    sizes = []
    with torch.no_grad():
        for n in (5, 50, 200):
            o = hf(input_ids=torch.randint(3, 512, (1, n)), use_cache=True)
            sizes.append(o.past_key_values.nbytes())
    assert sizes[0] == sizes[1] == sizes[2]


def test_files_sharding_untied_and_round_trip(tok_path, tmp_path_factory):
    cfg, model, hf, out = _export("moneta", tok_path, tmp_path_factory, tie_embeddings=True)
    files = sorted(p.name for p in out.iterdir())
    for need in ("config.json", "configuration_miras.py", "modeling_miras.py", "generation_config.json",
                 "tokenizer.model", "tokenizer_config.json", "model.safetensors.index.json"):
        assert need in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded above 64KB
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["miras_spec"]["retention"] == "lq" and config["miras_spec"]["p"] == 3.0
    # tied training model -> untied storage with equal values
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf.lm_head.weight, model.embed.word.weight)
    x = torch.randint(0, cfg.vocab_size, (1, 19))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - model(x)).abs().max().item() <= TOL
    cfg2, sd2 = load_exported_state_dict(out)
    assert cfg2 == cfg
    sd = model.state_dict()
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_tokenizer_ids_equal_training_tokenizer(tok_path, tmp_path_factory):
    from transformers import AutoTokenizer

    from miras_pretrain.data.tokenizer import Tokenizer

    _, _, _, out = _export("transformer", tok_path, tmp_path_factory)
    ours = Tokenizer(tok_path)
    text = ("def f(x):\n    return x + 12345  # ünïcode ✓ 日本\n\n\tend  of   line ",
            " leading space", "42", "")
    for use_fast in (False, True):
        hf_tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True, use_fast=use_fast)
        for t in text:
            assert hf_tok(t)["input_ids"] == ours.encode(t), (use_fast, t)
        assert hf_tok.eos_token_id == ours.eos_id and hf_tok.bos_token_id == ours.bos_id


def test_fixed_huber_threshold_exports_and_matches(tok_path, tmp_path_factory):
    """``huber_delta`` (Yaad with a fixed threshold instead of the learned gate): the training
    model has no delta gate column, the export reads the value from its config, logits agree."""
    cfg, model, hf, out = _export("yaad", tok_path, tmp_path_factory, huber_delta=0.5)
    mixer = model.layers[0].mixer
    assert "delta" not in mixer.gate_names
    assert mixer.gate_up.weight.shape[0] == cfg.n_heads * len(cfg.gate_names)
    assert json.loads((out / "config.json").read_text())["huber_delta"] == 0.5
    x = torch.randint(0, cfg.vocab_size, (2, 29))
    with torch.no_grad():
        ref = model(x)
        assert (hf(input_ids=x, use_cache=False).logits - ref).abs().max().item() <= TOL
        assert (_pieces(hf, x, [5, 6, 17]) - ref).abs().max().item() <= TOL_CACHED_FP32
    # the threshold matters: the learned-gate model with the same other weights differs
    assert mixer.gates(torch.randn(1, 3, cfg.d_model))["delta"].eq(0.5).all()
