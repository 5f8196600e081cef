"""Text repair: any metadata value or LLM answer -> clean UTF-8 text, cut to a length at a word boundary."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import numpy as np

_MOJIBAKE = re.compile(r"[ÃÂâ][\x80-\xbf€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ¡-¿]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd\ufeff]")


def clean_text(value: Any) -> str:
    """Any metadata value -> clean UTF-8 text: bytes decoded, mojibake repaired, invalid bytes, lone
    surrogates and control characters dropped, Unicode NFC, whitespace collapsed."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, bytes):
        try:
            s = value.decode("utf-8")
        except UnicodeDecodeError:
            s = value.decode("cp1252", errors="replace")
    else:
        s = str(value)
    # lone surrogates (from surrogateescape decoding) cannot be sent as UTF-8: turn them into U+FFFD
    s = s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if _MOJIBAKE.search(s):  # UTF-8 bytes that were decoded as Latin-1 / cp1252: undo once if it round-trips
        for enc in ("cp1252", "latin-1"):
            try:
                s = s.encode(enc).decode("utf-8")
                break
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
    s = unicodedata.normalize("NFC", s)
    s = _CONTROL.sub(" ", s)
    return " ".join(s.split())


def cut_text(text: str, max_chars: int) -> str:
    """`text` if it fits `max_chars`, else cut at the last word boundary in its second half and marked '…'."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    if " " in cut[max_chars // 2:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "…"


def shingles(text: str, n: int = 6) -> frozenset[str]:
    """Every run of n words (lower case): an answer sharing one with the prompt's instructions echoes them."""
    w = re.findall(r"\w+", text.lower())
    return frozenset(" ".join(w[i: i + n]) for i in range(len(w) - n + 1))
