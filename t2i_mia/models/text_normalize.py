"""dalle-mini's caption normalisation, offline and dependency-free.

:func:`normalize_text` follows the order of dalle-mini's ``TextNormalizer`` (fix text,
unescape HTML, spell out emoji, transliterate to ASCII, lower-case, ``<person>`` tokens,
wiki refs, HTML tags, URLs, thousands separators, special characters, hashtags, quotes,
punctuation to commas, repeated characters, spacing) and returns the text with one
leading space, as dalle-mini does (its BART tokenizer expects it).

Differences from dalle-mini (which needs ftfy, emoji, unidecode and a downloaded
word-frequency file):
- ftfy is replaced by a small fixer: common mojibake (UTF-8 read as cp1252/latin-1) is
  repaired, curly quotes straightened, control and zero-width characters removed, NFC.
- emoji are spelled from their Unicode names (``:grinning_face:``) instead of the emoji
  package's CLDR names, which differ for some symbols (U+2764 gives
  ``heavy_black_heart``, not ``red_heart``); skin-tone modifiers are dropped.
- unidecode is replaced by NFKD folding plus a table of common letters and symbols;
  characters with no Latin transliteration (CJK, Cyrillic, ...) are dropped, where
  unidecode would romanise them.
- hashtags lose their ``#`` but are not split into words: dalle-mini splits them with a
  Wikipedia word-frequency list that is downloaded at run time.
- ``<person>`` becomes "a person" (several in a row: "people"); dalle-mini draws one of
  "a person" / "someone" / "somebody" at random by word frequency, which would make
  captions irreproducible.

:func:`fit_token_ids` truncates token ids to ``max_text_length`` (keeping the final
end-of-text id, as the Hugging Face tokenizer's truncation does in dalle-mini's
processor) with a logged warning, and pads.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from typing import Sequence

import numpy as np

from t2i_mia.errors import DataError

log = logging.getLogger(__name__)


def _cp1252_byte_map() -> dict[str, int]:
    """Character -> byte under cp1252, with latin-1 for the 5 bytes cp1252 leaves undefined."""
    out = {}
    for b in range(256):
        try:
            out[bytes([b]).decode("cp1252")] = b
        except UnicodeDecodeError:
            out[chr(b)] = b
    return out


_BYTE = _cp1252_byte_map()
_CONT = "".join(re.escape(c) for c, b in _BYTE.items() if 0x80 <= b <= 0xBF)
# A UTF-8 sequence whose bytes were shown as cp1252/latin-1 characters ("cafÃ©").
_MOJIBAKE = re.compile(f"[\u00c2-\u00df][{_CONT}]|[\u00e0-\u00ef][{_CONT}]{{2}}"
                       f"|[\u00f0-\u00f4][{_CONT}]{{3}}")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u2032": "'", "\u00b4": "'", "\u201c": '"', "\u201d": '"',
                         "\u201e": '"', "\u201f": '"', "\u2033": '"'})
_INVISIBLE = re.compile("[\u200b\u200c\u200e\u200f\u2060\ufeff\u00ad]")

# Transliterations NFKD cannot find (unidecode's choices for the common ones).
_ASCII = {
    "ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "đ": "d",
    "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D", "ı": "i",
    "ħ": "h", "Ħ": "H", "ŋ": "ng", "Ŋ": "NG", "ſ": "s",
    "–": "-", "—": "-", "‒": "-", "―": "-", "−": "-", "‐": "-", "‑": "-", "…": "...",
    "•": "*", "·": "*", "×": "x", "÷": "/", "⁄": "/", "«": "<<", "»": ">>", "‹": "<",
    "›": ">", "¡": "!", "¿": "?", "€": "EUR", "£": "PS", "¥": "Y=", "¢": "C/", "©": "(c)",
    "®": "(r)", "™": "(tm)", "°": "deg", "§": "SS", "¶": "P", "\u00a0": " ", "\u3000": " ",
    "\u2009": " ", "\u202f": " ", "\u2002": " ", "\u2003": " ",
}

_EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2300, 0x23FF), (0x2B00, 0x2BFF))
_EMOJI_DROP = {0xFE0E, 0xFE0F, 0x200D, 0x20E3} | set(range(0x1F3FB, 0x1F400))

# Placeholders made of letters so that \w-based rules treat them as the original text
# would be treated while it is protected (dalle-mini protects the same spans the same way).
_P = "qzpq"
_DOT, _QUOTE, _SLASH = f"{_P}dot{_P}", f"{_P}quote{_P}", f"{_P}slash{_P}"


def _unmojibake(m: re.Match) -> str:
    try:
        return bytes(_BYTE[c] for c in m.group(0)).decode("utf-8")
    except UnicodeDecodeError:
        return m.group(0)


def fix_text(t: str) -> str:
    """ftfy-like repairs that need no data files (see module docstring)."""
    t = _MOJIBAKE.sub(_unmojibake, t)
    t = _INVISIBLE.sub("", t)
    t = "".join(ch for ch in t if ch in "\t\n" or unicodedata.category(ch) != "Cc")
    return unicodedata.normalize("NFC", t.translate(_QUOTES))


def demojize(t: str) -> str:
    """Pictographic emoji -> ``:unicode_name:``."""
    out = []
    for ch in t:
        cp = ord(ch)
        if cp in _EMOJI_DROP:
            continue
        if any(lo <= cp <= hi for lo, hi in _EMOJI_RANGES) and unicodedata.category(ch) == "So":
            out.append(":" + unicodedata.name(ch, "emoji").lower().replace(" ", "_") + ":")
        else:
            out.append(ch)
    return "".join(out)


def to_ascii(t: str) -> str:
    """unidecode-like: accents stripped, common letters/symbols transliterated, the rest
    dropped."""
    out = []
    for ch in t:
        if ord(ch) < 128:
            out.append(ch)
        elif ch in _ASCII:
            out.append(_ASCII[ch])
        else:
            folded = unicodedata.normalize("NFKD", ch)
            out.append("".join(_ASCII.get(c, c) for c in folded
                               if ord(c) < 128 or c in _ASCII))
    return "".join(out)


def _persons(t: str) -> str:
    t = re.sub(r"<person>([,\s]*(and)*[,\s]*<person>)+", " people ", t)
    return t.replace("<person>", " a person ")


def normalize_text(text: str) -> str:
    """dalle-mini's caption normalisation (offline variant); returns ``" " + text``."""
    if not isinstance(text, str):
        raise DataError(f"caption: expected a string, got {type(text).__name__}")
    t = fix_text(text)
    t = html.unescape(html.unescape(t))
    t = to_ascii(demojize(t)).lower()
    t = _persons(t)
    t = re.sub(r"\[\d+\]\s*\Z", "", re.sub(r"\A\s*\[\d+\]", "", t))  # wiki references
    t = re.sub(r"<[^<]+?>", " ", t)  # html tags
    t = re.sub(r"http\S+", "", t)  # urls
    for _ in range(2):  # 1,000,000 -> 1000000
        t = re.sub(r"(\d),(\d{3})", r"\1\2", t)
    # protect decimal points, contractions and dates from the punctuation rules
    t = re.sub(r"(\w)\.(\w)", rf"\1{_DOT}\2", t)
    t = re.sub(r"'(?=([stdm]|(ll)|(re)|(ve))\b)", _QUOTE, t)
    t = re.sub(r"(\d)/(\d)", rf"\1{_SLASH}\2", t)
    t = re.sub(r"(\w)-(\w)", r"\1 \2", t)  # hyphenated words
    t = re.sub(r"([%&\/$*])", r" \1 ", t)
    t = re.sub(r"#(\w+)", r"\1", t)  # hashtags (not split into words; see docstring)
    t = re.sub(r"[_#\\]", " ", t)
    t = re.sub(r"""['"`]""", ' " ', t)
    t = re.sub(r"[()[\].,|:;?!=+~\-/{}]", ",", t)
    t = t.replace(_DOT, ".").replace(_QUOTE, "'").replace(_SLASH, "/")
    t = re.sub(r"(\D)(\1{3,})", r"\1", t)  # 4+ repeats (3 kept for roman numerals)
    t = re.sub(r'(\s*"+\s*)+', ' " ', t)
    t = re.sub(r"(\s*,+\s*)+", ", ", t)
    t = re.sub(r"\s+", " ", t).strip()
    if t.endswith(","):
        t = t[:-1]
    if t.startswith(","):
        t = t[1:]
    return " " + t.strip()


def fit_token_ids(ids: Sequence[int], max_text_length: int, *, eos_token_id: int,
                  pad_token_id: int, where: str = "caption") -> tuple[np.ndarray, np.ndarray]:
    """Token ids (with their begin/end ids) -> (ids int32[max_text_length], mask int32[...]).

    Longer sequences are cut to ``max_text_length`` with the last id set to
    ``eos_token_id`` (what dalle-mini's tokenizer truncation yields) and a warning is
    logged naming ``where``; shorter ones are padded with ``pad_token_id`` (mask 0).
    """
    ids = [int(i) for i in ids]
    if max_text_length < 2:
        raise DataError(f"{where}: max_text_length = {max_text_length}, expected >= 2")
    if len(ids) > max_text_length:
        log.warning("%s: %d text tokens, truncated to max_text_length = %d", where, len(ids),
                    max_text_length)
        ids = ids[:max_text_length - 1] + [eos_token_id]
    n = len(ids)
    out = np.full((max_text_length,), pad_token_id, np.int32)
    out[:n] = ids
    mask = np.zeros((max_text_length,), np.int32)
    mask[:n] = 1
    return out, mask
