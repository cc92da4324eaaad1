"""Near-duplicates across splits: every pair of images whose hashes are within `hashing.THRESHOLD` bits, found through
a band index instead of comparing all pairs, plus exact duplicates by content digest.

The bound (why nothing within the threshold is missed): each 64-bit hash is cut into BANDS = 4 bands of 16 bits. If
two hashes differ in at most t bits, then by pigeonhole at least one band differs in at most t // 4 bits (were all
four bands over t // 4, the total would be over t). So for each band and each 16-bit value within t // 4 bits of a
hash's band (1 + 16 + 120 = 137 values at t = 10), the index looks up the images holding that band value: every pair
within t bits is a candidate, and only candidates get their full distance computed. With two hashes per image (full
frame and centre, `hashing.image_hashes`) all four hash combinations are indexed the same way.

Cost: 4 x 137 bucket look-ups per hash, vectorised with numpy, plus one exact check per candidate (a pair that meets
in two different buckets is expanded from the lower one only); candidates grow
with n^2 x 137 / 65536 per band for uniformly spread hashes (about 0.8 % of all pairs, where the brute force checks
100 %). Measured on this machine (docs/data-checks.md): 100,000 images (2 hashes each) in 16 s on one core
of numpy in chunks, before the lower-bucket rule; 15,000 (10x flowers) in 0.24 s with it (0.46 s without).

Everything returned is sorted, so the output does not depend on the order of the records or on the runner.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from kfp_finetune.components.dataprofile.hashing import HASH_BITS, THRESHOLD
from kfp_finetune.components.dataprofile.stats import ImageStats

BANDS = 4
BAND_BITS = HASH_BITS // BANDS
assert BAND_BITS <= 16  # band values are uint16 in _near_index_pairs
_CHUNK = 1 << 18  # candidate pairs checked per numpy step (bounds memory: a few MB per step)


@dataclass(frozen=True, order=True)
class HashRecord:
    """One kept image as the leakage check sees it.

    id: a stable, runner-independent identifier (the ingest uses the content SHA-256, as the split rule does);
    split, label: where it is and what it is; hashes: `hashing.image_hashes(...)` (full frame, centre);
    name: what the report shows (the file path or gs:// URI); digest: the content digest for exact duplicates
    ('' when unknown: then only the hashes count).
    """

    id: str
    split: str
    label: str
    hashes: tuple[int, ...]
    name: str = ""
    digest: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "split": self.split, "label": self.label, "name": self.name, "digest": self.digest,
                "hashes": [f"{h:016x}" for h in self.hashes]}

    @classmethod
    def from_stats(cls, id: str, split: str, label: str, stats: ImageStats, name: str = "",
                   digest: str = "") -> HashRecord:
        """The record of one image whose `stats.image_stats` are known (the usual way to make one)."""
        return cls(id=id, split=split, label=label, hashes=tuple(stats.hashes), name=name, digest=digest)

    @classmethod
    def from_json(cls, data: dict) -> HashRecord:
        return cls(id=data["id"], split=data["split"], label=data["label"], name=data.get("name", ""),
                   digest=data.get("digest", ""), hashes=tuple(int(h, 16) for h in data["hashes"]))


@dataclass(frozen=True, order=True)
class Pair:
    """Two images within the threshold; a < b (by id). kind: 'exact' (same digest) or 'near'."""

    a: str
    b: str
    distance: int
    kind: str


def _ball(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-bit mask with at most `radius` bits set (the XORs that reach the values within `radius`)."""
    masks = [0]
    for r in range(1, radius + 1):
        for combo in itertools.combinations(range(bits), r):
            masks.append(sum(1 << i for i in combo))
    return np.array(masks, dtype=np.int64)


def _distances(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """hashing.distance for each (a[i], b[i]) pair of rows of `hashes` (n, k) uint64: the smallest of k*k."""
    best = None
    for x in range(hashes.shape[1]):
        for y in range(hashes.shape[1]):
            d = np.bitwise_count(hashes[a, x] ^ hashes[b, y])
            best = d if best is None else np.minimum(best, d)
    return best.astype(np.int64)


def _near_index_pairs(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """(i, j), i < j, of rows of `hashes` within `threshold` (see the module docstring for the bound).

    Per band, every (entry, mask) probe of a chunk of entries is looked up in one numpy step (not one step per mask:
    137 masks made the small sets overhead-bound, 0.04 s for 1,500 images)."""
    n, k = hashes.shape
    if n < 2:
        return set()
    owner = np.repeat(np.arange(n, dtype=np.int64), k)
    flat = hashes.reshape(-1)
    # 16-bit band values and masks (BAND_BITS = 16): a quarter of the memory traffic of int64 probes.
    masks = _ball(BAND_BITS, threshold // BANDS).astype(np.uint16)
    step = max(1, _CHUNK // masks.size)  # entries per lookup: about _CHUNK probes at once
    found: set[tuple[int, int]] = set()
    for band in range(BANDS):
        values = ((flat >> np.uint64(band * BAND_BITS)) & np.uint64((1 << BAND_BITS) - 1)).astype(np.uint16)
        order = np.argsort(values, kind="stable")
        counts = np.bincount(values, minlength=1 << BAND_BITS)
        occupied = counts > 0
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        for e0 in range(0, values.size, step):
            chunk = values[e0 : e0 + step, None]
            probe = (chunk ^ masks[None, :]).ravel()
            # Each pair of buckets once: a hash looks up only buckets above its own (and its own), so a pair that
            # meets across two buckets is expanded from its lower bucket alone (about half the candidates).
            queries = np.flatnonzero(occupied[probe] & (probe >= np.repeat(chunk.ravel(), masks.size)))
            if not queries.size:
                continue
            query_entry = e0 + queries // masks.size
            query_start, query_hits = starts[probe[queries]], counts[probe[queries]]
            # Expand each query into its bucket's entries, in chunks of about _CHUNK pairs.
            bounds = np.searchsorted(np.cumsum(query_hits), np.arange(_CHUNK, int(query_hits.sum()) + _CHUNK, _CHUNK))
            lo = 0
            for hi in np.unique(np.append(bounds + 1, queries.size)):
                hi = int(min(hi, queries.size))
                if hi <= lo:
                    continue
                c = query_hits[lo:hi]
                total = int(c.sum())
                first = np.repeat(query_start[lo:hi], c)
                offset = np.arange(total) - np.repeat(np.cumsum(c) - c, c)
                ea = np.repeat(query_entry[lo:hi], c)
                eb = order[first + offset]
                a, b = owner[ea], owner[eb]
                # Only the hash pair that met in this band is compared: a pair within the threshold has a closest
                # hash pair, and that pair meets in some band (the bound above), so it is found there. The reported
                # distance (the closest of all k*k) is computed once per found pair afterwards.
                keep = (a != b) & (np.bitwise_count(flat[ea] ^ flat[eb]) <= threshold)
                if keep.any():
                    a, b = a[keep], b[keep]
                    found.update(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist(), strict=True))
                lo = hi
    return found


def find_pairs(records: Iterable[HashRecord], threshold: int = THRESHOLD, cross_split_only: bool = False) -> list[Pair]:
    """Every pair of records within `threshold` bits (`hashing.distance`), or with the same non-empty digest.

    Sorted by (a, b). With cross_split_only, only pairs whose records sit in different splits.
    Ids must be unique.
    """
    recs = sorted(records, key=lambda r: r.id)
    ids = [r.id for r in recs]
    if len(set(ids)) != len(ids):
        dup = next(i for i, x in enumerate(ids[1:]) if x == ids[i])
        raise ValueError(f"record ids must be unique; {ids[dup]!r} appears more than once")
    if not recs:
        return []
    k = max(len(r.hashes) for r in recs)
    if min(len(r.hashes) for r in recs) < 1:
        raise ValueError("every record needs at least one hash")
    hashes = np.array([list(r.hashes) + [r.hashes[0]] * (k - len(r.hashes)) for r in recs], dtype=np.uint64)
    found = {(i, j): int(d) for (i, j), d in _with_distances(hashes, _near_index_pairs(hashes, threshold)).items()}
    exact: set[tuple[int, int]] = set()
    by_digest: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        if r.digest:
            by_digest.setdefault(r.digest, []).append(i)
    for members in by_digest.values():
        for i, j in itertools.combinations(members, 2):
            exact.add((i, j))
    pairs = []
    for i, j in sorted(set(found) | exact):
        if cross_split_only and recs[i].split == recs[j].split:
            continue
        if (i, j) in exact:
            pairs.append(Pair(ids[i], ids[j], 0, "exact"))
        else:
            pairs.append(Pair(ids[i], ids[j], found[(i, j)], "near"))
    return pairs


def _with_distances(hashes: np.ndarray, pairs: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
    if not pairs:
        return {}
    ij = np.array(sorted(pairs), dtype=np.int64)
    d = _distances(hashes, ij[:, 0], ij[:, 1])
    return {(int(i), int(j)): int(x) for (i, j), x in zip(ij, d, strict=True)}


def brute_force_pairs(records: Sequence[HashRecord], threshold: int = THRESHOLD) -> list[tuple[str, str, int]]:
    """All-pairs reference for tests: (a, b, distance) of records within `threshold`, a < b, sorted."""
    from kfp_finetune.components.dataprofile.hashing import distance

    recs = sorted(records, key=lambda r: r.id)
    out = []
    for x, y in itertools.combinations(recs, 2):
        d = distance(x.hashes, y.hashes)
        if d <= threshold:
            out.append((x.id, y.id, d))
    return out
