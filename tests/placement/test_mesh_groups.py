from __future__ import annotations

from dataclasses import dataclass

from placement.mesh_groups import (
    MeshPacker,
    cluster_groups,
    layout,
    node_patterns,
    pattern_counts,
    positions,
)


@dataclass(frozen=True)
class _Mesh:
    name: str
    size: int


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


def test_by_node_keeps_each_nodes_meshes_in_the_order_given() -> None:
    packer = MeshPacker(2, 4, (1, 2, 4))
    meshes = [_Mesh("a", 2), _Mesh("b", 4), _Mesh("c", 1), _Mesh("d", 1)]
    # largest first: b fills node 0, then a, c, d go to node 1
    assert packer.by_node(meshes) == [[meshes[1]], [meshes[0], meshes[2], meshes[3]]]
    assert packer.by_node([]) == [[], []]
    assert packer.by_node([*meshes, _Mesh("e", 1)]) is None  # 9 GPUs on 8


def test_by_node_without_divisible_sizes() -> None:
    packer = MeshPacker(2, 4, (1, 3))  # node patterns 3+1 and 1+1+1+1
    assert not packer.divisible
    meshes = [_Mesh("a", 1), _Mesh("b", 3), _Mesh("c", 3)]
    # node 0 takes the pattern 3+1 (b and a), node 1 the other 3 (c)
    assert packer.by_node(meshes) == [[meshes[0], meshes[1]], [meshes[2]]]
    assert packer.by_node([*meshes, _Mesh("d", 1), _Mesh("e", 1)]) is None
