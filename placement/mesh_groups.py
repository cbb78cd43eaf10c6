"""How a node's GPUs split into meshes, and where each mesh's GPUs are.

A node pattern is a multiset of mesh sizes (e.g. 4+2+1+1 of an 8-GPU node). Meshes take
consecutive GPU ids, largest first, so a mesh of 2^k GPUs starts at a multiple of 2^k.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Sequence


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
