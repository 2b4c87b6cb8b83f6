"""Character tokenizer: exact round trip, special ids, identical ids through transformers."""

from __future__ import annotations

from transformers import AutoTokenizer

from copd_mega.data.synthetic import CAPABILITIES, make_samples
from copd_mega.data.tokenizer import (
    build_tokenizer,
    load_tokenizer,
    save_hf_tokenizer_files,
    save_tokenizer,
    special_ids,
)

TEXTS = [
    "Q: 37+48=?\nA: 85",
    "  two  spaces, (parens) {braces} a\\b c*d e-f g:h i.j k?l UPPER lower 0123456789 ~`!@#$%^&|<>[];'\"",
    "",
]


def _all_texts() -> list[str]:
    texts = list(TEXTS)
    for cap in CAPABILITIES:
        for s in make_samples(cap, "train", 0, 3):
            texts += [s["prompt"], " " + s["answer"]]
    return texts


def test_round_trip_is_exact_and_vocab_small():
    tok = build_tokenizer()
    assert tok.get_vocab_size() < 128
    unk = special_ids(tok)["unk"]
    for text in _all_texts():
        ids = tok.encode(text).ids
        assert len(ids) == len(text) and unk not in ids
        assert tok.decode(ids) == text


def test_special_tokens():
    tok = build_tokenizer()
    ids = special_ids(tok)
    assert ids["pad"] == 0 and len(set(ids.values())) == 5
    encoded = tok.encode("<image>\nQ: 1+1=?").ids
    assert encoded[0] == ids["image"] and len(encoded) == 1 + len("\nQ: 1+1=?")
    assert tok.decode(encoded, skip_special_tokens=False) == "<image>\nQ: 1+1=?"
    assert tok.encode("é").ids == [ids["unk"]]


def test_save_load_and_hf_autotokenizer_give_identical_ids(tmp_path):
    path = save_tokenizer(build_tokenizer(), tmp_path / "tok" / "tokenizer.json")
    tok = load_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(str(save_hf_tokenizer_files(path, tmp_path / "hf")))
    ids = special_ids(tok)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (
        ids["pad"],
        ids["bos"],
        ids["eos"],
    )
    assert hf.convert_tokens_to_ids("<image>") == ids["image"]
    for text in [*_all_texts(), "<image> what?"]:
        expected = tok.encode(text).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == expected
        assert hf.decode(expected, skip_special_tokens=True) == tok.decode(expected)
