"""Text tokenisation for the text encoders (CLIP text tower, DalleBart encoder).

:class:`TextTokenizer` wraps a ``tokenizers.Tokenizer`` and always produces fixed-length
rows ``bos, tokens..., eos, pad...`` with a 0/1 attention mask.  It is built either by
training a byte-level BPE on captions (:meth:`TextTokenizer.train`) or from a checkpoint's
tokenizer files (:meth:`TextTokenizer.from_folder`):

- ``tokenizer.json`` (+ optional ``tokenizer_config.json`` / ``special_tokens_map.json``);
- ``vocab.json`` + ``merges.txt`` in CLIP style (Stable Diffusion's ``tokenizer/``: words
  end in ``</w>``, text lower-cased, ``<|startoftext|>``/``<|endoftext|>``) or in BART style
  (dalle-mini: GPT-2 byte-level BPE, ``<s>``/``</s>``/``<pad>``, case kept).

Tokenizers trained here give the end-of-text token the highest id, which the CLIP text
tower's argmax pooling relies on; so does the CLIP vocabulary.  The BART vocabulary does
not (its ``</s>`` is id 2): use it for DalleBart only (see :attr:`eos_is_highest_id`).

Special-token strings inside a caption are encoded as plain text, never as special ids.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from t2i_mia.errors import CheckpointError, ConfigError, DataError
from t2i_mia.models import formats

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"

# The pre-tokenisation pattern of OpenAI's CLIP tokenizer (as transformers' fast converter).
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
_BART_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# transformers writes a huge model_max_length (int(1e30)) when a tokenizer sets none.
_UNSET_MAX_LENGTH = 10**6


def _token_str(v: Any) -> Any:
    # tokenizer_config.json stores special tokens as a string or an AddedToken dict.
    if isinstance(v, dict):
        return v.get("content")
    return v


def _check_captions(captions: Any, where: str) -> list[str]:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise DataError(f"{where}: expected a list of str, got {type(captions).__name__}")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise DataError(f"{where}: caption {i} is {type(c).__name__} ({c!r}), expected str")
    return list(captions)


class TextTokenizer:
    """Fixed-length text encoding with bos/eos/pad around a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str, eos_token: str, pad_token: str,
                 max_length: int, where: str = "tokenizer"):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ConfigError(f"{where}: max_length = {max_length!r}; need an int >= 2 "
                              "(room for bos and eos)")
        ids = {}
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token),
                          ("pad_token", pad_token)):
            i = tokenizer.token_to_id(tok) if isinstance(tok, str) else None
            if i is None:
                raise CheckpointError(f"{where}: {name} {tok!r} is not in the vocabulary")
            ids[name] = i
        self._tok = tokenizer
        # Our rows are assembled by hand (bos/eos/pad/truncation), identically for every
        # source; the wrapped tokenizer only splits text.
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = True
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self._bos, self._eos, self._pad = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self._max_length = max_length

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, captions: Sequence[str], vocab_size: int, max_length: int) -> "TextTokenizer":
        """Trains a byte-level BPE on ``captions`` (lower-cased, whitespace collapsed).

        Deterministic: the same captions give the same vocabulary and merges in every
        process (the ``tokenizers`` BPE trainer breaks count ties by token ids, which
        follow the sorted byte alphabet).  ``vocab_size`` is an upper bound (>= 259: 256
        bytes + 3 specials); a small corpus may run out of merges first.  Ids: bos
        ``<|startoftext|>`` = 0, pad ``<|pad|>`` = 1, eos ``<|endoftext|>`` = the highest.
        """
        captions = _check_captions(captions, "TextTokenizer.train")
        if not captions:
            raise DataError("TextTokenizer.train: no captions")
        if not isinstance(vocab_size, int) or vocab_size < 259:
            raise ConfigError(f"TextTokenizer.train: vocab_size = {vocab_size!r}; need an int "
                              ">= 259 (256 bytes + bos, pad, eos)")
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([
            normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
            normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1, special_tokens=[BOS, PAD], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(captions, trainer)
        # Added after training, eos takes the next free id: the highest.
        tok.add_special_tokens([EOS])
        return cls(tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, max_length=max_length,
                   where="TextTokenizer.train")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike,
                    max_length: int | None = None) -> "TextTokenizer":
        """Loads a checkpoint's tokenizer folder (see the module docstring for formats).

        Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json``
        when present, else from the vocabulary's style (CLIP or BART).  ``max_length``
        overrides the files' ``model_max_length``; one of them must be given.
        """
        folder = os.fspath(folder)
        conf: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                conf.update(formats.read_json(path))
        tj = os.path.join(folder, "tokenizer.json")
        vj, mt = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if os.path.isfile(tj):
            try:
                tok = Tokenizer.from_file(tj)
            except Exception as e:  # the Rust side raises a bare Exception
                raise CheckpointError(f"{tj}: not a tokenizers JSON file ({e})") from e
            where = tj
        elif os.path.isfile(vj) and os.path.isfile(mt):
            tok = _from_vocab_merges(vj, mt)
            where = vj
        else:
            raise CheckpointError(f"{folder}: no tokenizer files (expected tokenizer.json, or "
                                  "vocab.json + merges.txt)")
        vocab = tok.get_vocab(with_added_tokens=True)
        style = (_CLIP_SPECIALS if BOS in vocab else
                 _BART_SPECIALS if "<s>" in vocab and "</s>" in vocab else {})
        specials = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = _token_str(conf.get(key)) or style.get(key)
            if value is None:
                raise CheckpointError(f"{where}: no {key} in tokenizer_config.json and the "
                                      "vocabulary is neither CLIP- nor BART-style")
            specials[key] = value
        if max_length is None:
            m = conf.get("model_max_length")
            if isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < _UNSET_MAX_LENGTH:
                max_length = int(m)
            else:
                raise CheckpointError(f"{folder}: tokenizer_config.json has no usable "
                                      f"model_max_length ({m!r}); pass max_length")
        return cls(tok, max_length=max_length, where=where, **specials)

    def save(self, folder: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (model_max_length and the
        special tokens), loadable by :meth:`from_folder` and transformers'
        PreTrainedTokenizerFast."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "tokenizer.json")
        self._tok.save(path + ".tmp")
        os.replace(path + ".tmp", path)
        formats.write_json(os.path.join(folder, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self._max_length, **self._tokens})

    # ------------------------------------------------------------------ use

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions -> (ids int32[N, max_length], mask int32[N, max_length]).

        Each row is ``bos, tokens, eos`` then ``pad`` (mask 1 on bos..eos, 0 on padding).
        A caption longer than max_length - 2 tokens is cut to its first max_length - 2
        tokens and still ends in eos.  The empty string gives ``bos, eos`` (the
        unconditional caption for classifier-free guidance).
        """
        captions = _check_captions(captions, "TextTokenizer.encode")
        n, length = len(captions), self._max_length
        ids = np.full((n, length), self._pad, np.int32)
        mask = np.zeros((n, length), np.int32)
        for i, enc in enumerate(self._tok.encode_batch(captions, add_special_tokens=False)):
            body = enc.ids[:length - 2]
            row = [self._bos, *body, self._eos]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids (one row, padding allowed) -> text, special tokens dropped."""
        specials = {self._bos, self._eos, self._pad}
        return self._tok.decode([int(i) for i in ids if int(i) not in specials],
                                skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (a model's vocab_size must be >= this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eos_is_highest_id(self) -> bool:
        """True when eos has the highest id (required by CLIP's argmax pooling)."""
        return self._eos == max(self._tok.get_vocab(with_added_tokens=True).values())


def _from_vocab_merges(vocab_path: str, merges_path: str) -> Tokenizer:
    """Builds a tokenizer from vocab.json + merges.txt, CLIP or BART style."""
    try:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{vocab_path}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(vocab, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise CheckpointError(f"{vocab_path}: expected an object token -> integer id")
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise CheckpointError(f"{merges_path}:{lineno}: expected two tokens separated "
                                      f"by one space, got {line!r}")
            merges.append((parts[0], parts[1]))
    if BOS in vocab and EOS in vocab:
        # OpenAI CLIP: lower-cased, CLIP's word split, words end in "</w>", unknown -> eos.
        try:
            bpe = models.BPE(vocab, merges, continuing_subword_prefix="",
                             end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS)
        except Exception as e:
            raise CheckpointError(f"{merges_path}: merges do not match {vocab_path} ({e})") from e
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([
            normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        # Bytes back to text first, then each word's "</w>" becomes a space.
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " "),
                                         decoders.Strip(" ", 0, 1)])
        tok.add_special_tokens([BOS, EOS])
    elif "<s>" in vocab and "</s>" in vocab:
        # BART / GPT-2 byte-level BPE (dalle-mini ships this); case is kept.
        try:
            bpe = models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                             fuse_unk=False, unk_token="<unk>" if "<unk>" in vocab else None)
        except Exception as e:
            raise CheckpointError(f"{merges_path}: merges do not match {vocab_path} ({e})") from e
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([t for t in ("<s>", "</s>", "<pad>", "<unk>", "<mask>")
                                if t in vocab])
    else:
        raise CheckpointError(f"{vocab_path}: neither CLIP-style ({BOS}, {EOS}) nor "
                              "BART-style (<s>, </s>) special tokens found")
    return tok
