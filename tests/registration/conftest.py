"""Phantom pairs with known transforms, shared by the engine tests (built once per session)."""

from __future__ import annotations

import numpy as np
import pytest

from disa.training import phantom as ph

#: Evaluation points for target registration error: a 10 mm lattice over the body (mm).
TRE_POINTS = ph.grid_points(ph.make_grid((9, 9, 9), (10.0, 10.0, 10.0)))


def tre(estimate, truth) -> float:
    return ph.target_registration_error(estimate, truth, TRE_POINTS)


@pytest.fixture(scope="session")
def small_pair() -> ph.PhantomPair:
    """20 mm / 16 degrees apart, both images on one 64^3 x 3 mm field of view."""
    truth = ph.rigid_truth((10.0, -8.0, 9.0), (12.0, -11.0, 12.0))
    grid = ph.make_grid((64, 64, 64), (3.0, 3.0, 3.0))
    return ph.make_pair(truth, fixed_grid=grid, moving_grid=grid, seed=1)


@pytest.fixture(scope="session")
def far_pair() -> ph.PhantomPair:
    """90 mm / 40 degrees apart; the moving field of view follows the anatomy."""
    angles = np.array([24.0, -20.0, 25.0])  # a 40 degree rotation in total
    truth = ph.rigid_truth(tuple(angles), (55.0, -48.0, 52.0))  # |t| = 89.7 mm
    return ph.make_pair(truth, seed=2)
