"""Offline inputs for the real ``sglang.bench_serving`` client.

The client needs a Hugging Face tokenizer and, for ``--dataset-name random``, a
ShareGPT-format JSON file; both would normally come from the Hub.  This module
generates small deterministic stand-ins (seeded, no network) and ships them in
``tuner/sim/assets/``.  Regenerate with ``python -m tuner.sim.offline``.

Tokenizer design: a WordLevel model over pseudo-words, split on whitespace, no
normalizer, no decoder (tokens are joined with one space) and no post-processor.
Hence

* ``decode(ids)`` of N word ids re-encodes to exactly N tokens, so the client's
  ``total_output_tokens_retokenized`` equals the server's completion tokens;
* ``num_special_tokens_to_add() == 0``: the random dataset does not shorten
  prompts, so ``--random-input-len 1024 --random-range-ratio 1.0`` sends prompts
  that :func:`count_tokens` counts as exactly 1024 tokens, matching the
  client-side ``total_input_tokens``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "AssetSpec",
    "SPECIAL_TOKENS",
    "assets_dir",
    "build_tokenizer",
    "count_tokens",
    "generate_assets",
    "load_tokenizer",
    "make_output_text",
    "make_sharegpt",
    "make_vocabulary",
    "sharegpt_path",
    "tokenizer_dir",
    "word_pieces",
    "write_sharegpt",
    "write_tokenizer",
]

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "ch", "dr", "gl", "kr", "pl", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "x")


@dataclass(frozen=True)
class AssetSpec:
    """Parameters of the committed assets; changing any of them changes the files."""

    seed: int = 20251127
    vocab_words: int = 4093  # plus the 3 special tokens = 4096 ids
    conversations: int = 512
    human_words: tuple[int, int] = (4, 512)  # log-uniform range of prompt words
    gpt_words: tuple[int, int] = (2, 256)  # log-uniform range of reply words


def assets_dir() -> Path:
    """Directory of the packaged assets."""
    return Path(__file__).resolve().parent / "assets"


def tokenizer_dir() -> Path:
    """Packaged tokenizer directory (pass it to bench_serving's ``--tokenizer``)."""
    return assets_dir() / "tokenizer"


def sharegpt_path() -> Path:
    """Packaged ShareGPT-format JSON (pass it to bench_serving's ``--dataset-path``)."""
    return assets_dir() / "sharegpt.json"


# --------------------------------------------------------------------------- generation


def make_vocabulary(n_words: int, seed: int) -> list[str]:
    """``n_words`` distinct lowercase pseudo-words, shortest first (ties: seeded order)."""
    if n_words < 1:
        raise ValueError(f"n_words must be >= 1, got {n_words}")
    rng = random.Random(seed)
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < n_words:
        n_syll = rng.choice((1, 2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(n_syll))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return sorted(words, key=len)


def build_tokenizer(words: Sequence[str]) -> Tokenizer:
    """WordLevel tokenizer: special tokens get ids 0..2, then ``words`` in order."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    if len(vocab) != len(SPECIAL_TOKENS) + len(words):
        raise ValueError("words must be distinct and must not repeat a special token")
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    unk, bos, eos = SPECIAL_TOKENS
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk,
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
    }
    special_map = {"unk_token": unk, "bos_token": bos, "eos_token": eos}
    # Re-dump the library's serialization compactly; key order is the library's.
    tokenizer_json = json.dumps(json.loads(tok.to_str()), ensure_ascii=False,
                                separators=(",", ":"))
    return {
        "tokenizer.json": tokenizer_json + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
    }


def _log_uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def make_sharegpt(words: Sequence[str], spec: AssetSpec) -> list[dict[str, Any]]:
    """ShareGPT-format conversations (human turn, gpt turn) made of ``words`` only."""
    rng = random.Random(spec.seed + 1)
    # Zipf-like word frequencies (short words common) keep the file small.
    weights = [1.0 / (rank + 3) for rank in range(len(words))]
    convs: list[dict[str, Any]] = []
    for i in range(spec.conversations):
        turns = []
        for role, (lo, hi) in (("human", spec.human_words), ("gpt", spec.gpt_words)):
            n = _log_uniform_int(rng, lo, hi)
            turns.append({"from": role, "value": " ".join(rng.choices(words, weights, k=n))})
        convs.append({"id": f"kttune-sim-{i:05d}", "conversations": turns})
    return convs


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tokenizer(out_dir: Path, spec: AssetSpec = AssetSpec()) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tok = build_tokenizer(make_vocabulary(spec.vocab_words, spec.seed))
    paths = []
    for name, text in _tokenizer_files(tok).items():
        _atomic_write(out_dir / name, text)
        paths.append(out_dir / name)
    return paths


def write_sharegpt(path: Path, spec: AssetSpec = AssetSpec()) -> Path:
    """Write the ShareGPT JSON, one conversation per line.

    bench_serving's random dataset yields at most one prompt per conversation, so
    runs with more ``--num-prompts`` than ``spec.conversations`` need a larger file:
    write one with ``AssetSpec(conversations=N)`` (same vocabulary, same tokenizer).
    """
    convs = make_sharegpt(make_vocabulary(spec.vocab_words, spec.seed), spec)
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in convs)
    _atomic_write(path, "[\n" + lines + "\n]\n")
    return path


def generate_assets(out_dir: Path | None = None, spec: AssetSpec = AssetSpec()) -> list[Path]:
    """Regenerate all assets under ``out_dir`` (default: the packaged directory)."""
    root = assets_dir() if out_dir is None else Path(out_dir)
    paths = write_tokenizer(root / "tokenizer", spec)
    paths.append(write_sharegpt(root / "sharegpt.json", spec))
    return paths


# --------------------------------------------------------------------------- server side


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Load a tokenizer.json (or a directory holding one); default: the packaged one."""
    from tokenizers import Tokenizer

    p = tokenizer_dir() if path is None else Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer.json not found at {p}")
    return Tokenizer.from_file(str(p))


def count_tokens(tok: Tokenizer, text: str) -> int:
    """Prompt tokens as a server counts them (special tokens included, if any)."""
    return len(tok.encode(text, add_special_tokens=True).ids)


def word_pieces(tok: Tokenizer) -> list[str]:
    """Non-special vocabulary entries in id order (cache it for many requests)."""
    special = set(SPECIAL_TOKENS)
    vocab = tok.get_vocab(with_added_tokens=False)
    return [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w not in special]


def make_output_text(tok: Tokenizer, n_tokens: int, seed: int) -> list[str]:
    """``n_tokens`` non-empty pieces (``" word"``), one per generated token.

    Any prefix joined with ``"".join`` re-encodes to exactly that many tokens with
    the packaged tokenizer; a server streams the cumulative join as ``text``.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    words = word_pieces(tok)
    if not words:
        raise ValueError("tokenizer has no non-special vocabulary entries")
    rng = random.Random(seed)
    return [" " + rng.choice(words) for _ in range(n_tokens)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuner.sim.offline",
                                     description="Regenerate the offline bench assets.")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the packaged assets directory)")
    parser.add_argument("--conversations", type=int, default=AssetSpec.conversations,
                        help="ShareGPT conversations to write (max prompts per run)")
    ns = parser.parse_args(argv)
    spec = AssetSpec(conversations=ns.conversations)
    for p in generate_assets(ns.out, spec):
        print(f"{p}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
