"""Caption cleaning: whatever a LAION row holds becomes one clean line of UTF-8 text."""

from __future__ import annotations

import html
import re
import unicodedata

# Literal escapes left by JSON/CSV round trips in web-scraped captions ("caf\\u00e9", "a\\nb").
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|[nrtfv\\'\"])")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "\\": "\\", "'": "'", '"': '"'}
_SURROGATE = re.compile("[\ud800-\udfff]")
# Zero-width and invisible formatting characters that only add noise to a tokenizer.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"), None)
_SPACE = re.compile(r"\s+")


def _unescape_literals(text: str) -> str:
    """Turn literal backslash escapes into the characters they name."""

    def sub(m: re.Match) -> str:
        code = m.group(1)
        if code[0] in "uUx":
            return chr(int(code[1:], 16)) if int(code[1:], 16) <= 0x10FFFF else ""
        return _SIMPLE[code]

    return _ESCAPE.sub(sub, text) if "\\" in text else text


def _fix_surrogates(text: str) -> str:
    """Join surrogate pairs into their character and drop lone halves (they cannot be UTF-8)."""
    if not _SURROGATE.search(text):
        return text
    joined = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return _SURROGATE.sub("", joined.replace("\ufffd", ""))


def _drop_controls(text: str) -> str:
    """Control characters become spaces (they often separate words); invisible ones vanish."""
    text = text.translate(_INVISIBLE)
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)


def clean_caption(raw: object) -> str:
    """Clean one caption: escapes, surrogates, HTML entities, NFC, controls, whitespace."""
    if raw is None:
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    text = _fix_surrogates(_unescape_literals(text))
    text = unicodedata.normalize("NFC", html.unescape(text))
    return _SPACE.sub(" ", _drop_controls(text)).strip()


def storable(text: object) -> str | None:
    """The original caption in a form UTF-8 files can hold (lone surrogates escaped, not lost)."""
    if type(text) is str and text.isascii():  # most text: nothing to escape, no round trip
        return text
    if text is None:
        return None
    if isinstance(text, (bytes, bytearray)):
        return text.decode("utf-8", "backslashreplace")
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")
