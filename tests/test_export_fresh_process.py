"""The exported directory loads in a fresh process that has transformers but NOT this package,
offline, with no network at all.

Isolation: the child runs ``python -S`` with only the venv's site-packages on PYTHONPATH, so the
``.pth`` hook of the editable install of this package never runs (the child asserts that
``import miras_pretrain`` fails and that no module of it or of ``kernels`` got loaded); it runs in a scratch cwd with
``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` and ``HF_HOME`` in a temp dir, and under
``unshare -rn`` (a new network namespace with only a down loopback) when the kernel allows it;
otherwise proxies pointing at a closed port block HTTP(S) and the test says so in its output.
Logits tolerance vs the training model: 1e-5 (fp32).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from miras_pretrain.export import export_hf
from miras_pretrain.testing.tiny_models import tiny_config, tiny_tokenizer
from miras_pretrain.model import build_model

CHILD = textwrap.dedent('''
    import sys, json
    try:
        import miras_pretrain  # noqa: F401
        raise SystemExit("miras_pretrain is importable in the child")
    except ImportError:
        pass
    import socket
    try:
        socket.create_connection(("1.1.1.1", 443), timeout=2).close()
        net = "reachable"
    except OSError:
        net = "unreachable"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, ref = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    data = torch.load(ref)
    with torch.no_grad():
        logits = model(input_ids=data["x"]).logits
        err = (logits - data["logits"]).abs().max().item()
        p = data["x"][:1, :17]
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None,
                  attention_mask=torch.ones_like(p))
        same = torch.equal(model.generate(p, use_cache=True, **kw), model.generate(p, use_cache=False, **kw))
    mods = sorted(m for m in sys.modules if m.split(".")[0] in ("miras_pretrain", "miras_kernels"))
    print(json.dumps({"err": err, "same": same, "ids": tok("def f(x): return 42")["input_ids"],
                      "net": net, "mods": mods}))
''')


def _sandbox_prefix() -> list[str]:
    if shutil.which("unshare"):
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
        if ok:
            return ["unshare", "-rn"]
    return []


@pytest.mark.parametrize("preset,pattern", [("memora", "MA")])
def test_loads_offline_without_this_package(preset, pattern, tmp_path):
    import json

    from miras_pretrain.data.tokenizer import Tokenizer

    tok_path = tiny_tokenizer(tmp_path / "tok")
    cfg = tiny_config(preset, pattern)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = tmp_path / f"fresh-{preset}-{os.getpid()}"
    export_hf(cfg, model.state_dict(), tok_path, out)
    x = torch.randint(3, cfg.vocab_size, (2, 29))
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x)}, tmp_path / "ref.pt")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=sysconfig.get_paths()["purelib"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    prefix = _sandbox_prefix()
    if not prefix:  # no network namespace: make every proxied request fail instead
        env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                   HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
        print("unshare -rn unavailable: network blocked by proxy variables only")
    proc = subprocess.run(prefix + [sys.executable, "-S", str(script), str(out), str(tmp_path / "ref.pt")],
                          cwd=scratch, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["mods"] == []
    if prefix:
        assert res["net"] == "unreachable"
    assert res["err"] <= 1e-5
    assert res["same"] is True
    assert res["ids"] == Tokenizer(tok_path).encode("def f(x): return 42")
    # nothing was written into the export dir or fetched into the HF cache's hub folder
    assert not (tmp_path / "hf_home" / "hub").exists() or not any((tmp_path / "hf_home" / "hub").rglob("*.safetensors"))
