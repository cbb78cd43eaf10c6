"""How a node's GPUs split into meshes, and where each mesh's GPUs are.

A node pattern is a multiset of mesh sizes (e.g. 4+2+1+1 of an 8-GPU node). Meshes take
consecutive GPU ids, largest first, so a mesh of 2^k GPUs starts at a multiple of 2^k.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol, TypeVar


class Mesh(Protocol):
    """Anything with a mesh size (a configuration, a greedy mesh)."""

    @property
    def size(self) -> int: ...


M = TypeVar("M", bound=Mesh)


def node_patterns(gpus_per_node: int, sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every maximal way to split a node into meshes of the given sizes, largest sizes first."""
    sizes = sorted({s for s in sizes if s <= gpus_per_node}, reverse=True)
    out: list[tuple[int, ...]] = []

    def grow(prefix: tuple[int, ...], room: int, start: int) -> None:
        extended = False
        for k in range(start, len(sizes)):
            if sizes[k] <= room:
                extended = True
                grow((*prefix, sizes[k]), room - sizes[k], k)
        if not extended and (not sizes or room < sizes[-1]):
            out.append(prefix)

    grow((), gpus_per_node, 0)
    return out


def layout(pattern: Sequence[int]) -> list[tuple[int, ...]]:
    """GPU ids (within the node) of each mesh of a pattern, in the pattern's order."""
    out, start = [], 0
    order = sorted(range(len(pattern)), key=lambda k: -pattern[k])
    ids: dict[int, tuple[int, ...]] = {}
    for k in order:
        ids[k] = tuple(range(start, start + pattern[k]))
        start += pattern[k]
    for k in range(len(pattern)):
        out.append(ids[k])
    return out


def cluster_groups(
    nodes: int, patterns: Sequence[tuple[int, ...]]
) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Per-node pattern choices for the whole cluster, one per distinct multiset of meshes.

    Nodes are identical, so the order of nodes does not matter (combinations with
    replacement), and two choices with the same mesh sizes overall are the same to an
    algorithm that ignores which node a mesh is on.
    """
    seen: set[tuple[int, ...]] = set()
    for combo in itertools.combinations_with_replacement(patterns, nodes):
        key = tuple(sorted((s for p in combo for s in p), reverse=True))
        if key in seen:
            continue
        seen.add(key)
        yield combo


def pattern_counts(
    patterns: Sequence[tuple[int, ...]], used_by_node: Sequence[Sequence[int]]
) -> list[int]:
    """How many nodes use each pattern, for nodes whose meshes have the given sizes.

    Each node gets the first pattern that contains its meshes (a node's meshes always came
    from some pattern, possibly with meshes left empty).
    """
    counts = [0] * len(patterns)
    for used in used_by_node:
        need = Counter(used)
        k = next(
            k for k, p in enumerate(patterns) if all(Counter(p)[s] >= c for s, c in need.items())
        )
        counts[k] += 1
    return counts


def positions(
    patterns: Sequence[tuple[int, ...]], counts: Sequence[int]
) -> dict[int, list[tuple[int, tuple[int, ...]]]]:
    """Per mesh size, the (node, GPU ids) of every mesh the chosen patterns make."""
    out: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    node = 0
    for p, count in zip(patterns, counts, strict=True):
        for _ in range(count):
            for size, gpus in zip(p, layout(p), strict=True):
                out.setdefault(size, []).append((node, gpus))
            node += 1
    return out


class MeshPacker:
    """Whether meshes of given sizes fit on the cluster's nodes (GPUs of a node may stay
    idle), and at which GPUs.

    Where every mesh size divides the next and the node's GPU count (1, 2, 4, 8 on 8 GPUs),
    meshes fit exactly when their GPUs add up to at most the cluster's, and first-fit in
    decreasing size places them aligned; otherwise a search over node patterns decides.
    """

    def __init__(self, nodes: int, gpus_per_node: int, sizes: Sequence[int]) -> None:
        self.nodes, self.gpus_per_node = nodes, gpus_per_node
        self.sizes = tuple(sorted({s for s in sizes if s <= gpus_per_node}))
        self.patterns = node_patterns(gpus_per_node, self.sizes)
        chain = all(b % a == 0 for a, b in itertools.pairwise(self.sizes))
        self.divisible = chain and all(gpus_per_node % s == 0 for s in self.sizes)
        self._least: dict[tuple[int, ...], tuple[int, tuple[int, ...] | None]] = {}

    def fits(self, counts: Mapping[int, int]) -> bool:
        """Whether `counts[s]` meshes of each size s fit on the nodes."""
        if any(c > 0 and s not in self.sizes for s, c in counts.items()):
            return False
        if self.divisible:
            return sum(s * c for s, c in counts.items()) <= self.nodes * self.gpus_per_node
        return self._nodes_needed(self._key(counts)) <= self.nodes

    def completes(self, counts: Mapping[int, int], closed: Iterable[int]) -> bool:
        """Whether some split of every node into maximal patterns has exactly `counts[s]` meshes
        of each closed size s and at least `counts[s]` of every other size.

        Exact where the sizes divide each other and the node (then a maximal split leaves no
        GPU idle); elsewhere, whether the meshes fit at all.
        """
        if not self.fits(counts):
            return False
        if not self.divisible:
            return True
        left = self.nodes * self.gpus_per_node - sum(s * c for s, c in counts.items())
        open_sizes = [s for s in self.sizes if s not in set(closed)]
        return left == 0 or (bool(open_sizes) and left % min(open_sizes) == 0)

    def place(self, sizes: Sequence[int]) -> list[tuple[int, tuple[int, ...]]] | None:
        """(node, GPU ids) of each mesh, in the order given; None if they do not fit."""
        if not self.fits(Counter(sizes)):
            return None
        order = sorted(range(len(sizes)), key=lambda k: -sizes[k])
        out: dict[int, tuple[int, tuple[int, ...]]] = {}
        if self.divisible:
            free = [0] * self.nodes
            for k in order:
                node = next(
                    n for n in range(self.nodes) if free[n] + sizes[k] <= self.gpus_per_node
                )
                out[k] = (node, tuple(range(free[node], free[node] + sizes[k])))
                free[node] += sizes[k]
            return [out[k] for k in range(len(sizes))]
        left = self._key(Counter(sizes))
        waiting = {s: [k for k in order if sizes[k] == s] for s in self.sizes}
        node = 0
        while any(left):
            _, pattern = self._least[left]
            assert pattern is not None
            slots = dict.fromkeys(self.sizes, 0)
            for size, gpus in zip(pattern, layout(pattern), strict=True):
                if slots[size] < left[self.sizes.index(size)] and waiting[size]:
                    out[waiting[size].pop(0)] = (node, gpus)
                    slots[size] += 1
            left = tuple(max(c - slots[s], 0) for s, c in zip(self.sizes, left, strict=True))
            node += 1
        return [out[k] for k in range(len(sizes))]

    def by_node(self, meshes: Sequence[M]) -> list[list[M]] | None:
        """The meshes `place` puts on each node, in the order given; None if they do not fit."""
        where = self.place([m.size for m in meshes])
        if where is None:
            return None
        out: list[list[M]] = [[] for _ in range(self.nodes)]
        for mesh, (node, _) in zip(meshes, where, strict=True):
            out[node].append(mesh)
        return out

    def _key(self, counts: Mapping[int, int]) -> tuple[int, ...]:
        return tuple(counts.get(s, 0) for s in self.sizes)

    def _nodes_needed(self, need: tuple[int, ...]) -> int:
        """The fewest nodes that hold `need` (per size), remembering the pattern of the first."""
        if not any(need):
            return 0
        if need not in self._least:
            best: tuple[int, tuple[int, ...] | None] = (1 << 30, None)
            for p in self.patterns:
                rest = tuple(max(c - p.count(s), 0) for s, c in zip(self.sizes, need, strict=True))
                if rest != need:
                    best = min(best, (1 + self._nodes_needed(rest), p), key=lambda b: b[0])
            self._least[need] = best
        return self._least[need][0]
