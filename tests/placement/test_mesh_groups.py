from __future__ import annotations

from placement.mesh_groups import cluster_groups, layout, node_patterns, pattern_counts, positions


def test_patterns_of_an_8_gpu_node() -> None:
    assert node_patterns(8, (1, 2, 4, 8)) == [
        (8,),
        (4, 4),
        (4, 2, 2),
        (4, 2, 1, 1),
        (4, 1, 1, 1, 1),
        (2, 2, 2, 2),
        (2, 2, 2, 1, 1),
        (2, 2, 1, 1, 1, 1),
        (2, 1, 1, 1, 1, 1, 1),
        (1, 1, 1, 1, 1, 1, 1, 1),
    ]
    assert node_patterns(6, (1, 2, 4, 8)) == [
        (4, 2),
        (4, 1, 1),
        (2, 2, 2),
        (2, 2, 1, 1),
        (2, 1, 1, 1, 1),
        (1, 1, 1, 1, 1, 1),
    ]
    assert node_patterns(3, (2,)) == [(2,)]  # maximal: one GPU stays idle


def test_layout_is_aligned() -> None:
    assert layout((2, 4, 1, 1)) == [(4, 5), (0, 1, 2, 3), (6,), (7,)]


def test_cluster_groups_dedupe_identical_multisets() -> None:
    groups = list(cluster_groups(2, node_patterns(2, (1, 2))))
    assert groups == [((2,), (2,)), ((2,), (1, 1)), ((1, 1), (1, 1))]
    # 4 nodes of 8: 715 combinations, fewer distinct multisets of meshes
    assert len(list(cluster_groups(4, node_patterns(8, (1, 2, 4, 8))))) < 715


def test_pattern_counts_and_positions() -> None:
    pats = node_patterns(4, (1, 2, 4))
    assert pats == [(4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)]
    counts = pattern_counts(pats, [[2, 1], [4]])
    assert counts == [1, 0, 1, 0]
    assert positions(pats, counts) == {
        4: [(0, (0, 1, 2, 3))],
        2: [(1, (0, 1))],
        1: [(1, (2,)), (1, (3,))],
    }
