"""Memory banks on faiss: the normal bank Mn and the abnormal bank Ma with its parts kept apart.

Every bank entry carries its provenance: the part it belongs to, the category it came from and the image
it came from (``source``: the first 60 bits of the image's SHA-256, or -1 for synthetic entries such as
anomaly-centre perturbations). The source lets training exclude self-matches: a training patch never
takes its nearest neighbour from its own image, so its distances look like a test patch's.

The faiss index is built once per bank and saved next to it; nothing rebuilds it at prediction time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from dmad_core.config import BankConfig
from dmad_core.devices import index_for_saving, index_on_best_device

NORMAL = "normal"
OUTLIER = "outlier"  # Mo: outlier textures fused with normal features
SEEN = "seen"  # Mas: filtered features of annotated defects (mask-covered patches)
WEAK = "weak"  # defects annotated without a mask: the image's highest-scoring patches (weaker evidence)
CENTRE = "centre"  # Mp: anomaly-centre perturbations
ABNORMAL_PARTS = (OUTLIER, SEEN, WEAK, CENTRE)


def source_id(image_hash: str) -> int:
    """A compact integer identity of an image for bank provenance (collisions need 2^30 images)."""
    return int(image_hash[:15], 16)


def _rows_by_category(categories: np.ndarray) -> dict[str, np.ndarray]:
    return {str(c): np.flatnonzero(categories == c) for c in np.unique(categories)}


@dataclass
class BankPart:
    """Vectors of one part with their provenance, row for row."""

    vectors: np.ndarray  # (M, C) float32
    sources: np.ndarray  # (M,) int64, -1 when synthetic
    categories: np.ndarray  # (M,) str

    @staticmethod
    def empty(dim: int) -> BankPart:
        return BankPart(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, dtype="<U64"))

    def __len__(self) -> int:
        return len(self.vectors)

    @staticmethod
    def concat(parts: list[BankPart], dim: int) -> BankPart:
        parts = [p for p in parts if len(p)]
        if not parts:
            return BankPart.empty(dim)
        return BankPart(
            np.concatenate([p.vectors for p in parts]).astype(np.float32),
            np.concatenate([p.sources for p in parts]).astype(np.int64),
            np.concatenate([p.categories.astype("<U64") for p in parts]),
        )


@dataclass
class MemoryBank:
    """A union of named parts searched through one faiss index.

    Example:
        >>> bank = MemoryBank(dim=4)
        >>> bank.set_part("normal", BankPart(np.eye(4, dtype=np.float32), np.arange(4), np.array(["a"] * 4)))
        >>> bank.build_index(BankConfig(index="flat"))
        >>> dist, idx = bank.search(np.eye(4, dtype=np.float32)[:1])
        >>> int(idx[0])
        0
    """

    dim: int
    parts: dict[str, BankPart] = field(default_factory=dict)
    index_: faiss.Index | None = None
    union_: BankPart | None = None
    part_of_: np.ndarray | None = None  # (M,) index into part names, row for row with union_
    exact_search_max_: int = 0  # see BankConfig.exact_search_max
    _exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # vectors, squared norms, sources
    category_rows_: dict[str, np.ndarray] = field(default_factory=dict)  # class -> its union rows

    def set_part(self, name: str, part: BankPart) -> None:
        if part.vectors.ndim != 2 or part.vectors.shape[1] != self.dim:
            raise ValueError(f"part {name!r} has shape {part.vectors.shape}, bank dim is {self.dim}")
        self.parts[name] = part
        self.index_ = None  # stale: must be rebuilt once before the next search
        self._exact = None

    def part_sizes(self) -> dict[str, int]:
        return {name: len(p) for name, p in self.parts.items()}

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.values())

    @property
    def vectors(self) -> np.ndarray:
        assert self.union_ is not None, "build_index() first"
        return self.union_.vectors

    def _set_union(self, config: BankConfig) -> None:
        """The union of the parts and what is derived from it (row -> part, class -> rows), after the parts
        changed (``build_index``) or were loaded (``load``)."""
        names = list(self.parts)
        self.union_ = BankPart.concat([self.parts[n] for n in names], self.dim)
        self.part_of_ = np.concatenate(
            [np.full(len(self.parts[n]), i, np.int16) for i, n in enumerate(names)] or [np.zeros(0, np.int16)]
        )
        self._part_names = names
        self.exact_search_max_ = config.exact_search_max
        self._exact = None
        self.category_rows_ = _rows_by_category(self.union_.categories)

    def build_index(self, config: BankConfig) -> None:
        self._set_union(config)
        assert self.union_ is not None  # set by _set_union
        index: faiss.Index
        if config.index == "hnsw" and len(self.union_) > 2048:
            index = faiss.IndexHNSWFlat(self.dim, config.hnsw_m)
            index.hnsw.efConstruction = 64
            index.hnsw.efSearch = config.hnsw_ef_search
        else:
            index = faiss.IndexFlatL2(self.dim)
        if len(self.union_):
            index.add(np.ascontiguousarray(self.union_.vectors, dtype=np.float32))
        self.index_ = index_on_best_device(faiss, index)

    def part_names_of(self, idx: np.ndarray) -> np.ndarray:
        assert self.part_of_ is not None, "build_index() first"
        return np.asarray(self._part_names)[self.part_of_[idx]]

    def search(
        self, queries: np.ndarray, exclude_sources: np.ndarray | None = None, k_exclude: int = 16,
        category: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entry for each query: (squared distances (n,), indices (n,) into the union).

        ``exclude_sources`` (n,): each query's own image id; entries of that image are skipped (the first of
        ``k_exclude`` neighbours from another image is taken; if all come from the same image, the last).
        ``category``: the queries' class, to search only the entries of that class (a class-aware memory,
        see ``BankConfig.class_aware``); a class the bank has no entry of searches the whole bank.
        """
        if self.index_ is None:
            raise RuntimeError("bank index not built: call build_index() once after changing parts")
        assert self.union_ is not None  # built with the index
        if len(self.union_) == 0:
            raise RuntimeError("bank is empty")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        rows = self.category_rows_.get(category) if category is not None else None
        if rows is not None and len(rows) < len(self.union_):
            return self._search_rows(q, exclude_sources, rows, k_exclude)
        if len(self.union_) <= self.exact_search_max_:
            return self._exact_nearest(q, exclude_sources)
        if exclude_sources is None:
            d, i = self.index_.search(q, 1)
            return d[:, 0], i[:, 0]
        d, i, _ = self._first_allowed(q, exclude_sources, None, k_exclude)
        return d, i

    def _first_allowed(self, q: np.ndarray, exclude_sources: np.ndarray | None, rows: np.ndarray | None,
                       k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Of the index's ``k`` nearest entries, the first allowed one (not of the query's own image; in
        ``rows`` if given), or the last one where none is: (distances (n,), indices (n,), found (n,))."""
        assert self.union_ is not None and self.index_ is not None, "build_index() first"
        k = int(min(k, len(self.union_)))
        d, i = self.index_.search(q, k)
        ok = i >= 0  # faiss pads missing neighbours with index -1
        i = np.where(ok, i, 0)
        if rows is not None:
            ok &= np.isin(i, rows)
        if exclude_sources is not None:
            ok &= self.union_.sources[i] != exclude_sources[:, None]
        found: np.ndarray = np.asarray(ok.any(axis=1))
        first = np.where(found, ok.argmax(axis=1), k - 1)
        at = np.arange(len(q))
        return d[at, first], i[at, first], found

    def _search_rows(self, q: np.ndarray, exclude_sources: np.ndarray | None, rows: np.ndarray,
                     k_exclude: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entry among the union rows ``rows`` (one class). Few rows: exact. Many: the index's
        ``k_exclude`` nearest, the first that is in ``rows`` (and not the query's own image); a query with
        none of them there is answered exactly."""
        if len(rows) <= self.exact_search_max_:
            d, i = self._exact_nearest(q, exclude_sources, rows=rows)
            return d, rows[i]
        dist, idx, found = self._first_allowed(q, exclude_sources, rows, k_exclude)
        if not found.all():
            miss = ~found
            d_m, i_m = self._exact_nearest(q[miss], None if exclude_sources is None else exclude_sources[miss],
                                           rows=rows)
            dist[miss], idx[miss] = d_m, rows[i_m]
        return dist, idx

    def part_rows(self, name: str) -> tuple[int, int]:
        """The rows [start, stop) of the union (and of search results) that hold part ``name``."""
        if self.union_ is None:
            raise RuntimeError("bank index not built: call build_index() once after changing parts")
        start = 0
        for part_name in self._part_names:
            stop = start + len(self.parts[part_name])
            if part_name == name:
                return start, stop
            start = stop
        raise KeyError(f"bank has no part {name!r}")

    def search_part(self, name: str, queries: np.ndarray, exclude_sources: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entry of one part only, searched exactly: (squared distances, indices *within the
        part*). Lets a caller cache the neighbours in a part that does not change while others do. A query
        whose every entry in the part comes from its own image (``exclude_sources``) has no neighbour there:
        distance +inf."""
        start, stop = self.part_rows(name)
        if stop == start:
            raise RuntimeError(f"part {name!r} is empty")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self._exact_nearest(q, exclude_sources, rows=(start, stop), keep_own_when_alone=False)

    def _exact_nearest(self, q: np.ndarray, exclude_sources: np.ndarray | None = None,
                       block: int = 1024, rows: tuple[int, int] | np.ndarray | None = None,
                       keep_own_when_alone: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Exact 1-NN by ``|b|^2 - 2 q.b`` (the query's own norm does not change the argmin) over blocks of
        queries, so that a block's distance matrix stays small. With ``exclude_sources`` a query's own image's
        entries are masked out (a query whose every candidate is its own image keeps its nearest anyway, or,
        with ``keep_own_when_alone`` False, gets distance +inf). The returned squared distance is recomputed
        directly from the chosen entry. ``rows`` restricts the search to union rows [start, stop) (indices
        are then relative to ``start``); an index array restricts it to those rows (indices then index
        that array)."""
        if self._exact is None:
            assert self.union_ is not None, "build_index() first"
            vectors = torch.from_numpy(np.ascontiguousarray(self.union_.vectors, dtype=np.float32))
            self._exact = (vectors, (vectors * vectors).sum(1), torch.from_numpy(self.union_.sources))
        vectors, norms, bank_sources = self._exact
        if isinstance(rows, np.ndarray):
            take = torch.from_numpy(rows)
            vectors, norms, bank_sources = (t[take] for t in (vectors, norms, bank_sources))
        elif rows is not None:
            vectors, norms, bank_sources = (t[rows[0]:rows[1]] for t in (vectors, norms, bank_sources))
        queries = torch.from_numpy(q)
        own = None if exclude_sources is None else torch.from_numpy(np.asarray(exclude_sources, np.int64))
        idx = torch.empty(len(q), dtype=torch.int64)
        with torch.inference_mode():
            for start in range(0, len(q), block):
                scores = torch.addmm(norms[None, :], queries[start:start + block], vectors.T, alpha=-2)
                if own is not None:
                    same = own[start:start + block, None] == bank_sources[None, :]
                    if keep_own_when_alone:
                        same &= ~same.all(1, keepdim=True)
                    scores.masked_fill_(same, float("inf"))
                idx[start:start + block] = scores.argmin(1)
            dist = ((queries - vectors[idx]) ** 2).sum(1)
            if own is not None and not keep_own_when_alone:
                dist[own == bank_sources[idx]] = float("inf")
        return dist.numpy(), idx.numpy()

    # -- persistence: parts as .npz, the index as a faiss file, all under one folder ---------------------
    def save(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for part_name, part in self.parts.items():
            np.savez(folder / f"{name}.{part_name}.npz", vectors=part.vectors.astype(np.float32),
                     sources=part.sources, categories=part.categories.astype("<U64"))
        (folder / f"{name}.json").write_text(json.dumps({"dim": self.dim, "parts": list(self.parts),
                                                         "sizes": self.part_sizes()}))
        if self.index_ is not None:
            faiss.write_index(index_for_saving(faiss, self.index_), str(folder / f"{name}.faiss"))

    @staticmethod
    def load(folder: Path, name: str, config: BankConfig) -> MemoryBank:
        meta = json.loads((folder / f"{name}.json").read_text())
        bank = MemoryBank(dim=meta["dim"])
        for part_name in meta["parts"]:
            z = np.load(folder / f"{name}.{part_name}.npz")
            bank.parts[part_name] = BankPart(z["vectors"].astype(np.float32), z["sources"], z["categories"])
        index_path = folder / f"{name}.faiss"
        bank._set_union(config)
        if index_path.exists():
            bank.index_ = index_on_best_device(faiss, faiss.read_index(str(index_path)))
        else:
            bank.build_index(config)
        return bank
