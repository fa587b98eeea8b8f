"""docs/walkthrough.md runs as written (issue #22): your corpus -> tokenizer -> data -> train ->
evaluate -> export -> generate -> SLURM dry-run, block by block, in a temporary directory.

The page marks its code blocks with HTML comments on the line before the fence:

* ``<!-- walkthrough: run NAME -->``: run the block (``bash -euo pipefail`` for ```bash, the
  venv's ``python`` for ```python) in the working directory; NAME keys its output;
* ``<!-- walkthrough: file PATH -->``: save the block's text as PATH (relative);
* ``<!-- walkthrough: skip REASON -->``: shown only.

Every bash/sh/python/yaml/json block must carry one of them, so no command on the page goes
untested by accident; unmarked blocks of other kinds (```text: sample output) are shown only.
The blocks run in order with the venv's bin first on PATH; the slow test then checks the key
outputs of each step.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from miras_pretrain.testing import tiny_training

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "walkthrough.md"
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, not the base interpreter's

MARKER = re.compile(r"^<!--\s*walkthrough:\s*(\S+)\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\S*)\s*$")
MUST_BE_MARKED = {"bash", "sh", "python", "yaml", "json"}
RUNNABLE = {"bash", "python"}


@dataclass
class Block:
    kind: str   # run | file | skip | show
    arg: str    # run: name; file: path; skip: reason
    lang: str
    text: str
    line: int   # 1-based line of the opening fence


def extract_blocks(markdown: str, where: str = "doc") -> list[Block]:
    """The fenced blocks of ``markdown`` in order, with their markers; ValueError on a
    malformed page (unmarked command block, marker not followed by a block, unknown marker,
    unclosed fence, duplicate run name, unsafe file path)."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    pending: tuple[str, str, int] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line.strip())
        if m:
            if pending is not None:
                raise ValueError(f"{where}:{pending[2]}: walkthrough marker not followed by a code block")
            kind, arg = m.group(1), m.group(2)
            if kind not in ("run", "file", "skip"):
                raise ValueError(f"{where}:{i + 1}: unknown walkthrough marker {kind!r} (run, file, skip)")
            if kind in ("run", "file") and not arg:
                raise ValueError(f"{where}:{i + 1}: 'walkthrough: {kind}' needs a {'name' if kind == 'run' else 'path'}")
            pending = (kind, arg, i + 1)
            i += 1
            continue
        f = FENCE.match(line)
        if f:
            lang, start = f.group(1).lower(), i + 1
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"{where}:{start}: code block never closed")
            if pending is None:
                if lang in MUST_BE_MARKED:
                    raise ValueError(f"{where}:{start}: ```{lang} block without a walkthrough marker "
                                     "(run NAME, file PATH or skip REASON) on the line before it")
                kind, arg = "show", ""
            else:
                kind, arg, _ = pending
                pending = None
            if kind == "run" and lang not in RUNNABLE:
                raise ValueError(f"{where}:{start}: 'walkthrough: run' on a ```{lang} block (bash or python only)")
            if kind == "file" and (Path(arg).is_absolute() or ".." in Path(arg).parts):
                raise ValueError(f"{where}:{start}: file path {arg!r} must be relative, without '..'")
            blocks.append(Block(kind, arg, lang, "\n".join(body) + "\n", start))
            i += 1
            continue
        if pending is not None and line.strip():
            raise ValueError(f"{where}:{pending[2]}: walkthrough marker not followed by a code block")
        i += 1
    if pending is not None:
        raise ValueError(f"{where}:{pending[2]}: walkthrough marker not followed by a code block")
    names = [b.arg for b in blocks if b.kind == "run"]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: duplicate run names {dupes}")
    return blocks


class StepFailed(AssertionError):
    pass


def walk_env(tmp: Path) -> dict[str, str]:
    env = tiny_training.child_env(tmp)
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return env


def run_blocks(blocks: list[Block], workdir: Path, env: dict[str, str], timeout: float = 600) -> dict[str, str]:
    """Save the file blocks and run the run blocks in order in ``workdir``; returns each run
    block's combined stdout + stderr by name. Raises StepFailed naming the block on a non-zero
    exit (or a timeout)."""
    outputs: dict[str, str] = {}
    for b in blocks:
        if b.kind == "file":
            dest = workdir / b.arg
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(b.text)
        elif b.kind == "run":
            argv = ["bash", "-euo", "pipefail", "-c", b.text] if b.lang == "bash" else ["python", "-c", b.text]
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                tiny_training.kill_group(proc)
                raise StepFailed(f"walkthrough step {b.arg!r} (line {b.line}) timed out after {timeout} s")
            finally:
                tiny_training.kill_group(proc)
            outputs[b.arg] = out
            if proc.returncode != 0:
                raise StepFailed(f"walkthrough step {b.arg!r} (line {b.line}) exited {proc.returncode}:\n"
                                 f"{b.text}\n--- output ---\n{out[-4000:]}")
    return outputs


# ---------------------------------------------------------------------------------------------
# The extractor and runner themselves (fast): a broken page or a failing block fails.

def test_the_page_is_well_formed_and_covers_the_day():
    blocks = extract_blocks(DOC.read_text(), str(DOC))
    runs = [b.arg for b in blocks if b.kind == "run"]
    assert runs == ["corpus", "tokenizer", "prepare", "models", "train", "resume", "eval", "export",
                    "generate", "slurm"]
    files = [b.arg for b in blocks if b.kind == "file"]
    assert files == ["corpus/notes.jsonl", "configs/my_tiny.yaml"]
    # the saved JSONL example is valid JSONL with a text field
    notes = next(b for b in blocks if b.arg == "corpus/notes.jsonl")
    assert all(isinstance(json.loads(l)["text"], str) for l in notes.text.splitlines())


@pytest.mark.parametrize("page, error", [
    ("```bash\necho unmarked\n```\n", "without a walkthrough marker"),
    ("<!-- walkthrough: run a -->\n\nsome prose\n```bash\necho x\n```\n", "not followed by a code block"),
    ("<!-- walkthrough: run a -->\n", "not followed by a code block"),
    ("<!-- walkthrough: runn a -->\n```bash\necho x\n```\n", "unknown walkthrough marker"),
    ("<!-- walkthrough: run -->\n```bash\necho x\n```\n", "needs a name"),
    ("<!-- walkthrough: run a -->\n```yaml\nx: 1\n```\n", "bash or python only"),
    ("<!-- walkthrough: file ../x.yaml -->\n```yaml\nx: 1\n```\n", "must be relative"),
    ("<!-- walkthrough: run a -->\n```bash\necho x\n", "never closed"),
    ("<!-- walkthrough: run a -->\n```bash\necho 1\n```\n<!-- walkthrough: run a -->\n```bash\necho 2\n```\n",
     "duplicate run names"),
])
def test_a_malformed_page_is_refused(page, error):
    with pytest.raises(ValueError, match=error):
        extract_blocks(page)


@pytest.mark.parametrize("body", ["false\necho after", "echo $NOT_SET_ANYWHERE", "false | cat"])
def test_a_failing_block_fails_under_bash_strict_mode(tmp_path, body):
    page = (f"<!-- walkthrough: file in.txt -->\n```text\nhello\n```\n"
            f"<!-- walkthrough: run ok -->\n```bash\ncat in.txt\n```\n"
            f"<!-- walkthrough: run broken -->\n```bash\n{body}\n```\n")
    with pytest.raises(StepFailed, match="'broken'"):
        run_blocks(extract_blocks(page), tmp_path, walk_env(tmp_path), timeout=60)


def test_blocks_run_in_order_in_the_working_directory(tmp_path):
    page = ("<!-- walkthrough: file sub/in.txt -->\n```text\nhello\n```\n"
            "<!-- walkthrough: run a -->\n```bash\ncat sub/in.txt > copy.txt\n```\n"
            "<!-- walkthrough: run b -->\n```python\nimport sys; print(open('copy.txt').read().strip(), sys.prefix)\n```\n")
    out = run_blocks(extract_blocks(page), tmp_path, walk_env(tmp_path), timeout=60)
    assert out["b"].split() == ["hello", sys.prefix]  # the venv's python, from PATH


# ---------------------------------------------------------------------------------------------
# The page itself, end to end.

@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path):
    assert (VENV_BIN / "miras-pretrain").is_file(), f"no miras-pretrain next to {sys.executable}"
    work = tmp_path / "work"
    work.mkdir()
    out = run_blocks(extract_blocks(DOC.read_text(), str(DOC)), work, walk_env(tmp_path))

    # 1. corpus: the user's two lines + 60 stdlib documents
    assert len((work / "corpus" / "notes.jsonl").read_text().splitlines()) == 2
    assert len((work / "corpus" / "stdlib.jsonl").read_text().splitlines()) == 60

    # 2. tokenizer
    assert (work / "tok" / "sp.model").is_file()
    assert re.search(r"vocab size:\s+512\b", out["tokenizer"]), out["tokenizer"]
    assert "round-trips exactly" in out["tokenizer"], out["tokenizer"]

    # 3. data
    manifest = json.loads((work / "data" / "mine" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 512 and manifest["layout"] == "packed" and manifest["seq_len"] == 128
    assert manifest["splits"]["train"]["num_samples"] > 0 and manifest["splits"]["val"]["num_samples"] >= 32

    # 4. models
    assert re.search(r"^moneta_tiny\s", out["models"], re.M), out["models"]
    assert "vocab_size: 4096" in out["models"]

    # 5. train, then resume with --set
    ckpts = work / "runs" / "my_tiny" / "checkpoints"
    assert "run ended at step 20/20 (exit 0)" in out["train"], out["train"][-3000:]
    assert (ckpts / "step_00000020" / "meta.json").is_file()
    assert "resumed from runs/my_tiny/checkpoints/step_00000020 at step 20" in out["resume"], out["resume"][-3000:]
    assert "train.max_steps: 20 -> 30" in out["resume"]
    assert "run ended at step 30/30 (exit 0)" in out["resume"]
    assert (ckpts / "step_00000030" / "meta.json").is_file()

    # 6. eval: perplexity with its token count, below the uniform model's (the vocabulary size)
    m = re.search(r"perplexity \(val, ([\d,]+) tokens, the first 32 rows of the split, seq_len 128\): "
                  r"([\d.]+)\s+loss ([\d.]+)", out["eval"])
    assert m, out["eval"][-3000:]
    tokens, ppl, loss = int(m.group(1).replace(",", "")), float(m.group(2)), float(m.group(3))
    assert tokens == 32 * 128
    assert 1 < ppl < 512 and math.isclose(math.log(ppl), loss, rel_tol=1e-3)
    results = json.loads((work / "results.json").read_text())
    assert results["perplexity"]["tokens"] == tokens
    assert set(results["synthetic"]["mqar"]) == {"256"}

    # 7. export loads with transformers and generates
    export = work / "exports" / "my_tiny-hf"
    for name in ("config.json", "modeling_miras.py", "tokenizer.model", "model.safetensors"):
        assert (export / name).is_file(), name
    gen = out["generate"].strip().splitlines()[-1]
    assert gen.startswith("'def main():\\n") and len(gen) > len("'def main():\\n    '"), out["generate"][-2000:]

    # 8. SLURM dry-run: 2 nodes x 8 GPUs, 16 data-parallel ranks
    script = (work / "my_tiny.sbatch").read_text()
    assert script.startswith("#!/bin/bash")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --time=04:00:00",
                 "#SBATCH --requeue", "PROCS_PER_NODE=8"):
        assert re.search(rf"^{re.escape(line)}$", script, re.M), line
        assert line in out["slurm"], line  # the grep in the page shows it
    assert re.search(r"^TRAIN=\(.* train --config \S+/configs/my_tiny\.yaml --resume auto "
                     r"--set train\.global_batch_size=64\)$", script, re.M)
    assert ("global batch: 64 sequences = train.micro_batch_size 4 x grad_accum_steps 1 x 16 "
            "data-parallel ranks") in out["slurm"]
