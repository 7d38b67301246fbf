"""Sources: the split is disjoint by subject and anatomy; phantoms are seeded and well formed."""

from __future__ import annotations

import numpy as np

from disa.training import sources


def test_split_is_disjoint_by_subject_and_has_a_held_out_anatomy() -> None:
    train = [sources.CATALOGUE[s] for s in sources.TRAINING_SOURCES if s != sources.PHANTOM]
    held = [sources.CATALOGUE[s] for s in sources.HELD_OUT_SOURCES if s != sources.PHANTOM]
    assert {i.split for i in train} == {"training"} and {i.split for i in held} == {"held-out"}
    assert not {i.subject for i in train} & {i.subject for i in held}
    assert {i.anatomy for i in held} - {i.anatomy for i in train}  # e.g. head-ct
    # Phantom seeds of the two splits come from different streams.
    a = np.random.default_rng(sources.phantom_seed("training", 0)).random(4)
    b = np.random.default_rng(sources.phantom_seed("held-out", 0)).random(4)
    assert not np.allclose(a, b)


def test_available_sources_only_lists_installed_files() -> None:
    for source_id in sources.available_sources():
        paths = sources.source_files(source_id)
        assert paths is not None and all(p.is_file() for p in paths)


def test_phantom_is_deterministic_and_well_formed() -> None:
    a = sources.make_phantom(np.random.default_rng(1), (32, 36, 40))
    b = sources.make_phantom(np.random.default_rng(1), (32, 36, 40))
    assert a.shape == (32, 36, 40)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.native, b.native)
    np.testing.assert_allclose(a.tissues.sum(0), 1.0, atol=1e-5)
    assert a.tissues.shape == (len(sources.TISSUES), 32, 36, 40)
    assert a.labels.max() < len(a.label_tissue) and a.labels.min() >= 0
    assert len(np.unique(a.labels)) >= 3
    assert a.border_mode == "mirror"


def test_kmeans_finds_separated_classes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 0.1, 500) for m in (1.0, 3.0, 6.0)])
    np.testing.assert_allclose(sources.kmeans_1d(values, 3), [1.0, 3.0, 6.0], atol=0.05)
