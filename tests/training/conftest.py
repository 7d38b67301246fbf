"""Tiny phantoms and configs so the training tests run in seconds (phantoms only, no packages)."""

from __future__ import annotations

import numpy as np
import pytest

from disa.training import sources
from disa.training.loop import TrainConfig

SMALL = (40, 40, 40)


@pytest.fixture(scope="session")
def phantom() -> sources.Volume:
    return sources.make_phantom(np.random.default_rng(7), SMALL)


@pytest.fixture()
def tiny_config() -> TrainConfig:
    """16^3 crops of 40^3 phantoms, one pair per step, all in this process."""
    return TrainConfig(
        budget_minutes=5.0,
        seed=3,
        crop=16,
        batch=1,
        scene_reuse=1,
        warmup_steps=1,
        workers=0,
        threads=1,
        source_ids=(),
        phantom_fraction=1.0,
        phantom_shape=SMALL,
        cross_pairs=32,
        log_every_s=1e9,
    )
