"""The toy harness's perturbations (g4seg/toy/perturb.py) on hand-made maps, each expected map built
independently (loops over pixels, brute-force distances), plus seeding and names."""

import itertools

import numpy as np
import pytest

from g4seg.errors import G4SegError
from g4seg.toy import perturb as P
from g4seg.toy.scenes import make_scene


def brute_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest pixel of ``mask`` (inf when empty), by brute force."""
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    if ys.size == 0:
        return np.full(mask.shape, np.inf)
    return np.sqrt(((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).min(axis=-1))


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_dilating_one_pixel_gives_the_disc(radius):
    labels = np.zeros((15, 15), np.uint8)
    labels[7, 7] = 3
    expected = np.zeros_like(labels)
    for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
        if dy * dy + dx * dx <= radius * radius:
            expected[7 + dy, 7 + dx] = 3
    assert np.array_equal(P.dilate(labels, radius), expected)


def test_dilation_at_the_border_and_between_objects():
    labels = np.zeros((12, 12), np.uint8)
    labels[0, 0] = 1  # corner: the disc is cut by the border
    labels[6:8, 4:6] = 2
    labels[6:8, 6:8] = 4  # touching object of another class
    out = P.dilate(labels, 2)
    objects = labels > 0
    assert np.array_equal(out[objects], labels[objects])  # objects never grow into each other
    for k in (1, 2, 4):  # every new pixel takes the class of its nearest object pixel (where that is unique)
        near_k = brute_distance(labels == k)
        others = np.min([brute_distance(labels == j) for j in (1, 2, 4) if j != k], axis=0)
        grown = ~objects & (near_k <= 2) & (near_k < others)
        assert (out[grown] == k).all()
    reach = np.min([brute_distance(labels == j) for j in (1, 2, 4)], axis=0)
    assert np.array_equal(out > 0, reach <= 2)


@pytest.mark.parametrize("radius", [1, 2])
def test_eroding_a_square_removes_radius_rows_on_each_side(radius):
    labels = np.zeros((16, 16), np.uint8)
    labels[3:13, 2:12] = 5  # 10 x 10
    expected = np.zeros_like(labels)
    expected[3 + radius:13 - radius, 2 + radius:12 - radius] = 5
    assert np.array_equal(P.erode(labels, radius), expected)


def test_erosion_keeps_the_border_side_and_separates_touching_objects():
    labels = np.zeros((10, 10), np.uint8)
    labels[0:4, 0:10] = 1  # touches the top, left and right borders
    labels[4:8, 0:10] = 2  # touches object 1
    out = P.erode(labels, 1)
    expected = np.zeros_like(labels)
    expected[0:3, :] = 1  # only the row next to class 2 goes
    expected[5:7, :] = 2  # rows next to class 1 and to the background go
    assert np.array_equal(out, expected)
    assert np.array_equal(P.erode(np.full((5, 5), 2, np.uint8), 1), np.full((5, 5), 2))  # nothing to erode from


@pytest.mark.parametrize("dy,dx", [(3, -2), (-4, 0), (0, 5), (1, 1), (0, 0)])
def test_shift_moves_by_exactly_dy_dx(dy, dx):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=(9, 11)).astype(np.uint8)
    out = P.shift(labels, dy, dx)
    for y, x in itertools.product(range(9), range(11)):
        sy, sx = y - dy, x - dx
        assert out[y, x] == (labels[sy, sx] if 0 <= sy < 9 and 0 <= sx < 11 else 0)


@pytest.mark.parametrize("distance", [2, 4])
def test_random_shift_is_a_translation_of_that_length(distance):
    labels = make_scene(1_000_007).labels
    out = P.random_shift(labels, np.random.default_rng(3), distance)
    matches = [(dy, dx) for dy, dx in itertools.product(range(-distance, distance + 1), repeat=2)
               if np.array_equal(out, P.shift(labels, dy, dx))]
    assert matches and all(abs(np.hypot(dy, dx) - distance) <= 0.75 for dy, dx in matches)


def test_drop_removes_only_the_smallest_objects():
    labels = np.zeros((20, 20), np.uint8)
    labels[0:5, 0:6] = 2  # 30 px
    labels[10:13, 10:14] = 2  # 12 px, same class, another component
    labels[15:20, 0:10] = 1  # 50 px
    one = labels.copy()
    one[10:13, 10:14] = 0
    two = one.copy()
    two[0:5, 0:6] = 0
    assert np.array_equal(P.drop_smallest(labels, 1), one)
    assert np.array_equal(P.drop_smallest(labels, 2), two)
    assert not P.drop_smallest(labels, 5).any()


def test_drop_counts_diagonal_neighbours_as_one_object():
    labels = np.zeros((6, 6), np.uint8)
    labels[0, 0] = labels[1, 1] = labels[2, 2] = 3  # one 8-connected object of 3 px
    labels[4:6, 4:6] = 3  # 4 px
    out = P.drop_smallest(labels, 1)
    assert not out[:3, :3].any() and (out[4:, 4:] == 3).all()


def test_holes_only_remove_pixels_of_the_hit_class_near_the_centres():
    labels = np.zeros((30, 30), np.uint8)
    labels[2:28, 2:15] = 1
    labels[2:28, 15:28] = 2
    out = P.holes(labels, np.random.default_rng(5), count=3, radius=2)
    removed = (labels != out)
    assert removed.any() and (out[removed] == 0).all() and np.array_equal(out[~removed], labels[~removed])
    # every removed pixel lies within 2 px of a removed pixel of its class that is a disc centre: all of a
    # disc's pixels of one class go, so each removed component is a disc cut, at most 13 px
    from scipy.ndimage import label as connected

    components, count = connected(removed)
    assert 1 <= count <= 3 * 2  # a disc can be cut in two by the class boundary
    assert all((components == c).sum() <= 13 for c in range(1, count + 1))


def test_boundary_noise_changes_only_pixels_near_a_boundary_to_nearby_labels():
    labels = make_scene(1_000_011).labels
    for width in (1, 2):
        out = P.boundary_noise(labels, np.random.default_rng(9), width)
        changed = np.argwhere(out != labels)
        assert len(changed) > 0
        height, w = labels.shape
        for y, x in changed:
            window = labels[max(y - width, 0):y + width + 1, max(x - width, 0):x + width + 1]
            assert (window != labels[y, x]).any()  # near a boundary
            assert out[y, x] in window  # a label from at most width px away


def test_blob_is_a_detached_disc_of_a_present_class_on_background():
    labels = np.zeros((40, 40), np.uint8)
    labels[5:15, 5:15] = 4
    for radius in (3, 6):
        out = P.add_blob(labels, np.random.default_rng(radius), radius, num_classes=6)
        added = out != labels
        assert (labels[added] == 0).all() and (out[added] == 4).all()
        yy, xx = np.mgrid[:40, :40]
        discs = [(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2 for cy, cx in itertools.product(range(40), repeat=2)]
        assert any(np.array_equal(added, disc) for disc in discs)  # a whole disc (cut only by the border)
        assert brute_distance(labels > 0)[added].min() > 1  # away from the object
    empty = np.zeros((10, 10), np.uint8)
    out = P.add_blob(empty, np.random.default_rng(0), 2, num_classes=6)
    assert len(np.unique(out)) == 2 and 1 <= out.max() <= 6


def test_names_strengths_and_determinism():
    labels = make_scene(1_000_003).labels
    assert len(P.NAMES) == 14 and {n.rsplit("-", 1)[1] for n in P.NAMES} == {"1", "2"}
    assert np.array_equal(P.perturb(labels, "dilate-1", 7), P.dilate(labels, 2))
    assert np.array_equal(P.perturb(labels, "dilate-2", 7), P.dilate(labels, 4))
    assert np.array_equal(P.perturb(labels, "erode-2", 7), P.erode(labels, 2))
    assert np.array_equal(P.perturb(labels, "drop-1", 7), P.drop_smallest(labels, 1))
    for name in P.NAMES:
        first = P.perturb(labels, name, 42)
        assert first.dtype == labels.dtype and first.shape == labels.shape
        assert np.array_equal(first, P.perturb(labels, name, 42)), name
    seeded = [n for n in P.NAMES if n.split("-")[0] in ("shift", "holes", "boundary", "blob")]
    for name in seeded:  # another seed, other random numbers (checked over a few seeds: a repeat can happen)
        assert any(not np.array_equal(P.perturb(labels, name, 42), P.perturb(labels, name, s)) for s in range(3))


def test_strong_perturbations_change_more_than_mild_ones():
    scenes = [make_scene(1_000_000 + i).labels for i in range(12)]
    for kind in ("dilate", "erode", "shift", "holes", "boundary", "drop", "blob"):
        mild = sum(int((P.perturb(m, f"{kind}-1", i) != m).sum()) for i, m in enumerate(scenes))
        strong = sum(int((P.perturb(m, f"{kind}-2", i) != m).sum()) for i, m in enumerate(scenes))
        assert 0 < mild < strong, kind


def test_unknown_and_repeated_names_are_one_line_errors():
    with pytest.raises(G4SegError, match="unknown perturbation.*dilate-3.*known: dilate-1"):
        P.perturb(np.zeros((4, 4), np.uint8), "dilate-3", 0)
    with pytest.raises(G4SegError, match="more than once"):
        P.parse_names("erode-1,erode-1")
    assert P.parse_names(None) == list(P.NAMES) == P.parse_names("all")
    assert P.parse_names(" shift-2 , blob-1 ") == ["shift-2", "blob-1"]
