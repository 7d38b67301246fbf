"""The engine as the API sees it: the one module of disa.service that imports the engine.

The API validates uploads and options, and draws the viewer's planes and the
descriptor heatmap, with the engine's own code; it never registers (a worker
does: disa.service.dispatch). Every engine name the API uses is listed here, so
that what the API relies on is visible in one place and a change of the engine
that touches it shows up here (tests/test_layers.py keeps the rest of the API
from importing disa.registration or disa.model directly).

A name is imported from its engine module on first use, not when this module is
imported: the API starts without numpy, SimpleITK or numba and loads each on the
first request that needs it. Names are looked up afresh on each use (no copy is
kept here), so a test that patches the engine module patches the API too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> engine module it comes from, by what the API does with it.
SURFACE: dict[str, str] = {
    # errors the API turns into HTTP answers
    "InputError": "disa.core.errors",
    # the exit codes `disa serve` and `disa submit` share with every other command
    "EXIT_OK": "disa.core.errors",
    "EXIT_INTERNAL": "disa.core.errors",
    "EXIT_INPUT": "disa.core.errors",
    "UnpackBusy": "disa.core.io.dicom_zip",
    # upload and options validation (before a job is queued)
    "RegistrationOptions": "disa.registration.options",
    "InputLimits": "disa.core.io.limits",
    "inspect_image": "disa.core.io.images",
    "unpack_budget": "disa.core.io.dicom_zip",
    "check_working_grid": "disa.core.preprocess",
    "working_grid_size": "disa.core.preprocess",
    "MAX_TRANSFORM_BYTES": "disa.registration.transform.initial",
    "TEXT_SUFFIXES": "disa.registration.transform.initial",
    "read_initial_transform": "disa.registration.transform.initial",
    "transform_matrix": "disa.registration.transform.initial",
    # the viewer's planes
    "Grid": "disa.core.grid",
    "read_image": "disa.core.io.images",
    "display_window": "disa.registration.results.qa",
    "REGISTERED_FILE": "disa.registration.results.outputs",
    "resample_moving": "disa.registration.results.outputs",
    # the descriptor heatmap (the engine's preparation and descriptors, then cached)
    "atomic_write": "disa.core.atomic",
    "DescriptorMap": "disa.registration.similarity.descriptor_map",
    "similarity": "disa.registration.similarity.spec",
    "auto_working_spacing": "disa.registration.pipeline",
    "descriptor_maps": "disa.registration.pipeline",
    "prepare": "disa.registration.pipeline",
    "default_card_path": "disa.model.card",
    "load_model_card": "disa.model.card",
    # the one-line verdict `disa submit` prints (the same formatter as `disa register`)
    "verdict_line": "disa.registration.results.readable",
}

__all__ = sorted(SURFACE)

if TYPE_CHECKING:  # for readers and type checkers; at run time __getattr__ below
    pass


def __getattr__(name: str) -> Any:
    module = SURFACE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
