"""Built-in synthetic long-context tasks, generated locally (no download), scored per length.

* ``mqar`` -- multi-query associative recall (Zoology style) in token space: ``L/4`` random
  key-value token pairs, then queries ``k v`` of keys seen before filling the rest of the ``L``
  tokens; teacher forced in one forward pass; accuracy = argmax at each query key == its value.
* ``niah_passkey`` / ``niah_number`` / ``niah_word`` -- single needle in a haystack, the three
  S-NIAH tasks of RULER as reported in the Miras paper's table: a pass key in a repeated-noise
  haystack, a 7-digit magic number and a magic word in a natural-text haystack (this Python's
  stdlib sources, the project's embedded corpus). The needle sits at depths spread evenly from
  the start to the end; the prompt (haystack + needle + question) is exactly ``L`` tokens; the
  model decodes greedily (with its cache) and a sample counts as correct when the answer string
  appears in the output.

Every sample is a pure function of (task, length, index, seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

NIAH_TASKS = ("niah_passkey", "niah_number", "niah_word")
TASKS = ("mqar",) + NIAH_TASKS
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = (
    "apple river candle forest marble garden silver planet rocket violin meadow harbor lantern "
    "pepper falcon glacier copper island jacket kitten ladder mirror needle orange pillow quartz "
    "saddle tunnel velvet walnut yellow zipper anchor bamboo cactus dragon engine feather guitar "
    "hammer igloo jungle kettle lemon magnet nectar oyster parrot quiver rabbit spider tomato "
    "umbrella volcano window"
).split()
KEYS = (
    "amber basil cedar delta ember frost grove heron iris juniper kestrel lotus maple nova onyx "
    "pine quill raven sage thistle"
).split()


@dataclass
class NeedleSample:
    prompt_ids: list[int]
    answer: str
    depth: float


def _haystack_ids(tokenizer, kind: str, n_tokens: int) -> list[int]:
    """At least ``n_tokens`` ids of haystack text (noise sentences or stdlib sources)."""
    if kind == "noise":
        unit = tokenizer(NOISE, add_special_tokens=False)["input_ids"]
        return (unit * (n_tokens // max(len(unit), 1) + 1))[:n_tokens]
    from miras_pretrain.data.embedded import stdlib_files

    ids: list[int] = []
    for f in stdlib_files():
        ids += tokenizer(f.path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the stdlib haystack has only {len(ids)} tokens (< {n_tokens}): use shorter lengths")


def needle_sample(tokenizer, task: str, length: int, index: int, n_samples: int, seed: int = 0,
                  haystack: list[int] | None = None) -> NeedleSample:
    """One S-NIAH prompt of exactly ``length`` tokens (``haystack``: pre-tokenized filler)."""
    rng = random.Random(f"{task}:{length}:{index}:{seed}")
    if task == "niah_passkey":
        value = str(rng.randint(10000, 99999))
        needle = f" The pass key is {value}. Remember it. {value} is the pass key. "
        question = " What is the pass key? The pass key is"
    elif task in ("niah_number", "niah_word"):
        key = rng.choice(KEYS)
        kind = "number" if task == "niah_number" else "word"
        value = str(rng.randint(1000000, 9999999)) if kind == "number" else rng.choice(WORDS)
        needle = f" One of the special magic {kind}s for {key} is: {value}. "
        question = (f" What is the special magic {kind} for {key} mentioned in the provided text? "
                    f"The special magic {kind} for {key} mentioned in the provided text is:")
    else:
        raise ValueError(f"unknown needle task {task!r}: choose one of {', '.join(NIAH_TASKS)}")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    needle_ids, question_ids = enc(needle), enc(question)
    n_hay = length - len(needle_ids) - len(question_ids)
    if n_hay < 0:
        raise ValueError(f"length {length} is shorter than the needle and question: use >= 128")
    if haystack is None:
        haystack = _haystack_ids(tokenizer, "noise" if task == "niah_passkey" else "text", n_hay)
    if len(haystack) < n_hay:
        raise ValueError(f"haystack has {len(haystack)} tokens, {n_hay} needed")
    depth = index / max(n_samples - 1, 1)
    at = int(round(depth * n_hay))
    prompt = haystack[:at] + needle_ids + haystack[at:n_hay] + question_ids
    return NeedleSample(prompt, value, depth)


@torch.no_grad()
def run_needle(model, tokenizer, task: str, length: int, n_samples: int, seed: int = 0) -> float:
    """Accuracy (0..1) of greedy cached decoding on ``n_samples`` prompts of ``length`` tokens."""
    device = next(model.parameters()).device
    hay = _haystack_ids(tokenizer, "noise" if task == "niah_passkey" else "text", length)
    correct = 0
    for i in range(n_samples):
        s = needle_sample(tokenizer, task, length, i, n_samples, seed, haystack=hay)
        n_new = len(tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"]) + 2
        ids = torch.tensor([s.prompt_ids], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                             do_sample=False, use_cache=True, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        correct += int(s.answer in text)
    return correct / n_samples


def mqar_batch(vocab_size: int, length: int, n_samples: int, seed: int = 0,
               reserved: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR sequences: input_ids [N, length] and targets [N, length] (-100 except at query keys,
    where the target is the value bound to that key). Ids < ``reserved`` (specials) are avoided;
    keys and values come from disjoint halves of the remaining vocabulary."""
    n_pairs = length // 4
    half = (vocab_size - reserved) // 2
    if half < n_pairs:
        raise ValueError(f"vocab_size={vocab_size} is too small for {n_pairs} distinct MQAR keys at length {length}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    xs = torch.empty(n_samples, length, dtype=torch.long)
    ys = torch.full((n_samples, length), -100, dtype=torch.long)
    for i in range(n_samples):
        keys = torch.randperm(half, generator=gen)[:n_pairs] + reserved
        vals = torch.randint(0, half, (n_pairs,), generator=gen) + reserved + half
        xs[i, 0:2 * n_pairs:2], xs[i, 1:2 * n_pairs:2] = keys, vals
        n_q = (length - 2 * n_pairs) // 2
        pick = torch.randint(0, n_pairs, (n_q,), generator=gen)
        q0 = 2 * n_pairs
        xs[i, q0:q0 + 2 * n_q:2], xs[i, q0 + 1:q0 + 2 * n_q:2] = keys[pick], vals[pick]
        ys[i, q0:q0 + 2 * n_q:2] = vals[pick]
        if length > q0 + 2 * n_q:  # odd length: one filler token at the end
            xs[i, -1] = keys[0]
    return xs, ys


@torch.no_grad()
def run_mqar(model, vocab_size: int, length: int, n_samples: int, seed: int = 0) -> float:
    device = next(model.parameters()).device
    xs, ys = mqar_batch(vocab_size, length, n_samples, seed)
    hits, total = 0, 0
    for x, y in zip(xs, ys):
        pred = model(input_ids=x[None].to(device), use_cache=False).logits[0].argmax(-1).cpu()
        mask = y != -100
        hits += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    return hits / total


def run_synthetic(model, tokenizer, tasks: list[str], lengths: list[int], n_samples: int,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {str(length): accuracy in %}} for every task and length."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"--synthetic task {t!r} is unknown: choose from {', '.join(TASKS)}")
    if n_samples < 1:
        raise ValueError(f"--samples must be >= 1 (got {n_samples})")
    out: dict[str, dict[str, float]] = {}
    for t in tasks:
        out[t] = {}
        for length in lengths:
            if t == "mqar":
                acc = run_mqar(model, model.config.vocab_size, length, n_samples, seed)
            else:
                acc = run_needle(model, tokenizer, t, length, n_samples, seed)
            out[t][str(length)] = 100.0 * acc
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Accuracy table: one row per task, one column per length, and the row average."""
    lengths = sorted({int(k) for row in results.values() for k in row})
    head = "task".ljust(14) + "".join(f"{(str(n // 1024) + 'K') if n % 1024 == 0 else str(n):>8}" for n in lengths) + "     avg"
    lines = [head, "-" * len(head)]
    for task, row in results.items():
        vals = [row.get(str(n)) for n in lengths]
        cells = "".join(f"{v:8.1f}" if v is not None else " " * 8 for v in vals)
        present = [v for v in vals if v is not None]
        lines.append(task.ljust(14) + cells + f"{sum(present) / len(present):8.1f}")
    return "\n".join(lines)
