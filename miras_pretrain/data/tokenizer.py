"""sentencepiece tokenizer: Llama-style BPE training and a thin wrapper around a ``.model`` file.

Training and loading share one code path: ``train_tokenizer`` writes ``<prefix>.model`` and returns
``Tokenizer(<prefix>.model)``, exactly what a user-provided model (e.g. Llama-2's 32K) goes through.
Special ids (BOS/EOS/PAD/UNK) are always read from the model, never assumed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (the tokenizer identity recorded in manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A loaded sentencepiece model.

    Attributes: ``path``, ``sha256``, ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``,
    ``unk_id`` (ids are ``None`` when the model has no such piece, e.g. Llama has no PAD).
    """

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist; train one with "
                                    "`miras-pretrain tokenizer train` or pass an existing .model")
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"tokenizer model {path} is not a sentencepiece model: {err}"
                             ) from None
        self.sha256 = file_sha256(path)
        self.vocab_size = int(self._sp.GetPieceSize())

        def _opt(i: int) -> int | None:
            return int(i) if i >= 0 else None

        self.bos_id = _opt(self._sp.bos_id())
        self.eos_id = _opt(self._sp.eos_id())
        self.pad_id = _opt(self._sp.pad_id())
        self.unk_id = _opt(self._sp.unk_id())
        if self.eos_id is None:
            raise ValueError(f"tokenizer model {path} has no EOS piece; documents need one "
                             "(train with eos_id >= 0)")

    @property
    def token_dtype(self) -> np.dtype:
        """Smallest unsigned dtype holding every id: uint16 when the vocab fits, else uint32."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no BOS/EOS added)."""
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.EncodeAsIds(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def train_tokenizer(texts: Iterator[str], model_prefix: str | os.PathLike, *, vocab_size: int,
                    max_sentence_length: int = 1 << 14, input_sentence_size: int = 2_000_000,
                    pad: bool = False, num_threads: int = 1, seed_sentencepiece_size: int = 200_000,
                    ) -> Tokenizer:
    """Train a Llama-style BPE sentencepiece model on ``texts`` and load it.

    Llama settings (platform notes): identity normalization, no whitespace collapsing, digits split
    into single tokens, byte fallback (no UNK at encode time), unk=0 bos=1 eos=2, PAD only when
    ``pad`` (id 3). Lines longer than ``max_sentence_length`` bytes are cut into pieces since
    sentencepiece skips over-long sentences. Returns the loaded :class:`Tokenizer`.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        # byte fallback alone needs 256 pieces plus the specials
        raise ValueError(f"vocab_size={vocab_size} is too small; byte fallback needs >= 300")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)

    def sentences() -> Iterator[str]:
        for text in texts:
            for line in text.split("\n"):
                if not line.strip():
                    continue
                # cut by characters; a char is at most 4 bytes in UTF-8
                step = max_sentence_length // 4
                for i in range(0, len(line), step):
                    yield line[i:i + step]

    it = sentences()
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("tokenizer training got no text (all inputs empty)") from None

    def chained() -> Iterator[str]:
        yield first
        yield from it

    spm.SentencePieceTrainer.Train(
        sentence_iterator=chained(),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3 if pad else -1,
        max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return Tokenizer(f"{model_prefix}.model")
