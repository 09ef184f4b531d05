"""CLIP's byte-level BPE tokenizer (Radford et al., 2021; OpenAI's simple_tokenizer) on Hugging Face `tokenizers`
(Rust, imported in milliseconds), so that loading a published checkpoint does not import transformers.

It gives the ids and attention masks of transformers' `CLIPTokenizer` (tests/test_clip_native.py checks them on
many strings): the same pipeline built from the same files.
- files: tokenizer/vocab.json + merges.txt (the published layout), else the BPE model inside tokenizer.json;
  tokenizer_config.json and special_tokens_map.json for the special tokens, `model_max_length` and the padding
  side;
- normalisation: Unicode NFC, every run of whitespace -> one space, lowercase;
- pre-tokenisation: CLIP's regex (the two special tokens, English contractions, runs of letters, single digits,
  runs of other non-space characters), whitespace dropped, then bytes mapped to GPT-2's printable characters;
- BPE with `</w>` closing each word; `<|startoftext|>` ... `<|endoftext|>` around every prompt; truncation keeps
  both; padding with the checkpoint's pad token (`<|endoftext|>` for CLIP-L, `!` for some OpenCLIP towers).
Like transformers, every special token of the config (the pad token too) is matched whole in the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
UNLIMITED = int(1e30)  # transformers' model_max_length when the config gives none
SPECIALS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}  # transformers' defaults
TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class Encoding(dict):
    """{"input_ids", "attention_mask"}, readable as attributes too (as transformers' BatchEncoding, which code
    written for diffusers reads as `.input_ids`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CLIPTokenizer:
    """Prompts -> token ids and attention masks, called as transformers' tokenizers are.

    Args:
        vocab: token -> id (vocab.json).
        merges: BPE merges in rank order, as pairs (merges.txt).
        special_tokens: {"bos_token", "eos_token", "unk_token", "pad_token"} -> the token, a string or a
            transformers `AddedToken` dict ({"content": ..., "normalized": ..., ...}); pad may be None.
        model_max_length: the longest sequence, special tokens included (`padding="max_length"`'s length).
        added_tokens: other tokens matched whole, as tokenizer.json lists them ({"content", "id", flags}).
        padding_side: "right" or "left".
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: dict | None = None,
                 model_max_length: int = UNLIMITED, added_tokens: list[dict] = (), padding_side: str = "right"):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.vocab, self.merges = dict(vocab), [tuple(m) for m in merges]
        self.specials = {k: _token_spec(v) for k, v in {**SPECIALS, **(special_tokens or {})}.items()}
        self.model_max_length, self.padding_side = model_max_length, padding_side
        tok = Tokenizer(BPE(vocab=self.vocab, merges=self.merges, continuing_subword_prefix="",
                            end_of_word_suffix=SUFFIX, fuse_unk=False, unk_token=self.specials["unk_token"]["content"]))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),  # keep the matches, drop the rest
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        listed = {t["content"] for t in added_tokens}
        extra = [s for s in self.specials.values() if s is not None and s["content"] not in listed]
        self.added_tokens = [_token_spec(t) | {"id": t.get("id")}
                             for t in sorted(added_tokens, key=lambda t: t.get("id") or 0)]
        for spec in self.added_tokens + extra:
            added = _added_token(spec)
            (tok.add_special_tokens if spec["special"] else tok.add_tokens)([added])
        self._tokenizer = tok

    # ------------------------------------------------------------------------------------------------------
    # Ids of the special tokens
    # ------------------------------------------------------------------------------------------------------

    def _special(self, key: str) -> str | None:
        spec = self.specials[key]
        return None if spec is None else spec["content"]

    def _special_id(self, key: str) -> int | None:
        token = self._special(key)
        return None if token is None else self._tokenizer.token_to_id(token)

    bos_token = property(lambda self: self._special("bos_token"))
    eos_token = property(lambda self: self._special("eos_token"))
    unk_token = property(lambda self: self._special("unk_token"))
    pad_token = property(lambda self: self._special("pad_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------------------------------------------------
    # Tokenizing
    # ------------------------------------------------------------------------------------------------------

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 add_special_tokens: bool = True) -> Encoding:
        """{"input_ids", "attention_mask"} as transformers gives them: lists (one list for a single string), or
        (B, S) int64 tensors with `return_tensors="pt"`.

        Args:
            text: a prompt or a list of prompts.
            padding: False, True / "longest" (to the longest of the batch) or "max_length".
            truncation: cut to `max_length` (default `model_max_length`), keeping the end token.
            max_length: the length that truncation and `padding="max_length"` use.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        limit = self.model_max_length if max_length is None else max_length
        rows = [self._tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        if add_special_tokens:
            if truncation and limit < 2:
                raise ValueError(f"max_length {limit} leaves no room for the start and end tokens")
            keep = limit - 2 if truncation else None
            rows = [[self.bos_token_id, *r[:keep], self.eos_token_id] for r in rows]
        elif truncation:
            rows = [r[:limit] for r in rows]
        masks = [[1] * len(r) for r in rows]
        width = limit if padding == "max_length" else max(map(len, rows)) if padding in (True, "longest") else 0
        if any(len(r) < width for r in rows):
            pad = self.pad_token_id
            if pad is None:
                raise ValueError("this tokenizer has no pad token; it cannot pad")
            fill = [(width - len(r)) for r in rows]
            if self.padding_side == "right":
                rows = [r + [pad] * n for r, n in zip(rows, fill)]
                masks = [m + [0] * n for m, n in zip(masks, fill)]
            else:
                rows = [[pad] * n + r for r, n in zip(rows, fill)]
                masks = [[0] * n + m for m, n in zip(masks, fill)]
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in rows}) > 1:
                raise ValueError("prompts of different lengths make no tensor: pass padding=True or "
                                 "padding='max_length'")
            return Encoding(input_ids=torch.tensor(rows, dtype=torch.long),
                            attention_mask=torch.tensor(masks, dtype=torch.long))
        if single:
            return Encoding(input_ids=rows[0], attention_mask=masks[0])
        return Encoding(input_ids=rows, attention_mask=masks)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Token ids -> text (words separated by single spaces, lowercase: CLIP keeps no more)."""
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace(SUFFIX, " ").strip()

    # ------------------------------------------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPTokenizer":
        """Read a tokenizer/ folder: vocab.json + merges.txt, or tokenizer.json (a BPE model), with
        tokenizer_config.json and special_tokens_map.json when present.

        Raises:
            CheckpointError (a ValueError): one line naming the file that is missing or wrong.
        """
        from ..loading import CheckpointError, read_json

        folder = Path(folder)
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        special_map = (read_json(folder / "special_tokens_map.json")
                       if (folder / "special_tokens_map.json").is_file() else {})
        vocab_file, merges_file, full = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        if vocab_file.is_file() or merges_file.is_file() or not full.is_file():
            for path in (vocab_file, merges_file):
                if not path.is_file():
                    raise CheckpointError(f"missing file {path} (a CLIP tokenizer needs vocab.json and merges.txt, "
                                          f"or tokenizer.json)")
            vocab, merges = _read_vocab(vocab_file), _read_merges(merges_file)
            added = [{"id": int(i), **t} for i, t in config.get("added_tokens_decoder", {}).items()
                     if isinstance(t, dict) and "content" in t and str(i).isdigit()]
            source = vocab_file
        else:
            vocab, merges, added = _read_tokenizer_json(full)
            source = full
        specials = {k: special_map.get(k, config.get(k, SPECIALS[k])) for k in SPECIALS}
        length = config.get("model_max_length", UNLIMITED)
        if isinstance(length, float) and length.is_integer():
            length = int(length)
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise CheckpointError(f"{folder / 'tokenizer_config.json'}: model_max_length must be an integer of at "
                                  f"least 2, got {length!r}")
        if config.get("truncation_side", "right") != "right":
            raise CheckpointError(f"{folder / 'tokenizer_config.json'}: truncation_side "
                                  f"{config['truncation_side']!r} is not supported (only 'right')")
        try:
            tokenizer = cls(vocab, merges, specials, length, added, config.get("padding_side", "right"))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise CheckpointError(f"{source}: cannot build a CLIP tokenizer: {e}") from e
        for spec in tokenizer.added_tokens:
            if spec["id"] is not None and tokenizer._tokenizer.token_to_id(spec["content"]) != spec["id"]:
                raise CheckpointError(f"{source}: added token {spec['content']!r} is listed as id {spec['id']} but "
                                      f"the vocabulary gives it {tokenizer._tokenizer.token_to_id(spec['content'])}")
        for key in SPECIALS:
            if tokenizer._special(key) is not None and tokenizer._special_id(key) is None:
                raise CheckpointError(f"{source}: {key} {tokenizer._special(key)!r} has no id")
        return tokenizer

    def save_pretrained(self, folder: str | Path) -> None:
        """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (the published layout, which
        transformers' CLIPTokenizer reads)."""
        from ..loading import atomic_write, write_json

        folder = Path(folder)
        vocab = json.dumps(self.vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write(folder / "vocab.json", lambda tmp: tmp.write_text(vocab, encoding="utf-8"))
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        atomic_write(folder / "merges.txt", lambda tmp: tmp.write_text(merges, encoding="utf-8"))
        specials = {k: (None if v is None else v["content"] if v == _token_spec(v["content"]) else v)
                    for k, v in self.specials.items()}
        decoder = {str(self._tokenizer.token_to_id(s["content"])): {k: s[k] for k in ("content", *TOKEN_FLAGS)}
                   for s in self.added_tokens + [v for v in self.specials.values() if v is not None]}
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", **specials, "model_max_length": self.model_max_length,
            "padding_side": self.padding_side, "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
            "added_tokens_decoder": decoder})
        write_json(folder / "special_tokens_map.json", specials)


def _token_spec(token) -> dict | None:
    """A special token as transformers writes it (a string, or an AddedToken dict) -> its content and flags."""
    if token is None:
        return None
    if isinstance(token, str):
        token = {"content": token}
    if not isinstance(token, dict) or not isinstance(token.get("content"), str) or not token["content"]:
        raise ValueError(f"a special token must be a non-empty string or a dict with one, got {token!r}")
    special = token.get("special", True)
    return {"content": token["content"], "single_word": bool(token.get("single_word", False)),
            "lstrip": bool(token.get("lstrip", False)), "rstrip": bool(token.get("rstrip", False)),
            "normalized": bool(token.get("normalized", not special)), "special": bool(special)}


def _added_token(spec: dict):
    from tokenizers import AddedToken

    return AddedToken(spec["content"], **{k: spec[k] for k in TOKEN_FLAGS})


def _read_vocab(path: Path) -> dict[str, int]:
    from ..loading import CheckpointError

    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt JSON in {path}: {e}") from e
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              and v >= 0 for k, v in vocab.items()):
        raise CheckpointError(f"{path} must map tokens to non-negative integer ids")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    from ..loading import CheckpointError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e}") from e
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{path}: merge {bad + 1} ({' '.join(merges[bad])!r}) is not two tokens separated by "
                              f"one space")
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """The BPE vocabulary, merges and added tokens of a tokenizer.json."""
    from ..loading import CheckpointError, read_json

    data = read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model is not a BPE model with a vocab (type {model.get('type')!r})")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{path}: every merge must be two tokens")
    added = [t for t in data.get("added_tokens") or [] if isinstance(t, dict) and "content" in t
             and isinstance(t.get("id"), int)]
    return model["vocab"], merges, added
