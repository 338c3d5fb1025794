"""Exact and near-duplicate detection over canonical examples, streaming: the first occurrence is kept.

Exact: sha256 of the normalised text (lowercased, whitespace collapsed, `role: content` of every turn plus the tool
calls). Near: datasketch MinHash (128 permutations) of the character 5-grams of the normalised text (its words
joined by one space) without system turns. Character n-grams, not word shingles: on short prompts a rephrased
ending ("in plant leaves" / "in the leaves of plants") leaves few word 3-shingles in common (Jaccard 0.69-0.71 on
such pairs with their answer) but most character 5-grams (0.85-0.88), so the default threshold finds them; two
different questions with different answers stay far apart (0.51 for the capitals of France and Spain). System turns
are left out
(a system prompt shared by the whole dataset would make everything alike), MinHashLSH at a Jaccard
threshold for candidates, and the candidates' estimated Jaccard checked against the threshold again (LSH alone lets
some pairs below it through). The LSH looks for candidates from `threshold - REVIEW_MARGIN` up: those between that
bound and the threshold are kept (the first MAX_REVIEW) as similar pairs for a person to review, not dropped.
Memory: one digest per example and 128 uint32 per kept example, plus the LSH buckets.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

WORD = re.compile(r"\w+")
NUM_PERM = 128  # the estimate's standard error at J=0.85 is 0.03 (0.045 with 64: pairs at 0.87 estimated 0.77)
REVIEW_MARGIN = 0.15  # pairs this far below the threshold are listed as "similar pairs to review"
MAX_REVIEW = 50
SHINGLE = 5  # characters
BLOCK = 4096  # signatures are stored in blocks of BLOCK x num_perm uint32
DedupMode = Literal["none", "exact", "near"]


def normalised_text(messages: Iterable[dict], preference: dict[str, list[dict]] | None = None,
                    skip_system: bool = False) -> str:
    """Lowercased, whitespace-collapsed `role: content` of every turn (then the preference's chosen and rejected
    turns), tool calls as `call name arguments`. `skip_system` leaves system turns out: the near-duplicate text,
    so that a long system prompt shared by every example does not make unrelated examples look alike."""
    parts: list[str] = []
    sections: list[tuple[str, Iterable[dict]]] = [("", messages)]
    if preference is not None:
        sections += [("chosen ", preference["chosen"]), ("rejected ", preference["rejected"])]
    for prefix, turns in sections:
        for m in turns:
            if skip_system and m["role"] == "system":
                continue
            parts.append(f"{prefix}{m['role']}: {m.get('content') or ''}")
            for c in m.get("tool_calls") or ():
                parts.append(f"call {c['function']['name']} {c['function']['arguments']}")
    return " ".join("\n".join(parts).lower().split())  # str.split: the same whitespace as \s, in C


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_id(text: str) -> str:
    """An example's id: the first 16 hex digits of the sha256 of its normalised text."""
    return content_hash(text)[:16]


def shingles(text: str) -> list[bytes]:
    """Character 5-grams of a normalised text's words joined by one space (words: runs of letters and digits, so
    punctuation and spacing do not count), in first-seen order; a text shorter than that is its own shingle."""
    s = " ".join(WORD.findall(text))
    if len(s) <= SHINGLE:
        return [s.encode()] if s else []
    return list(dict.fromkeys(s[i:i + SHINGLE].encode() for i in range(len(s) - SHINGLE + 1)))


def _band_key(band: bytes) -> bytes:
    """LSH bucket keys as 8-byte digests instead of the band's 4*r bytes: less memory per bucket."""
    return hashlib.blake2b(band, digest_size=8).digest()


class Duplicate(BaseModel):
    kind: Literal["exact", "near"]
    of_line: int
    of_id: str
    similarity: float


class Cluster(BaseModel):
    """Duplicates of one kept example: members are (line, id), the kept one first."""

    kind: Literal["exact", "near"]
    members: list[tuple[int, str]]


class Deduplicator:
    def __init__(self, mode: DedupMode = "near", threshold: float = 0.8, num_perm: int = NUM_PERM):
        self.mode, self.threshold = mode, threshold
        self._exact: dict[bytes, int] = {}          # digest -> kept example's number
        self._kept: list[tuple[int, str]] = []      # kept example's number -> (line, id)
        self._clusters: dict[tuple[str, int], list[tuple[int, str]]] = {}  # (kind, kept number) -> members
        self.num_exact = self.num_near = 0
        self.review_from = max(0.05, threshold - REVIEW_MARGIN)
        self.review: list[dict[str, Any]] = []  # similar pairs below the threshold: {line, of_line, similarity}
        self.num_review = 0
        if mode == "near":
            from datasketch import MinHash, MinHashLSH

            # crc32 (C, deterministic) instead of the default per-shingle sha1: 5x faster, and the affine32 scheme
            # premixes every input hash with the MurmurHash3 finalizer anyway.
            self._mh = MinHash(num_perm=num_perm, seed=1, hashfunc=zlib.crc32)  # reused: cleared per example
            self._lsh = MinHashLSH(threshold=self.review_from, num_perm=num_perm, hashfunc=_band_key)
            self._sigs: list[np.ndarray] = []  # kept example n's signature: self._sigs[n // BLOCK][n % BLOCK]

    def _minhash(self, text: str):
        """The MinHash of a text, in the one reused MinHash object (its values are copied out when kept)."""
        m = self._mh
        m.clear()
        m.update_batch(shingles(text))
        return m

    def add(self, line: int, example_id: str, text: str, near_text: str | None = None) -> Duplicate | None:
        """Look at the next example (in file order): None when it is new (and now remembered), else what it
        duplicates. A duplicate is not remembered: later copies point at the first occurrence. `text` is the
        normalised text; `near_text` (default: text) the one MinHashed, e.g. without the system prompt."""
        if self.mode == "none":
            return None
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        first = self._exact.get(digest)
        if first is not None:
            return self._dup("exact", first, line, example_id, 1.0)
        mh = None
        near_text = text if near_text is None else near_text
        if self.mode == "near" and near_text:
            mh = self._minhash(near_text)
            best: tuple[int, float] | None = None
            similar: tuple[int, float] | None = None
            for key in self._lsh.query(mh):
                sig = self._sigs[key // BLOCK][key % BLOCK]
                sim = float(np.count_nonzero(sig == mh.hashvalues)) / len(mh.hashvalues)
                if sim >= self.threshold and (best is None or key < best[0]):
                    best = (key, sim)
                elif self.review_from <= sim < self.threshold and (similar is None or sim > similar[1]):
                    similar = (key, sim)
            if best is not None:
                return self._dup("near", best[0], line, example_id, best[1])
            if similar is not None:
                self.num_review += 1
                if len(self.review) < MAX_REVIEW:
                    self.review.append({"line": line, "id": example_id, "of_line": self._kept[similar[0]][0],
                                        "of_id": self._kept[similar[0]][1], "similarity": round(similar[1], 4)})
        n = len(self._kept)
        self._kept.append((line, example_id))
        self._exact[digest] = n
        if mh is not None:
            self._lsh.insert(n, mh, check_duplication=False)
            while len(self._sigs) * BLOCK <= n:
                self._sigs.append(np.empty((BLOCK, len(mh.hashvalues)), dtype=mh.hashvalues.dtype))
            self._sigs[-1][n % BLOCK] = mh.hashvalues
        return None

    def _dup(self, kind: Literal["exact", "near"], first: int, line: int, example_id: str, sim: float) -> Duplicate:
        if kind == "exact":
            self.num_exact += 1
        else:
            self.num_near += 1
        of_line, of_id = self._kept[first]
        self._clusters.setdefault((kind, first), [(of_line, of_id)]).append((line, example_id))
        return Duplicate(kind=kind, of_line=of_line, of_id=of_id, similarity=round(sim, 4))

    def clusters(self) -> list[Cluster]:
        """Every cluster, in the order of their kept examples."""
        return [Cluster(kind=kind, members=members)
                for (kind, _), members in sorted(self._clusters.items(), key=lambda kv: (kv[0][1], kv[0][0]))]

    def num_clusters(self) -> int:
        return len(self._clusters)


def cluster_dicts(clusters: Iterable[Cluster], limit: int) -> list[dict[str, Any]]:
    out = []
    for c in clusters:
        if len(out) == limit:
            break
        out.append({"kind": c.kind, "members": [list(m) for m in c.members]})
    return out
