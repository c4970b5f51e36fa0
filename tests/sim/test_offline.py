"""Offline bench_serving inputs: tokenizer round trip, ShareGPT shape, reproducibility."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tuner.sim import offline
from tuner.sim.offline import (
    AssetSpec,
    count_tokens,
    load_tokenizer,
    make_output_text,
    sharegpt_path,
    tokenizer_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sharegpt() -> list[dict]:
    return json.loads(sharegpt_path().read_text(encoding="utf-8"))


def _word_ids(tok, n: int, seed: int) -> list[int]:
    words = offline.word_pieces(tok)
    rng = random.Random(seed)
    return [tok.token_to_id(rng.choice(words)) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 10, 1024, 4096])
def test_decode_then_encode_keeps_token_count(tok, n: int) -> None:
    ids = _word_ids(tok, n, seed=n)
    text = tok.decode(ids, skip_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False).ids == ids
    assert count_tokens(tok, text) == n


def test_no_special_tokens_are_added(tok) -> None:
    # bench_serving's random dataset shortens text prompts by this count.
    assert tok.num_special_tokens_to_add(False) == 0
    assert count_tokens(tok, "") == 0


def test_output_pieces_retokenize_one_token_each(tok) -> None:
    pieces = make_output_text(tok, 512, seed=7)
    assert len(pieces) == 512
    assert all(p.strip() and p.startswith(" ") for p in pieces)
    for k in (1, 2, 33, 512):
        assert count_tokens(tok, "".join(pieces[:k])) == k
    assert make_output_text(tok, 512, seed=7) == pieces
    assert make_output_text(tok, 512, seed=8) != pieces
    assert make_output_text(tok, 0, seed=7) == []
    with pytest.raises(ValueError):
        make_output_text(tok, -1, seed=7)


def test_tokenizer_config_selects_fast_tokenizer_without_cleanup() -> None:
    config = json.loads((tokenizer_dir() / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    special = json.loads((tokenizer_dir() / "special_tokens_map.json").read_text())
    assert set(special.values()) <= set(offline.SPECIAL_TOKENS)


def test_load_tokenizer_accepts_file_and_dir(tok, tmp_path: Path) -> None:
    by_file = load_tokenizer(tokenizer_dir() / "tokenizer.json")
    assert by_file.get_vocab_size() == tok.get_vocab_size() == 4096
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)


def test_sharegpt_has_the_shape_bench_serving_reads(tok, sharegpt: list[dict]) -> None:
    assert isinstance(sharegpt, list)
    # One prompt per conversation: the seed workloads send 37 + 1 warmup.
    assert len(sharegpt) >= 38
    ids = set()
    for conv in sharegpt:
        ids.add(conv["id"])
        turns = conv["conversations"]
        assert len(turns) >= 2
        assert [t["from"] for t in turns[:2]] == ["human", "gpt"]
        for turn in turns[:2]:
            assert isinstance(turn["value"], str) and turn["value"].strip()
            enc = tok.encode(turn["value"], add_special_tokens=False)
            assert 0 not in enc.ids  # no <unk>: every word is in the vocabulary
    assert len(ids) == len(sharegpt)


@pytest.mark.parametrize("input_len", [10, 1024, 3000])
def test_random_dataset_prompts_have_exact_length(tok, sharegpt: list[dict],
                                                  input_len: int) -> None:
    """Mirror bench_serving's random dataset: cut or repeat a prompt's ids, decode."""
    for conv in sharegpt[:40]:
        prompt_ids = tok.encode(conv["conversations"][0]["value"],
                                add_special_tokens=True).ids
        reps = -(-input_len // len(prompt_ids))
        text = tok.decode((prompt_ids * reps)[:input_len], skip_special_tokens=False)
        assert count_tokens(tok, text) == input_len


def test_vocabulary_is_deterministic_and_distinct() -> None:
    words = offline.make_vocabulary(500, seed=3)
    assert words == offline.make_vocabulary(500, seed=3)
    assert words != offline.make_vocabulary(500, seed=4)
    assert len(set(words)) == 500 and all(w.isalpha() and w.islower() for w in words)
    with pytest.raises(ValueError):
        offline.make_vocabulary(0, seed=3)


def test_regeneration_reproduces_committed_assets(tmp_path: Path) -> None:
    written = offline.generate_assets(tmp_path)
    committed = offline.assets_dir()
    assert len(written) == 4
    for path in written:
        rel = path.relative_to(tmp_path)
        assert path.read_bytes() == (committed / rel).read_bytes(), rel


def test_assets_stay_small() -> None:
    total = sum(p.stat().st_size for p in offline.assets_dir().rglob("*") if p.is_file())
    assert total < 1_000_000


def test_larger_sharegpt_keeps_vocabulary(tmp_path: Path, tok) -> None:
    path = offline.write_sharegpt(tmp_path / "big.json", AssetSpec(conversations=600))
    convs = json.loads(path.read_text())
    assert len(convs) == 600
    assert 0 not in tok.encode(convs[-1]["conversations"][0]["value"]).ids


def _bench_python() -> Path:
    venv = Path(os.environ.get("KTTUNE_BENCH_VENV", REPO_ROOT / ".venv-bench"))
    return venv / "bin" / "python"


@pytest.mark.e2e
@pytest.mark.skipif(not _bench_python().exists(), reason="bench venv not built")
def test_bench_client_loads_tokenizer_as_fast() -> None:
    code = (
        "import sys\n"
        "from sglang.benchmark.utils import get_tokenizer\n"
        "t = get_tokenizer(sys.argv[1])\n"
        "ids = [i for i in range(3, 1027)]\n"
        "print(t.is_fast, t.num_special_tokens_to_add(),"
        " len(t.encode(t.decode(ids), add_special_tokens=False)))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([str(_bench_python()), "-c", code, str(tokenizer_dir())],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.split() == ["True", "0", "1024"]
