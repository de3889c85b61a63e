"""Names from files, made safe to print: :func:`printable`.

A model, tensor, class or file name comes from a file that anyone may have written; printed raw,
``ESC ] 0 ; title BEL`` retitles the terminal, ``ESC [ 2 J`` clears it and a carriage return
overwrites the line with a fake one. Every name fewbits prints goes through :func:`printable`,
which shows control characters escaped, as Python's ``repr`` does, and keeps the rest (letters
of any script) as they are.

    >>> printable("conv1\\x1b]0;owned\\x07.weight")
    'conv1\\\\x1b]0;owned\\\\x07.weight'
    >>> printable("größe")
    'größe'
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

#: Unicode categories shown escaped: controls (C0, DEL, C1), format characters (bidirectional
#: overrides that reorder the rest of a line), unassigned, private use, surrogates, and line
#: and paragraph separators.
_UNSAFE = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"})


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``str(text)`` with every control or format character escaped (``\\x1b``, ``\\u202e``);
    ``keep_newlines`` leaves ``\\n`` as it is (multi-line messages)."""
    s = str(text)
    if s.isascii() and s.isprintable():
        return s
    out = []
    for ch in s:
        code = ord(ch)
        if (keep_newlines and ch == "\n") or (
                ch.isprintable() and unicodedata.category(ch) not in _UNSAFE):
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)
