"""Sources: the split is disjoint by subject and anatomy; phantoms are seeded and well formed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


def test_available_sources_only_lists_installed_files(tmp_path, monkeypatch) -> None:
    """Checked on a made-up installation (it does not depend on which data packages this
    machine has): one source with every file, one missing a file, the rest absent."""
    complete, partial = [s for s, i in sources.CATALOGUE.items() if len(i.files) >= 2][:2]
    present: dict[tuple[str, str], Path] = {}
    for source_id in (complete, partial):
        info = sources.CATALOGUE[source_id]
        files = info.files if source_id == complete else info.files[1:]
        for name in files:
            path = tmp_path / info.package / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"volume")
            present[info.package, name] = path
    monkeypatch.setattr(sources, "_package_file",
                        lambda package, relative: present.get((package, relative)))

    assert sources.available_sources() == [complete]
    assert sources.available_sources(sources.CATALOGUE[complete].split) == [complete]
    assert sources.source_files(partial) is None
    paths = sources.source_files(complete)
    assert paths is not None and len(paths) == len(sources.CATALOGUE[complete].files)
    assert all(p.is_file() for p in paths)


def test_installed_sources_have_all_their_files() -> None:
    installed = sources.available_sources()
    if not installed:
        pytest.skip("no packaged source installed (scripts/install_training_data.sh)")
    for source_id in installed:
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
