"""TextTokenizer: trained byte-level BPE, checkpoint tokenizer files, fixed-length encoding."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from t2i_mia.errors import CheckpointError, ConfigError, DataError
from t2i_mia.models.tokenizer import BOS, EOS, TextTokenizer

CAPTIONS = [f"A {c} {s} on the {p}" for c in ("red", "green", "blue", "yellow")
            for s in ("square", "circle") for p in ("left", "right", "table")]
CAPTIONS += ["Two dogs   play in the park's grass!", "café au lait, 123 apples"]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CAPTIONS, vocab_size=320, max_length=10)


def test_training_is_deterministic_across_processes(tok):
    again = TextTokenizer.train(CAPTIONS, vocab_size=320, max_length=10)
    assert again._tok.to_str() == tok._tok.to_str()
    # A fresh interpreter (other hash seeds, other thread scheduling) gives the same vocab.
    script = textwrap.dedent(f"""
        from t2i_mia.models.tokenizer import TextTokenizer
        t = TextTokenizer.train({CAPTIONS!r}, vocab_size=320, max_length=10)
        print(t._tok.to_str())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == json.loads(tok._tok.to_str())


def test_special_ids_and_eos_highest(tok):
    assert (tok.bos_id, tok.pad_id) == (0, 1)
    assert tok.eos_id == tok.vocab_size - 1
    assert tok.eos_is_highest_id
    assert 259 <= tok.vocab_size <= 320
    assert tok.max_length == 10


def test_encode_layout_and_lower_case(tok):
    ids, mask = tok.encode(["a red square", "A  RED Square"])
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 10)
    np.testing.assert_array_equal(ids[0], ids[1])
    n = int(mask[0].sum())
    assert ids[0, 0] == tok.bos_id and ids[0, n - 1] == tok.eos_id
    assert (ids[0, n:] == tok.pad_id).all() and (mask[0, :n] == 1).all()
    assert (mask[0, n:] == 0).all()
    assert tok.decode(ids[0]) == "a red square"
    # eos is the maximum of every row: CLIP's argmax pooling finds it.
    assert (np.argmax(ids, axis=1) == mask.sum(1) - 1).all()


def test_truncation_keeps_eos(tok):
    long = " ".join(["yellow circle on the table"] * 5)
    ids, mask = tok.encode([long])
    assert mask.sum() == 10
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    full = tok._tok.encode(long, add_special_tokens=False).ids
    np.testing.assert_array_equal(ids[0, 1:-1], full[:8])


def test_empty_caption_is_bos_eos(tok):
    ids, mask = tok.encode([""])
    np.testing.assert_array_equal(ids[0], [tok.bos_id, tok.eos_id] + [tok.pad_id] * 8)
    np.testing.assert_array_equal(mask[0], [1, 1] + [0] * 8)


def test_special_token_text_is_not_a_special_id(tok):
    ids, mask = tok.encode([f"red {EOS} blue"])
    body = ids[0, 1:int(mask[0].sum()) - 1]
    assert tok.eos_id not in body and tok.bos_id not in body


def test_bad_inputs(tok):
    with pytest.raises(DataError, match="caption 1 is int"):
        tok.encode(["ok", 3])
    with pytest.raises(DataError, match="list of str"):
        tok.encode("a single string")
    with pytest.raises(DataError, match="caption 0"):
        TextTokenizer.train([None], 300, 8)
    with pytest.raises(ConfigError, match="vocab_size"):
        TextTokenizer.train(CAPTIONS, 100, 8)
    with pytest.raises(ConfigError, match="max_length"):
        TextTokenizer.train(CAPTIONS, 300, 1)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert conf["model_max_length"] == 10 and conf["eos_token"] == EOS
    loaded = TextTokenizer.from_folder(tmp_path)
    for a, b in zip(loaded.encode(CAPTIONS + [""]), tok.encode(CAPTIONS + [""])):
        np.testing.assert_array_equal(a, b)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size, loaded.max_length) \
        == (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.max_length)
    assert TextTokenizer.from_folder(tmp_path, max_length=6).encode(["red"])[0].shape == (1, 6)


def _write_vocab(folder, vocab, merges, config=None):
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_clip_style_vocab_merges(tmp_path):
    # OpenAI CLIP layout: words end in "</w>", lower-cased, specials last, pad = eos.
    vocab = {"a": 0, "b": 1, "c": 2, "a</w>": 3, "b</w>": 4, "c</w>": 5, "ab": 6, "ab</w>": 7,
             BOS: 8, EOS: 9}
    folder = _write_vocab(tmp_path / "clip", vocab, ["a b", "a b</w>"],
                          {"model_max_length": 8, "pad_token": {"content": EOS}})
    t = TextTokenizer.from_folder(folder)
    ids, mask = t.encode(["AB  c abc"])
    # "ab" -> ab</w>; "c" -> c</w>; "abc" -> ab + c</w>
    np.testing.assert_array_equal(ids[0], [8, 7, 5, 6, 5, 9, 9, 9])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 1, 0, 0])
    assert t.eos_is_highest_id and t.pad_id == t.eos_id == 9
    assert t.decode(ids[0]) == "ab c abc"


def test_bart_style_vocab_merges(tmp_path):
    # GPT-2/BART byte-level layout as dalle-mini ships: "Ġ" marks a leading space.
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "c": 6, "Ġ": 7,
             "ab": 8, "Ġc": 9, "A": 10}
    folder = _write_vocab(tmp_path / "bart", vocab, ["a b", "Ġ c"])
    t = TextTokenizer.from_folder(folder, max_length=7)
    ids, mask = t.encode(["ab c", "abc A"])
    np.testing.assert_array_equal(ids, [[0, 8, 9, 2, 1, 1, 1], [0, 8, 6, 7, 10, 2, 1]])
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 1, 1, 0])
    assert not t.eos_is_highest_id  # fine for DalleBart; CLIP pooling would need it


def test_unusable_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        TextTokenizer.from_folder(tmp_path)
    folder = _write_vocab(tmp_path / "nolen", {"a": 0, BOS: 1, EOS: 2}, [])
    with pytest.raises(CheckpointError, match="model_max_length"):
        TextTokenizer.from_folder(folder)
    folder = _write_vocab(tmp_path / "plain", {"a": 0, "b": 1}, [])
    with pytest.raises(CheckpointError, match="neither CLIP-style"):
        TextTokenizer.from_folder(folder, max_length=8)
    folder = _write_vocab(tmp_path / "badmerge", {"a": 0, BOS: 1, EOS: 2}, ["a b c"])
    with pytest.raises(CheckpointError, match=r"merges.txt:2"):
        TextTokenizer.from_folder(folder, max_length=8)
