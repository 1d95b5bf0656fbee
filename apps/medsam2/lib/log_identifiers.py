"""Patient identifiers out of log text: find them, replace each by a stable pseudonym.

No web server and no DICOM library here: the PACS datastore feeds :func:`remember_identifiers` with the values
it reads, and the server's log formatter (:mod:`lib.server.log_privacy`) calls :func:`scrub` on every finished
line. What is replaced:

- the value of an identifying DICOM attribute (:data:`IDENTIFYING`), found by keyword (``PatientID``,
  ``patient_id``, ``Patient's Name``) or tag (``00100020``, ``(0010,0020)``) followed by ``:`` or ``=``: a quoted
  string, a bare word, or a whole ``[...]``/``{...}`` value (DICOMweb JSON: ``"00100020": {"vr": "LO", "Value":
  ["X"]}``) whose quoted strings are replaced; pydicom's ``(0010,0020) Patient ID  LO: 'X'`` too;
- every person name component object (``{"Alphabetic": "Doe^John"}``), whatever attribute it belongs to;
- every value remembered by :func:`remember_identifiers` (and each ``^``-separated part of a name), wherever it
  appears as a whole word, in any letter case.

Each becomes ``patient-<first 10 hex digits of HMAC-SHA256(key, value)>`` (the value stripped and upper-cased),
so lines about the same patient still correlate without naming them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

# keyword -> tag (group, element) of the attributes whose values identify a patient
IDENTIFYING: dict[str, str] = {
    "PatientName": "00100010",
    "PatientID": "00100020",
    "PatientBirthDate": "00100030",
    "PatientBirthTime": "00100032",
    "OtherPatientIDs": "00101000",
    "OtherPatientNames": "00101001",
    "OtherPatientIDsSequence": "00101002",
    "PatientBirthName": "00101005",
    "PatientAddress": "00101040",
    "PatientMotherBirthName": "00101060",
    "PatientTelephoneNumbers": "00102154",
}
# remembered as literal words (not dates: a birth date would hide every other date that equals it)
LITERAL = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
)
PN_COMPONENTS = ("Alphabetic", "Ideographic", "Phonetic")
NOT_VALUES = frozenset({"", "null", "None", "UNK"})  # left as they are: no identifier in them
MAX_REMEMBERED = 5000  # literal values kept (least recently remembered dropped first)
MIN_LITERAL = 3  # shorter values (and name parts) are not searched for as words: too many false hits
MAX_LITERAL = 128
PSEUDONYM = re.compile(r"patient-[0-9a-f]{10}")

_key = secrets.token_bytes(32)  # per process until set_key: pseudonyms then do not match across restarts


def set_key(key: bytes) -> None:
    """The HMAC key of the pseudonyms (the installation's, see :mod:`lib.server.log_privacy`)."""
    global _key
    _key = bytes(key)


def pseudonym(value: str, key: bytes | None = None) -> str:
    """``patient-<10 hex digits>``: the same for the same value (stripped, any case), different otherwise."""
    normal = value.strip().upper().encode("utf-8", "surrogatepass")
    return "patient-" + hmac.new(key or _key, normal, hashlib.sha256).hexdigest()[:10]


# ----- attribute values ------------------------------------------------------------------------------------------
def _keyword_pattern(keyword: str) -> str:
    """``PatientID`` -> matches ``PatientID``, ``patient_id``, ``Patient ID``, ``Patient's ID`` (any case)."""
    words = re.findall(r"[A-Z]+s(?![a-z])|[A-Z][a-z]+|[A-Z]+(?![a-z])", keyword)  # Other, Patient, IDs
    return words[0] + "(?:'s)?" + "".join(r"[_ ]?" + w for w in words[1:])


def _tag_pattern(tag: str) -> str:
    return rf"{tag}|\(?{tag[:4]},\s?{tag[4:]}\)?"


_KEYS = "|".join(
    [_keyword_pattern(k) for k in sorted(IDENTIFYING, key=len, reverse=True)]
    + [_tag_pattern(t) for t in IDENTIFYING.values()]
)
# key (optionally quoted) then ':' or '='; the key must not be the end of a longer word (IssuerOfPatientID)
_KEY_VALUE = re.compile(rf"""(?<![A-Za-z0-9])(["']?)(?:{_KEYS})\1\s*[:=]\s*""", re.IGNORECASE)
# pydicom's element repr: (0010,0020) Patient ID    LO: 'X'
_PYDICOM = re.compile(
    r"\((?:" + "|".join(rf"{t[:4]},\s?{t[4:]}" for t in IDENTIFYING.values()) + r")\)[^\n:=]{0,80}?\b[A-Z]{2}: "
)
_PN_COMPONENT = re.compile(rf"""(?<![A-Za-z0-9])(["']?)(?:{"|".join(PN_COMPONENTS)})\1\s*:\s*""")
_BARE = re.compile(r"""[^\s,;&)\]}'"]*""")
_QUOTED_IN_VALUE = re.compile(r"""(?P<q>["'])(?P<s>(?:\\.|(?!(?P=q)).)*)(?P=q)(?P<key>\s*:)?""")
_VR = re.compile(r"""["']vr["']\s*:\s*$""", re.IGNORECASE)
_CLOSE = {"[": "]", "{": "}", "(": ")"}


def _quoted_end(text: str, start: int) -> int:
    """Index after the string literal opening at ``start`` (end of line if it never closes)."""
    quote, i = text[start], start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        if text[i] == "\n":
            return i
        i += 1
    return len(text)


def _bracketed_end(text: str, start: int) -> int:
    """Index after the ``[...]``/``{...}``/``(...)`` opening at ``start``, quotes skipped (end of line if open)."""
    stack, i = [_CLOSE[text[start]]], start + 1
    while i < len(text) and stack:
        c = text[i]
        if c in "'\"":
            i = _quoted_end(text, i)
            continue
        if c == "\n":
            return i
        if c in _CLOSE:
            stack.append(_CLOSE[c])
        elif c == stack[-1]:
            stack.pop()
        i += 1
    return i


def _value_end(text: str, start: int) -> int:
    if start >= len(text):
        return start
    if text[start] in "'\"":
        return _quoted_end(text, start)
    if text[start] in _CLOSE:
        return _bracketed_end(text, start)
    return _BARE.match(text, start).end()  # type: ignore[union-attr]


def _replaced(value: str) -> str:
    """A bare or quoted value (or its content) with its pseudonym; empty values and pseudonyms stay."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[0] + _replaced(value[1:-1]) + value[0]
    if value.strip() in NOT_VALUES or PSEUDONYM.fullmatch(value.strip()):
        return value
    return pseudonym(value)


def _replace_structured(value: str) -> str:
    """Every quoted string in a ``[...]``/``{...}`` value that is neither a key nor a ``vr``."""

    def one(m: re.Match) -> str:
        if m.group("key") or _VR.search(value, 0, m.start()):
            return m.group(0)
        return m.group("q") + _replaced(m.group("s")) + m.group("q")

    return _QUOTED_IN_VALUE.sub(one, value)


def _scrub_values(text: str, pattern: re.Pattern[str]) -> str:
    """The value after each match of ``pattern`` (an attribute key and its separator) replaced."""
    out, pos = [], 0
    while (m := pattern.search(text, pos)) is not None:
        end = _value_end(text, m.end())
        value = text[m.end() : end]
        new = _replace_structured(value) if value[:1] in _CLOSE else _replaced(value)
        out += [text[pos : m.end()], new]
        pos = end  # past the key at least: a match is never empty
    out.append(text[pos:])
    return "".join(out)


# ----- remembered values -----------------------------------------------------------------------------------------
class _Registry:
    """Literal identifier values (bounded), and one regex that finds any of them as a whole word."""

    def __init__(self, limit: int = MAX_REMEMBERED):
        self.limit = limit
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        self._stale = False

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            for value in values:
                new = value not in self._values
                self._values[value] = None
                self._values.move_to_end(value)
                self._stale |= new
            while len(self._values) > self.limit:
                self._values.popitem(last=False)
                self._stale = True

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern, self._stale = None, False

    def __len__(self) -> int:
        return len(self._values)

    def pattern(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._stale:
                self._pattern = _words_pattern(list(self._values)) if self._values else None
                self._stale = False
            return self._pattern


_registry = _Registry()


def _trie_pattern(words: Iterable[str]) -> str:
    """One regex alternation for many words, as a trie (shared prefixes matched once; longest first)."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for c in word:
            node = node.setdefault(c, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        ends = "" in node
        branches = [re.escape(c) + build(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if ends else body

    return build(trie)


def _words_pattern(words: list[str]) -> re.Pattern[str]:
    # whole words only, and never a number inside a dotted UID (1.2.840.<id>.5)
    body = _trie_pattern(sorted({w.upper() for w in words}))
    return re.compile(rf"(?<![A-Za-z0-9])(?<!\d\.)(?:{body})(?![A-Za-z0-9])(?!\.\d)", re.IGNORECASE)


def identifier_words(value: str) -> list[str]:
    """The literal strings to search for: the value and, for a person name, its ``^``/``=``-separated parts."""
    value = value.strip()
    if not MIN_LITERAL <= len(value) <= MAX_LITERAL:
        return []
    parts = [p.strip() for p in re.split(r"[\^=]", value)] if re.search(r"[\^=]", value) else []
    return [value] + [p for p in parts if len(p) >= MIN_LITERAL and p != value]


def remember_identifiers(values: Iterable[Any]) -> None:
    """Replace these values (and the parts of names) wherever they appear in log text from now on."""
    words = [w for v in values if v is not None for w in identifier_words(str(v))]
    if words:
        _registry.add(words)


def forget_identifiers() -> None:
    """Drop every remembered value (tests)."""
    _registry.clear()


def identifying_values(attributes: Any) -> list[str]:
    """The names and ids (:data:`LITERAL`) in a dict-like of DICOM attributes by keyword (a series' info, a
    pydicom Dataset); multi-valued attributes (OtherPatientIDs) give each value."""
    found: list[str] = []
    for keyword in LITERAL:
        try:
            value = attributes.get(keyword)
        except Exception:  # a pydicom element it cannot decode: nothing to learn from it
            continue
        if value is None or value == "":
            continue
        items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        found += [str(v) for v in items if str(v).strip() not in NOT_VALUES]
    return found


# ----- everything ------------------------------------------------------------------------------------------------
def scrub(text: str) -> str:
    """``text`` with every patient identifier this module can find replaced by its pseudonym."""
    text = _scrub_values(text, _KEY_VALUE)
    text = _scrub_values(text, _PYDICOM)
    text = _scrub_values(text, _PN_COMPONENT)
    pattern = _registry.pattern()
    if pattern is not None:
        text = pattern.sub(lambda m: pseudonym(m.group(0)), text)
    return text
