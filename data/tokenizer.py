"""Character-level tokenizer for the synthetic tasks, built with Hugging Face `tokenizers`.

One token per character: every printable ASCII character (space to `~`) plus newline, so the
prompts and answers of every built-in capability encode without `<unk>`. Special tokens come
first: `<pad>` = 0, `<bos>`, `<eos>`, `<unk>`, `<image>` (the slot a vision model fills with
image embeddings). The vocabulary has 101 entries.

`encode` adds no special tokens: callers put `<bos>`/`<eos>` where their sequence layout wants
them. Decoding fuses the character tokens back together, so `decode(encode(s).ids) == s` for any
string made of vocabulary characters (special tokens are dropped by `decode` unless
`skip_special_tokens=False`).
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)
CHARACTERS: tuple[str, ...] = tuple(chr(c) for c in range(32, 127)) + ("\n",)


def build_tokenizer() -> Tokenizer:
    """Build the character tokenizer.

    Returns:
        A `tokenizers.Tokenizer` with a WordLevel model over single characters (ids:
        special tokens 0..4 in `SPECIAL_TOKENS` order, then `CHARACTERS`), a pre-tokenizer
        that isolates every character (newlines included) and a `Fuse` decoder.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # `[\s\S]` rather than `.`: the Oniguruma `.` does not match a newline.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write `tok` as a `tokenizer.json` file.

    Returns:
        The path written. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer written by `save_tokenizer`.

    Returns:
        The `tokenizers.Tokenizer`. Raises FileNotFoundError naming the path when it is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found; write one with "
            "`copd data synth --capability text --tokenizer PATH ...`"
        )
    return Tokenizer.from_file(str(path))


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens.

    Returns:
        `{"pad": int, "bos": int, "eos": int, "unk": int, "image": int}`. Raises ValueError
        when `tok` lacks one of them (it was not built by `build_tokenizer`).
    """
    out = {}
    for name, token in zip(("pad", "bos", "eos", "unk", "image"), SPECIAL_TOKENS, strict=True):
        tid = tok.token_to_id(token)
        if tid is None:
            raise ValueError(
                f"tokenizer has no {token} token; build it with copd_mega.data.tokenizer.build_tokenizer()"
            )
        out[name] = tid
    return out


def save_hf_tokenizer_files(tok_json_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write files that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads.

    The tokenizer is wrapped in `PreTrainedTokenizerFast` with bos/eos/pad/unk set, `<image>`
    as an additional special token and `clean_up_tokenization_spaces=False` (otherwise
    transformers would delete the space before punctuation when decoding).

    Returns:
        `out_dir` (holding tokenizer.json and tokenizer_config.json).
    """
    from transformers import PreTrainedTokenizerFast

    tok_json_path = Path(tok_json_path)
    if not tok_json_path.is_file():
        raise FileNotFoundError(f"tokenizer file {tok_json_path} not found")
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_json_path),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IMAGE],
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return out_dir
