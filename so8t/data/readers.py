"""Readers for the user's own data: files in ``collect.user_dirs`` and Hugging Face datasets.

Formats (chosen by suffix; JSON files are told apart by content):

========================  =====================================================================
``.jsonl`` ``.ndjson``     one JSON object per line (blank lines skipped)
``.json``                  an array of objects, one object, or ``{"data"|"records"|"examples"|
                           "rows"|"items": [...]}``; a ``.json`` file holding JSON Lines and a
                           ``.jsonl`` file holding one array are read as what they contain
``.csv`` ``.tsv``          a header row, then one record per row (a ``.csv`` whose header has
                           tabs and no commas is read as TSV); empty cells count as absent
``.txt`` ``.md`` ``.html`` a document, split into sections at its headings (Markdown ``#``,
``.htm`` ``.pdf``          HTML ``<h1>``-``<h6>``, and in text/PDF lines like ``第1章 概要``,
                           ``2.1 売上``, ``【概要】``, ``■ 方針``), then cut into pieces of at
                           most ``collect.max_section_chars`` at paragraph boundaries
========================  =====================================================================

Record schemas (:func:`map_record`; the first that matches wins):

* ``messages`` (or ``conversations``): a chat, ``[{"role": "user"|"assistant"|"system",
  "content": str}]`` (ShareGPT's ``{"from": "human"|"gpt", "value"}`` too); the last turn
  must be the assistant's: it is the response, everything before it the prompt.
* ``instruction`` (+ optional ``input``) and ``output``; ``prompt`` and ``response``;
  ``question`` and ``answer``.
* ``text``: a document of its own (sectioned like a ``.txt`` file).
* Any of these with ``label`` or ``decision``: a decision record (ALLOW / ESCALATION /
  DENY, spellings in :data:`so8t.schema.DECISION_ALIASES`); the response is then
  optional, ``domain`` maps to :class:`so8t.schema.Domain` (English or Japanese name;
  anything else becomes ``general`` and is reported). Optional ``thinking`` (or
  ``reasoning``) and ``reason`` strings are kept. Other fields are ignored.

Encodings: UTF-8, UTF-8 with BOM, UTF-16 with BOM, CP932 (Windows Shift_JIS; plain
Shift_JIS files are read as CP932, its superset) and EUC-JP. A file that is not valid
UTF-8 is identified by charset-normalizer among CP932 and EUC-JP and then decoded
strictly. A file whose Japanese lines are partly UTF-8 and partly not (mixed encodings,
or corruption) is refused, naming the first odd line. Line ends become ``\\n``.

Normalisation (``collect.normalize: nfkc``): Unicode NFKC, so full-width letters and
digits become ASCII (``ＡＢＣ１２３`` -> ``ABC123``), half-width katakana becomes
full-width (``ｶﾞｲﾄﾞ`` -> ``ガイド``), and circled or compatibility characters are
spelled out (``①`` -> ``1``, ``㈱`` -> ``(株)``). Full-width punctuation (``！？（）：；，．～``
and the rest of U+FF01-FF5E that is not a letter or digit) and ``…‥￥`` are kept as
written: NFKC would turn Japanese prose punctuation into ASCII (``？`` -> ``?``,
``…`` -> ``...``). It applies to field values after JSON/CSV parsing (never to syntax)
and to whole documents before sectioning, so document offsets refer to the normalised
text. Debian and GSM sources are not normalised.

Errors: every malformed input raises :class:`InputError`, whose message names the
file, the line (or record index / dataset row) and the field, and says what was
expected. With ``collect.on_bad_record: skip`` (:class:`BadRecords`) a bad record (or a
whole unreadable file) is left out and listed instead.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import dataclasses
import io
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from so8t.io import DataError
from so8t.data.pii import mask_text
from so8t.schema import DECISION_ALIASES, DOMAIN_JA, DOMAINS, Decision

#: Suffix -> format.
SUFFIX_FORMAT: dict[str, str] = {
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}

#: Encodings tried (in this order of preference) for files that are not UTF-8.
DETECT_ENCODINGS = ("cp932", "euc_jp")
ENCODING_NAMES = {
    "utf-8": "UTF-8",
    "utf-8-sig": "UTF-8 with BOM",
    "utf-16": "UTF-16 with BOM",
    "cp932": "CP932 (Shift_JIS)",
    "euc_jp": "EUC-JP",
}
EXPECTED_ENCODINGS = "UTF-8 (with or without BOM), UTF-16 with BOM, CP932/Shift_JIS or EUC-JP"

#: Leading bytes of binary formats users save under a text name by mistake.
BINARY_MAGIC: dict[bytes, str] = {
    b"PK\x03\x04": "a ZIP archive (an .xlsx/.docx/.zip file?)",
    b"\x1f\x8b": "gzip-compressed data",
    b"%PDF-": "a PDF document (name it .pdf)",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"SQLite format 3": "an SQLite database",
    b"PAR1": "a Parquet file",
    b"ARROW1": "an Arrow file",
    b"\xd0\xcf\x11\xe0": "an old Office document (.xls/.doc)",
}

#: Full-width punctuation kept as written by the NFKC normalisation.
KEEP_FULLWIDTH = "".join(
    chr(c) for c in range(0xFF01, 0xFF5F) if not chr(c).isalnum()
) + "…‥￥"
_KEEP_RE = re.compile(f"([{re.escape(KEEP_FULLWIDTH)}]+)")

#: Top-level keys of a JSON object that holds a list of records.
RECORD_LIST_KEYS = ("data", "records", "examples", "rows", "items")
#: Chat roles and their aliases (ShareGPT's ``from`` values).
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
#: Prompt/response field pairs, in order of precedence.
PAIR_SCHEMAS: tuple[tuple[str, str], ...] = (("instruction", "output"), ("prompt", "response"), ("question", "answer"))
LABEL_FIELDS = ("decision", "label")

_JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(\S.*?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
#: A heading line in plain text or PDF text (at most 50 characters, no closing 。).
_TEXT_HEADING = re.compile(
    r"^\s*(?:(?:第[0-9一二三四五六七八九十百]+[章節部編]\s*|[0-9]+(?:\.[0-9]+)*\.?[ \t\u3000]+"
    r"|[（(][0-9一二三四五六七八九十]+[)）]\s*|[■□◆◇●]\s*)\S|【[^】]{1,40}】\s*$)"
)
_SENTENCE_END = "。．！？!?：:」』）)"


class InputError(DataError):
    """A malformed input file or record.

    The message reads ``{path}:{line}: field `{field}`: {problem}`` (``{path}: record
    {index}`` where there are no lines); the parts are kept as attributes for the
    rejects list.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        kind: str,
        line: int | None = None,
        index: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.problem, self.kind = str(path), problem, kind
        self.line, self.index, self.field = line, index, field
        where = f"{path}:{line}" if line is not None else f"{path}: record {index}" if index is not None else str(path)
        super().__init__(f"{where}: " + (f"field `{field}`: " if field else "") + problem)

    def as_reject(self) -> dict[str, Any]:
        """The rejects-file entry: path, line, index, field, kind and the full message."""
        return {
            "path": self.path,
            "line": self.line,
            "index": self.index,
            "field": self.field,
            "kind": self.kind,
            "error": str(self),
        }


class BadRecords:
    """What happens to malformed input: ``error`` raises it, ``skip`` lists it and goes on."""

    def __init__(self, policy: str = "error") -> None:
        if policy not in ("error", "skip"):
            raise ValueError(f"collect.on_bad_record: expected 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.rejects: list[dict[str, Any]] = []

    def handle(self, err: InputError) -> None:
        """Raise ``err`` (policy ``error``) or record it as rejected (policy ``skip``)."""
        if self.policy == "error":
            raise err
        self.rejects.append(err.as_reject())


# --------------------------------------------------------------------------- decoding


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def _first_bad_line(data: bytes, encoding: str) -> tuple[int, int, int, bool] | None:
    """``(line, byte within the line, byte value, cut off)`` of the first line ``encoding``
    cannot decode; ``cut off``: the file ends inside a multi-byte character.

    Lines can be decoded one by one: in every supported multi-byte encoding a newline
    byte is never part of a character.
    """
    lines = data.split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        try:
            line.decode(encoding)
        except UnicodeDecodeError as e:
            cut = lineno == len(lines) and e.end == len(line) and e.reason in (
                "unexpected end of data",
                "incomplete multibyte sequence",
            )
            return lineno, e.start + 1, line[e.start], cut
    return None


def _check_mixed(data: bytes, path: Path) -> None:
    """Refuse a file whose Japanese lines are partly UTF-8 and partly something else."""
    utf8: list[int] = []
    other: list[tuple[int, int, int]] = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if line.isascii():
            continue
        try:
            if _JAPANESE.search(line.decode("utf-8")):
                utf8.append(lineno)
        except UnicodeDecodeError as e:
            other.append((lineno, e.start + 1, line[e.start]))
    if not (utf8 and other):
        return
    if len(utf8) >= len(other):
        lineno, col, byte = other[0]
        problem = (
            f"byte 0x{byte:02X} (byte {col} of the line) is not UTF-8, but the file's other Japanese lines "
            f"(e.g. line {utf8[0]}) are UTF-8: the file mixes encodings or is corrupted; "
            "save it in one encoding (UTF-8 recommended)"
        )
    else:
        lineno = utf8[0]
        problem = (
            f"this line is UTF-8, but the file's other Japanese lines (e.g. line {other[0][0]}) are not: "
            "the file mixes encodings; save it in one encoding (UTF-8 recommended)"
        )
    raise InputError(path, problem, kind="mixed_encoding", line=lineno)


def _undecodable(data: bytes, path: Path) -> InputError:
    """The error for bytes that no supported encoding reads as Japanese text.

    Names the line where the encoding that reads furthest stops (UTF-8 first on ties):
    a truncated or corrupted EUC-JP file fails late in EUC-JP, while CP932 may decode
    any bytes at all (as nonsense, which the detector rejects).
    """
    failures: dict[str, tuple[int, int, int, bool]] = {}
    decodes_all = []
    for enc in ("utf-8", *DETECT_ENCODINGS):
        bad = _first_bad_line(data, enc)
        if bad is None:
            decodes_all.append(enc)
        else:
            failures[enc] = bad
    enc = max(failures, key=lambda e: failures[e][0], default=None)
    if enc is None or (decodes_all and failures[enc][0] == 1):
        return InputError(
            path,
            f"the bytes decode as {ENCODING_NAMES[decodes_all[0]]} but do not read as Japanese text; "
            f"expected the whole file in one of {EXPECTED_ENCODINGS}",
            kind="encoding",
            line=1,
        )
    lineno, col, byte, cut = failures[enc]
    before = {1: "", 2: " (the encoding of line 1)"}.get(lineno, f" (the encoding of lines 1-{lineno - 1})")
    why = f"expected the whole file in one of {EXPECTED_ENCODINGS}"
    if cut:
        why = "the file ends inside a character (truncated?)"
    return InputError(
        path,
        f"cannot decode byte 0x{byte:02X} (byte {col} of the line) as {ENCODING_NAMES[enc]}{before}; {why}",
        kind="encoding",
        line=lineno,
    )


def _utf16_hint(data: bytes) -> str:
    for enc, name in (("utf-16-le", "little"), ("utf-16-be", "big")):
        try:
            if len(data) % 2 == 0 and _JAPANESE.search(data.decode(enc)):
                return f" (UTF-16 {name}-endian without a byte-order mark? save it as UTF-8)"
        except UnicodeDecodeError:
            continue
    return ""


def decode_bytes(data: bytes, path: str | Path) -> tuple[str, str]:
    """Decode a text file's bytes; returns ``(text with \\n line ends, encoding)``.

    The encoding is one of :data:`ENCODING_NAMES`' keys.

    Raises:
        InputError: empty or whitespace-only file; binary data (a NUL byte or a known
            binary signature); mixed encodings; bytes in none of the supported encodings.
    """
    path = Path(path)
    if not data:
        raise InputError(path, "empty file (0 bytes); expected records or text", kind="empty_file")
    if data.startswith(codecs.BOM_UTF8):
        encoding, body = "utf-8-sig", data[len(codecs.BOM_UTF8) :]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                path,
                f"the file starts with a UTF-8 byte-order mark but byte 0x{body[e.start]:02X} is not UTF-8; "
                "save the whole file as UTF-8",
                kind="encoding",
                line=_line_of(body, e.start),
            ) from None
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise InputError(
                path, f"not valid UTF-16 after its byte-order mark ({e.reason})", kind="encoding"
            ) from None
    else:
        for magic, what in BINARY_MAGIC.items():
            if data.startswith(magic):
                raise InputError(path, f"binary file: this is {what}, not text", kind="binary_file", line=1)
        nul = data.find(b"\x00")
        if nul >= 0:
            raise InputError(
                path,
                f"binary file: NUL byte at offset {nul}{_utf16_hint(data)}; expected text in {EXPECTED_ENCODINGS}",
                kind="binary_file",
                line=_line_of(data, nul),
            )
        try:
            encoding, text = "utf-8", data.decode("utf-8")
        except UnicodeDecodeError:
            _check_mixed(data, path)
            import charset_normalizer

            match = charset_normalizer.from_bytes(data, cp_isolation=list(DETECT_ENCODINGS)).best()
            if match is None or match.encoding not in DETECT_ENCODINGS:
                raise _undecodable(data, path) from None
            encoding = match.encoding
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                raise _undecodable(data, path) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise InputError(path, "the file holds only whitespace; expected records or text", kind="empty_file")
    return text, encoding


def normalize_text(text: str, mode: str = "nfkc") -> str:
    """NFKC outside :data:`KEEP_FULLWIDTH` punctuation (``mode="nfkc"``), or ``text`` unchanged (``"none"``)."""
    if mode == "none":
        return text
    parts = _KEEP_RE.split(text)
    # Odd parts are kept punctuation runs; NFKC runs over whole even parts so that
    # half-width kana and their voiced marks (ｶﾞ) compose.
    return "".join(p if k % 2 else unicodedata.normalize("NFKC", p) for k, p in enumerate(parts))


# --------------------------------------------------------------------------- record files


@dataclasses.dataclass
class RawRecord:
    """One parsed record and where it came from (line for line-based formats, else index)."""

    obj: Any
    index: int
    line: int | None = None


class _Lines:
    """Character offset -> 1-based line number."""

    def __init__(self, text: str) -> None:
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def __call__(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _json_error(e: json.JSONDecodeError, path: Path, line: int, last: bool) -> InputError:
    """A located error for a JSON syntax error: trailing comma, truncation, or the parser's message."""
    doc, pos = e.doc, e.pos
    before = doc[:pos].rstrip()
    at = doc[pos : pos + 1]
    if (before.endswith(",") and at in ("]", "}")) or (at == "," and doc[pos + 1 :].lstrip()[:1] in ("]", "}")):
        closer = at if at in ("]", "}") else doc[pos + 1 :].lstrip()[:1]
        return InputError(
            path,
            f"trailing comma before `{closer}`; JSON allows no comma after the last item",
            kind="trailing_comma",
            line=line,
        )
    ends_early = e.msg.startswith("Unterminated string") or pos >= len(doc.rstrip())
    if ends_early and last:
        return InputError(
            path,
            f"invalid JSON ({e.msg}): the file ends in the middle of a record (truncated?); "
            "expected a complete JSON object",
            kind="truncated",
            line=line,
        )
    hint = ""
    if doc.strip() in ("{", "["):
        hint = "; a JSON Lines record must be on one line"
    return InputError(
        path, f"invalid JSON at column {e.colno}: {e.msg}{hint}", kind="invalid_json", line=line
    )


def _json_lines(text: str, path: Path, max_chars: int, bad: BadRecords) -> list[RawRecord]:
    lines = text.split("\n")
    last = max(i for i, line in enumerate(lines) if line.strip())
    out: list[RawRecord] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = i + 1
        try:
            if len(line) > max_chars:
                raise InputError(
                    path,
                    f"line of {len(line):,} characters, more than collect.max_record_chars = {max_chars:,} "
                    "(minified or binary data?); expected one record per line",
                    kind="huge_record",
                    line=lineno,
                )
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _json_error(e, path, lineno, last=i == last and not text.endswith("\n")) from None
            if isinstance(obj, list):
                raise InputError(
                    path,
                    "a JSON array in a JSON Lines file: the file mixes JSON and JSON Lines; "
                    "expected one JSON object per line",
                    kind="mixed_json",
                    line=lineno,
                )
            if not isinstance(obj, dict):
                raise InputError(
                    path,
                    f"expected a JSON object, got {type(obj).__name__} {obj!r:.40}",
                    kind="not_object",
                    line=lineno,
                )
        except InputError as err:
            bad.handle(err)
            continue
        out.append(RawRecord(obj, index=len(out), line=lineno))
    return out


def _json_array(text: str, start: int, path: Path, max_chars: int) -> list[RawRecord]:
    """Walk a top-level JSON array element by element, so each record knows its line."""
    line_of = _Lines(text)
    decoder = json.JSONDecoder()
    out: list[RawRecord] = []
    end_line = line_of(len(text.rstrip()))

    def truncated() -> InputError:
        return InputError(
            path,
            "the file ends before the JSON array is closed (truncated?); expected `]`",
            kind="truncated",
            line=end_line,
        )

    pos = _skip_ws(text, start + 1)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            if pos >= len(text):
                raise truncated()
            try:
                obj, nxt = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise _json_error(e, path, e.lineno, last=line_of(e.pos) >= end_line) from None
            if nxt - pos > max_chars:
                raise InputError(
                    path,
                    f"record of {nxt - pos:,} characters, more than collect.max_record_chars = {max_chars:,}",
                    kind="huge_record",
                    line=line_of(pos),
                    index=len(out),
                )
            out.append(RawRecord(obj, index=len(out), line=line_of(pos)))
            pos = _skip_ws(text, nxt)
            if pos >= len(text):
                raise truncated()
            if text[pos] == ",":
                comma, pos = pos, _skip_ws(text, pos + 1)
                if pos < len(text) and text[pos] == "]":
                    raise InputError(
                        path,
                        "trailing comma before `]`; JSON allows no comma after the last item",
                        kind="trailing_comma",
                        line=line_of(comma),
                    )
                continue
            if text[pos] == "]":
                pos += 1
                break
            raise InputError(
                path,
                f"expected `,` or `]` after record {len(out) - 1}, got {text[pos]!r}",
                kind="invalid_json",
                line=line_of(pos),
            )
    rest = _skip_ws(text, pos)
    if rest < len(text):
        raise InputError(
            path,
            f"more data after the JSON array that closed on line {line_of(pos - 1)}: the file mixes a JSON array "
            "with JSON Lines; keep one format per file (.json: one array; .jsonl: one object per line)",
            kind="mixed_json",
            line=line_of(rest),
        )
    return out


def _json_document(text: str, start: int, path: Path) -> list[RawRecord]:
    """One JSON value: a record, or an object holding a list of records."""
    line_of = _Lines(text)
    try:
        obj, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise _json_error(e, path, e.lineno, last=line_of(e.pos) >= line_of(len(text.rstrip()))) from None
    rest = _skip_ws(text, end)
    if rest < len(text):
        raise InputError(
            path,
            f"more data after the JSON object that closed on line {line_of(end - 1)}: several multi-line objects "
            "or a mix of JSON and JSON Lines; expected one object per line (.jsonl) or one array (.json)",
            kind="mixed_json",
            line=line_of(rest),
        )
    if isinstance(obj, dict):
        lists = [k for k in RECORD_LIST_KEYS if isinstance(obj.get(k), list)]
        if lists and not _has_record_fields(obj):
            return [RawRecord(item, index=k) for k, item in enumerate(obj[lists[0]])]
        return [RawRecord(obj, index=0, line=line_of(start))]
    raise InputError(
        path, f"expected a JSON object or array, got {type(obj).__name__}", kind="not_object", line=line_of(start)
    )


def read_json_records(text: str, path: str | Path, max_chars: int, bad: BadRecords) -> list[RawRecord]:
    """Records of a JSON, JSON-array or JSON Lines text (told apart by content).

    Raises:
        InputError: located syntax errors (trailing comma, truncation, a JSON array
            mixed with JSON Lines, a record over ``max_chars``); line-level errors of
            JSON Lines go through ``bad``.
    """
    path = Path(path)
    start = _skip_ws(text, 0)
    first = text[start]
    if first == "[":
        return _json_array(text, start, path, max_chars)
    if first != "{":
        raise InputError(
            path,
            f"expected JSON (an array `[`, an object `{{` or one object per line), got {first!r}",
            kind="invalid_json",
            line=text.count("\n", 0, start) + 1,
        )
    first_line = text[start:].split("\n", 1)[0]
    several_lines = sum(1 for line in text.split("\n") if line.strip()) > 1
    try:
        json.loads(first_line)
        is_lines = several_lines
    except json.JSONDecodeError:
        is_lines = False
    if is_lines:
        return _json_lines(text, path, max_chars, bad)
    if len(text) > max_chars and not several_lines:
        raise InputError(
            path,
            f"a single line of {len(text):,} characters, more than collect.max_record_chars = {max_chars:,}",
            kind="huge_record",
            line=1,
        )
    return _json_document(text, start, path)


def read_csv_records(text: str, path: str | Path, tsv: bool, max_chars: int, bad: BadRecords) -> list[RawRecord]:
    """Records of a CSV/TSV text with a header row; empty cells are left out of the record.

    Raises:
        InputError: a bad header, malformed quoting (file level); rows with the wrong
            number of cells or over ``max_chars`` go through ``bad``.
    """
    path = Path(path)
    header_line = text.split("\n", 1)[0]
    delimiter = "\t" if tsv or ("\t" in header_line and "," not in header_line) else ","
    csv.field_size_limit(max(max_chars, 131_072))
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    out: list[RawRecord] = []
    try:
        header = [h.strip() for h in next(reader)]
        if not all(header) or len(set(header)) != len(header):
            raise InputError(
                path,
                f"header row {header}: expected unique, non-empty column names such as prompt,response",
                kind="csv_header",
                line=1,
            )
        prev = reader.line_num
        for row in reader:
            start, prev = prev + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            try:
                if len(row) != len(header):
                    raise InputError(
                        path,
                        f"{len(row)} cells, but the header has {len(header)} columns {header}; "
                        f"expected {len(header)} (quote cells that contain {delimiter!r} with double quotes)",
                        kind="csv_shape",
                        line=start,
                    )
                if sum(len(c) for c in row) > max_chars:
                    raise InputError(
                        path,
                        f"row of {sum(len(c) for c in row):,} characters, more than collect.max_record_chars = "
                        f"{max_chars:,}",
                        kind="huge_record",
                        line=start,
                    )
            except InputError as err:
                bad.handle(err)
                continue
            out.append(RawRecord({h: c for h, c in zip(header, row) if c.strip()}, index=len(out), line=start))
    except csv.Error as e:
        kind = "huge_record" if "field larger than field limit" in str(e) else "invalid_csv"
        raise InputError(path, f"malformed CSV: {e}", kind=kind, line=reader.line_num) from None
    return out


# --------------------------------------------------------------------------- schema mapping


def _has_record_fields(obj: dict[str, Any]) -> bool:
    keys = {"messages", "conversations", "text", *LABEL_FIELDS, *(k for pair in PAIR_SCHEMAS for k in pair)}
    return bool(keys & set(obj))


def _string(obj: dict[str, Any], name: str, fail: Callable[..., InputError], required: bool) -> str | None:
    if name not in obj or obj[name] is None:
        if required:
            what = "is null" if name in obj else "is missing"
            raise fail(f"{what}; expected a non-empty string", field=name, kind="missing_field")
        return None
    value = obj[name]
    if not isinstance(value, str):
        raise fail(
            f"expected a string, got {type(value).__name__} ({json.dumps(value, ensure_ascii=False)[:40]})",
            field=name,
            kind="wrong_type",
        )
    value = value.strip()
    if required and not value:
        raise fail("is empty; expected a non-empty string", field=name, kind="empty_field")
    return value or None


def _chat(obj: dict[str, Any], key: str, fail: Callable[..., InputError]) -> tuple[str, str]:
    """``(prompt, response)`` of a chat: the last assistant turn and everything before it."""
    messages = obj[key]
    if not isinstance(messages, list) or not messages:
        raise fail(
            f"expected a non-empty list of {{role, content}} messages, got {type(messages).__name__}",
            field=key,
            kind="wrong_type",
        )
    turns: list[tuple[str, str]] = []
    for k, m in enumerate(messages):
        where = f"{key}[{k}]"
        if not isinstance(m, dict):
            raise fail(
                f"expected an object with role and content, got {type(m).__name__}", field=where, kind="wrong_type"
            )
        role_key, text_key = ("role", "content") if "role" in m or "from" not in m else ("from", "value")
        role = m.get(role_key)
        if role not in ROLE_ALIASES:
            raise fail(
                f"expected one of {sorted(ROLE_ALIASES)}, got {role!r}", field=f"{where}.{role_key}", kind="wrong_type"
            )
        content = _string(m, text_key, lambda msg, field, kind: fail(msg, field=f"{where}.{field}", kind=kind), True)
        assert content is not None
        turns.append((ROLE_ALIASES[role], content))
    if turns[-1][0] != "assistant":
        raise fail(
            f"the last message is {turns[-1][0]!r}; expected the assistant's answer last",
            field=f"{key}[{len(turns) - 1}].role",
            kind="bad_messages",
        )
    history = turns[:-1]
    if not any(role == "user" for role, _ in history):
        raise fail("no user message before the assistant's answer", field=key, kind="bad_messages")
    system = [t for r, t in history if r == "system"]
    dialogue = [(r, t) for r, t in history if r != "system"]
    if len(dialogue) == 1:
        body = dialogue[0][1]
    else:
        names = {"user": "ユーザー", "assistant": "アシスタント"}
        body = "\n".join(f"{names[r]}: {t}" for r, t in dialogue)
    return "\n\n".join([*system, body]), turns[-1][1]


def normalize_label(raw: str) -> Decision | None:
    """The :class:`Decision` of a label spelling (:data:`DECISION_ALIASES`), or None if unknown."""
    key = unicodedata.normalize("NFKC", raw).strip().casefold().replace(" ", "_").replace("-", "_")
    return DECISION_ALIASES.get(key)


_DOMAIN_KEYS = {d: d for d in DOMAINS} | {ja: d for d, ja in DOMAIN_JA.items()}


def map_record(obj: Any, path: str | Path, *, line: int | None = None, index: int | None = None) -> dict[str, Any]:
    """Map one parsed record to a ``pair``, ``decision`` or ``text`` item (see the module docstring).

    Returns:
        ``{"kind": "pair", "prompt", "response", "thinking"}``,
        ``{"kind": "decision", "prompt", "response" (or None), "thinking", "reason",
        "decision", "label", "domain", "domain_raw"}`` or ``{"kind": "text", "text"}``.

    Raises:
        InputError: naming the field: missing, null, empty, wrong type, unknown label,
            malformed chat.
    """

    def fail(problem: str, *, field: str | None = None, kind: str) -> InputError:
        return InputError(path, problem, kind=kind, line=line, index=None if line is not None else index, field=field)

    if not isinstance(obj, dict):
        return_type = type(obj).__name__
        raise fail(f"expected a JSON object (a record), got {return_type}", kind="not_object")
    # A null value counts as absent (dataset rows carry every column, null where unused).
    present = {k for k, v in obj.items() if v is not None}
    label_field = next((f for f in LABEL_FIELDS if f in present), None)
    optional = {name: _string(obj, name, fail, False) for name in ("thinking", "reasoning", "reason")}
    thinking = optional["thinking"] or optional["reasoning"] or ""
    response: str | None
    chat_key = next((k for k in ("messages", "conversations") if k in present), None)
    if chat_key:
        prompt, response = _chat(obj, chat_key, fail)
    elif (pair := next((p for p in PAIR_SCHEMAS if p[0] in present or p[1] in present), None)) is not None:
        prompt = _string(obj, pair[0], fail, True)
        if pair[0] == "instruction" and (extra := _string(obj, "input", fail, False)):
            prompt = f"{prompt}\n\n{extra}"
        response = _string(obj, pair[1], fail, label_field is None)
    elif "text" in present:
        text = _string(obj, "text", fail, True)
        if label_field is None:
            return {"kind": "text", "text": text}
        prompt, response = text, None
    else:
        raise fail(
            "no known fields; expected `messages`, `instruction` + `output`, `prompt` + `response`, "
            f"`question` + `answer` or `text` (optionally with `label`); got fields {sorted(obj)}",
            kind="missing_field",
        )
    assert prompt is not None
    if label_field is None:
        assert response is not None
        return {"kind": "pair", "prompt": prompt, "response": response, "thinking": thinking}
    raw = obj[label_field]
    if not isinstance(raw, str):
        raise fail(
            f"expected a label string such as ALLOW, ESCALATION or DENY, got {type(raw).__name__} ({raw!r:.20})",
            field=label_field,
            kind="wrong_type",
        )
    decision = normalize_label(raw)
    if decision is None:
        known = {d.value: sorted(k for k, v in DECISION_ALIASES.items() if v is d) for d in Decision}
        raise fail(
            f"unknown label {raw!r}; expected ALLOW, ESCALATION or DENY or a known spelling: "
            + "; ".join(f"{d}: {', '.join(k)}" for d, k in known.items()),
            field=label_field,
            kind="unknown_label",
        )
    domain_raw = _string(obj, "domain", fail, False)
    domain = "general"
    if domain_raw is not None:
        domain = _DOMAIN_KEYS.get(unicodedata.normalize("NFKC", domain_raw).strip().casefold(), "general")
    return {
        "kind": "decision",
        "prompt": prompt,
        "response": response,
        "thinking": thinking,
        "reason": optional["reason"],
        "decision": decision.value,
        "label": raw,
        "domain": domain,
        "domain_raw": domain_raw,
    }


# --------------------------------------------------------------------------- documents


@dataclasses.dataclass
class Document:
    """A document's text as collected (decoded, normalised, masked), with its layout.

    ``page_starts`` (PDF only): character offset of each page's first character.
    ``line`` / ``index``: where a ``text`` record came from inside a record file.
    """

    text: str
    title: str
    fmt: str
    page_starts: list[int] = dataclasses.field(default_factory=list)
    line: int | None = None
    index: int | None = None


@dataclasses.dataclass
class Chunk:
    """A piece of one document section: ``document.text[offset : offset + len(text)] == text``."""

    offset: int
    text: str
    title: str
    section: int
    piece: int
    page: int | None = None


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: headings as Markdown ``#`` lines, blocks on lines of their own."""

    BLOCK = frozenset(
        "p div section article header footer main aside nav ul ol table tr blockquote pre dl dt dd figure "
        "figcaption form hr br td th".split()
    )
    SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.current: list[str] = []
        self.title: list[str] = []
        self.skip = 0
        self.in_title = self.in_pre = False
        self.heading = 0

    def _flush(self) -> None:
        text = "".join(self.current)
        if not self.in_pre:
            # A line break between two wide characters renders as nothing (CSS Text 3
            # segment-break transformation); other white space collapses to one space.
            text = re.sub(r"(?<=[^\x00-\x7f])\s*\n\s*(?=[^\x00-\x7f])", "", text)
            text = re.sub(r"\s+", " ", text).strip()
        if text.strip():
            self.lines.append(("#" * self.heading + " " if self.heading else "") + text)
        self.current = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "title":
            self.in_title = True
        elif tag in self.SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading = int(tag[1])
        elif tag == "li":
            self._flush()
            self.current.append("* ")
        elif tag in self.BLOCK:
            self._flush()
            self.in_pre = self.in_pre or tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        elif tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading = 0
        elif tag in self.BLOCK or tag == "li":
            self._flush()
            if tag == "pre":
                self.in_pre = False

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.skip:
            self.current.append(data)

    def text(self) -> tuple[str, str]:
        self._flush()
        return "\n".join(self.lines), re.sub(r"\s+", " ", "".join(self.title)).strip()


def html_to_text(html: str) -> tuple[str, str]:
    """``(text, title)`` of an HTML page; headings become ``#``-lines (see :class:`_HTMLText`)."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return parser.text()


def _reflow_pdf_page(text: str) -> str:
    """Join the visual line breaks of a PDF page; headings, list items and sentence ends keep theirs."""
    out: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        prev = out[-1] if out else ""
        if prev and not (
            prev.endswith(tuple(_SENTENCE_END))
            or _is_text_heading(prev)
            or _is_text_heading(line)
            or re.match(r"^[*・\-•]\s*", line)
        ):
            glue = " " if prev[-1].isascii() and line[0].isascii() else ""
            out[-1] = prev + glue + line
        else:
            out.append(line)
    return "\n".join(out)


def read_pdf(data: bytes, path: str | Path) -> tuple[list[str], str]:
    """``(page texts, metadata title or "")`` of a PDF (pypdf), pages reflowed.

    Raises:
        InputError: not a readable PDF, encrypted, or without a text layer.
    """
    import pypdf
    from pypdf.errors import PdfReadError

    path = Path(path)
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise InputError(path, "encrypted PDF; save an unencrypted copy", kind="pdf_unreadable")
        pages = [_reflow_pdf_page(page.extract_text() or "") for page in reader.pages]
        title = str((reader.metadata or {}).get("/Title") or "").strip()
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise InputError(
            path, f"not a readable PDF ({e}); expected a PDF with a text layer", kind="pdf_unreadable"
        ) from None
    if not any(p.strip() for p in pages):
        raise InputError(
            path,
            f"no text in {len(pages)} page(s): a scanned PDF without a text layer? run OCR first (e.g. ocrmypdf)",
            kind="no_text",
        )
    return pages, title


def _is_text_heading(line: str) -> bool:
    s = line.strip()
    return 0 < len(s) <= 50 and not s.endswith(("。", "．", "、")) and bool(_TEXT_HEADING.match(s))


def _headings(text: str, fmt: str) -> list[tuple[int, int, str]]:
    """``(line start, body start, title)`` per heading line of ``text``."""
    out = []
    fenced = False
    for m in re.finditer(r"[^\n]*(?:\n|$)", text):
        line = m.group(0).rstrip("\n")
        if m.start() == len(text):
            break
        if fmt in ("md", "html"):
            if _FENCE.match(line):
                fenced = not fenced
                continue
            h = None if fenced else _MD_HEADING.match(line)
            if h:
                out.append((m.start(), m.end(), h.group(2).strip()))
        elif _is_text_heading(line):
            out.append((m.start(), m.end(), line.strip().strip("【】■□◆◇● ")))
    return out


def _cut_exact(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, str]]:
    """``(offset, piece)`` pieces of ``text[start:end]`` of at most ``max_chars``, cut at line
    boundaries (a longer line after a ``。``, else hard), balanced in size; each piece is an
    exact, stripped slice of ``text``."""
    units: list[tuple[int, int]] = []
    for m in re.finditer(r"[^\n]+", text[start:end]):
        a, b = start + m.start(), start + m.end()
        while b - a > max_chars:
            cut = text.rfind("。", a, a + max_chars) + 1 or a + max_chars
            if cut <= a:
                cut = a + max_chars
            units.append((a, cut))
            a = cut
        if text[a:b].strip():
            units.append((a, b))
    if not units:
        return []
    total = units[-1][1] - units[0][0]
    target = total / -(-total // max_chars)
    groups: list[list[tuple[int, int]]] = [[units[0]]]
    for u in units[1:]:
        size = groups[-1][-1][1] - groups[-1][0][0]
        if u[1] - groups[-1][0][0] > max_chars or size >= target:
            groups.append([u])
        else:
            groups[-1].append(u)
    pieces = []
    for g in groups:
        a, b = g[0][0], g[-1][1]
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            pieces.append((a, text[a:b]))
    return pieces


def document_sections(doc: Document, max_chars: int) -> list[Chunk]:
    """Cut a document into section pieces (headings per :func:`_headings`), in order.

    Text before the first heading is a section titled with the document title. Every
    chunk keeps its exact character offset in ``doc.text`` and (PDF) its 1-based page.
    """
    heads = _headings(doc.text, doc.fmt)
    spans: list[tuple[int, int, str]] = []
    first = heads[0][0] if heads else len(doc.text)
    if doc.text[:first].strip():
        spans.append((0, first, doc.title))
    for k, (_, body, title) in enumerate(heads):
        spans.append((body, heads[k + 1][0] if k + 1 < len(heads) else len(doc.text), title))
    chunks = []
    for s, (a, b, title) in enumerate(spans):
        for p, (offset, piece) in enumerate(_cut_exact(doc.text, a, b, max_chars)):
            page = bisect.bisect_right(doc.page_starts, offset) if doc.page_starts else None
            chunks.append(Chunk(offset, piece, title, s, p, page))
    return chunks


# --------------------------------------------------------------------------- files


@dataclasses.dataclass
class UserFile:
    """What one file held: mapped records (``pair``/``decision`` items with their location)
    and documents."""

    fmt: str
    encoding: str | None
    records: list[dict[str, Any]]
    documents: list[Document]


class TextPipeline:
    """Normalisation and personal-data masking of user text, with counts."""

    def __init__(self, normalize: str = "nfkc", pii_mask: bool = True) -> None:
        self.normalize = normalize
        self.pii_mask = pii_mask
        self.pii: Counter[str] = Counter()

    def __call__(self, text: str) -> str:
        text = normalize_text(text, self.normalize)
        return mask_text(text, self.pii) if self.pii_mask else text

    def item(self, item: dict[str, Any]) -> dict[str, Any]:
        """``item`` with its free-text fields passed through the pipeline (labels untouched)."""
        out = dict(item)
        for key in ("prompt", "response", "thinking", "reason", "text"):
            if isinstance(out.get(key), str):
                out[key] = self(out[key])
        return out


def _check_line_lengths(text: str, path: Path, max_chars: int) -> None:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if len(line) > max_chars:
            raise InputError(
                path,
                f"line of {len(line):,} characters, more than collect.max_record_chars = {max_chars:,} "
                "(minified or binary data?)",
                kind="huge_record",
                line=lineno,
            )


def records_to_items(
    raws: list[RawRecord], path: Path, pipeline: TextPipeline, bad: BadRecords
) -> tuple[list[dict[str, Any]], list[Document]]:
    """Map parsed records (bad ones through ``bad``): pair/decision items, and ``text`` documents."""
    items: list[dict[str, Any]] = []
    docs: list[Document] = []
    for raw in raws:
        try:
            item = map_record(raw.obj, path, line=raw.line, index=raw.index)
        except InputError as err:
            bad.handle(err)
            continue
        loc = {"line": raw.line, "index": raw.index}
        if item["kind"] == "text":
            docs.append(Document(pipeline(item["text"]), path.stem, "txt", line=raw.line, index=raw.index))
        else:
            items.append({**pipeline.item(item), **loc})
    return items, docs


def read_user_file(path: str | Path, max_chars: int, pipeline: TextPipeline, bad: BadRecords) -> UserFile:
    """Read one user file of a supported suffix (:data:`SUFFIX_FORMAT`).

    Raises:
        InputError: a file-level problem (encoding, binary, empty, JSON syntax, PDF);
            record-level problems go through ``bad``.
    """
    path = Path(path)
    fmt = SUFFIX_FORMAT[path.suffix.lower()]
    data = path.read_bytes()
    if fmt == "pdf":
        if not data:
            raise InputError(path, "empty file (0 bytes); expected a PDF", kind="empty_file")
        pages, title = read_pdf(data, path)
        pages = [pipeline(p) for p in pages]
        starts, offset = [], 0
        for p in pages:
            starts.append(offset)
            offset += len(p) + 2
        text = "\n\n".join(pages)
        first_line = next((line.strip() for line in text.split("\n") if line.strip()), "")
        doc_title = title or (first_line if len(first_line) <= 50 else path.stem)
        return UserFile(fmt, None, [], [Document(text, doc_title, "pdf", page_starts=starts)])
    text, encoding = decode_bytes(data, path)
    if fmt in ("json", "csv", "tsv"):
        rejected_before = len(bad.rejects)
        raws = (
            read_json_records(text, path, max_chars, bad)
            if fmt == "json"
            else read_csv_records(text, path, fmt == "tsv", max_chars, bad)
        )
        if not raws and len(bad.rejects) == rejected_before:
            raise InputError(path, "no records (an empty JSON array or a header without rows)", kind="empty_file")
        items, docs = records_to_items(raws, path, pipeline, bad)
        return UserFile(fmt, encoding, items, docs)
    _check_line_lengths(text, path, max_chars)
    html_title = ""
    if fmt == "html":
        text, html_title = html_to_text(text)
        if not text.strip():
            raise InputError(path, "no visible text in the HTML page", kind="no_text")
    text = pipeline(text)
    heads = _headings(text, fmt)
    title = pipeline(html_title) or (heads[0][2] if heads and fmt in ("md", "html") else path.stem)
    return UserFile(fmt, encoding, [], [Document(text, title, fmt)])


def read_hf_dataset(
    spec: str, split: str, pipeline: TextPipeline, bad: BadRecords
) -> tuple[UserFile, dict[str, Any]]:
    """Rows of a Hugging Face dataset: a ``save_to_disk`` folder, else a hub name.

    Returns:
        ``(UserFile, info)`` with info ``{"version", "licence", "fingerprint", "rows", "split"}``.

    Raises:
        InputError: the dataset cannot be loaded (missing folder, no hub access) or has
            no split ``split``.
    """
    import datasets

    where = f"collect.hf_datasets: {spec!r}"
    try:
        if Path(spec).is_dir():
            ds = datasets.load_from_disk(spec)
        else:
            ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # noqa: BLE001 - the hub and disk loaders raise many types
        raise InputError(
            where,
            f"could not load it ({type(e).__name__}: {str(e)[:200]}); expected a `save_to_disk` folder or a dataset "
            "name on a reachable Hugging Face hub",
            kind="hf_unavailable",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(
                where, f"no split {split!r} (collect.hf_split); it has {sorted(ds)}", kind="hf_unavailable"
            )
        ds = ds[split]
    raws = [RawRecord(row, index=k) for k, row in enumerate(ds)]
    items, docs = records_to_items(raws, Path(spec), pipeline, bad)
    info = {
        "version": str(ds.info.version) if ds.info.version else None,
        "licence": ds.info.license or "unknown (not in the dataset info)",
        "fingerprint": ds._fingerprint,
        "rows": len(raws),
        "split": split,
    }
    return UserFile("hf-dataset", None, items, docs), info
