"""Exact and near-duplicate removal of supervised records.

* Exact: two records are duplicates when their prompts are equal after NFKC, case
  folding and removing all white space (:func:`exact_key`). The first is kept; when the
  two carry different decisions the pair is also counted as a label conflict.
* Near: MinHash (Broder 1997, "On the resemblance and containment of documents") over
  the set of character 5-grams of ``prompt + "\\n" + response`` (after :func:`exact_key`),
  128 permutations, with datasketch's LSH index (Leskovec, Rajaraman, Ullman, *Mining
  of Massive Datasets*, ch. 3). A record is removed when its estimated Jaccard
  similarity to a kept record **of another group** reaches the threshold. Records of one
  group (variants of one template, questions about one section) are near-duplicates by
  design and always land in the same split, so they never remove each other; across
  groups a near-duplicate would leak between train and test.

Both passes keep the input order and are deterministic (fixed MinHash seed).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

NGRAM = 5
NUM_PERM = 128
MINHASH_SEED = 1

_SPACE = re.compile(r"\s+")


def exact_key(text: str) -> str:
    """``text`` after NFKC, case folding and removal of all white space."""
    return _SPACE.sub("", unicodedata.normalize("NFKC", text).casefold())


def exact_duplicates(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int], int]:
    """Drop records whose prompt (:func:`exact_key`) already occurred; the first is kept.

    Returns:
        ``(kept, removed per task, label conflicts)``; a conflict is a removed record whose
        decision differs from the kept one's.
    """
    first: dict[str, dict[str, Any]] = {}
    kept, removed, conflicts = [], Counter(), 0
    for r in records:
        key = exact_key(r["prompt"])
        if key in first:
            removed[r["task"]] += 1
            conflicts += first[key].get("decision") != r.get("decision")
            continue
        first[key] = r
        kept.append(r)
    return kept, dict(sorted(removed.items())), conflicts


def _shingles(text: str) -> list[bytes]:
    key = exact_key(text)
    if len(key) <= NGRAM:
        return [key.encode("utf-8")]
    return [key[i : i + NGRAM].encode("utf-8") for i in range(len(key) - NGRAM + 1)]


def near_duplicates(
    records: list[dict[str, Any]], threshold: float
) -> tuple[list[dict[str, Any]], dict[str, int], list[dict[str, Any]]]:
    """Drop records that near-duplicate a kept record of another group (see the module docstring).

    Args:
        records: dicts with ``id``, ``task``, ``group``, ``prompt``, ``response``.
        threshold: estimated Jaccard similarity in (0, 1] at which a record is removed.

    Returns:
        ``(kept, removed per task, pairs)``; pairs ``{"removed", "kept", "jaccard"}`` (ids).
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    texts = [f"{r['prompt']}\n{r['response']}" for r in records]
    hashes = MinHash.bulk([_shingles(t) for t in texts], num_perm=NUM_PERM, seed=MINHASH_SEED)
    kept: list[dict[str, Any]] = []
    by_key: dict[str, tuple[dict[str, Any], Any]] = {}
    removed: Counter[str] = Counter()
    pairs = []
    for k, (r, mh) in enumerate(zip(records, hashes)):
        match = None
        for key in sorted(lsh.query(mh), key=lambda x: int(x)):
            other, other_mh = by_key[key]
            if other["group"] != r["group"] and (j := mh.jaccard(other_mh)) >= threshold:
                match = (other, j)
                break
        if match is not None:
            removed[r["task"]] += 1
            pairs.append({"removed": r["id"], "kept": match[0]["id"], "jaccard": round(float(match[1]), 3)})
            continue
        by_key[str(k)] = (r, mh)
        lsh.insert(str(k), mh)
        kept.append(r)
    return kept, dict(sorted(removed.items())), pairs
