"""Options of one registration, shared by the CLI, the worker and the HTTP API.

Field names are the CLI option names with underscores; the service accepts the
same names in its ``options`` JSON.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from disa.registration.similarity.spec import similarity

Similarity = Literal["disa", "mind", "lc2"]
Mode = Literal["rigid", "affine", "rigid+probe", "deformable"]
Point = tuple[float, float, float]


class RegistrationOptions(BaseModel):
    """What to register and how. Angles in degrees, distances in mm."""

    # NaN and infinities are refused as such (allow_inf_nan=False): checked against a
    # bound, a NaN would otherwise be reported as out of range.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: Mode = Field(
        "rigid", description="rigid: 6 parameters; affine: 12 (rigid search, affine refinement); "
                             "rigid+probe: rigid + 2 ultrasound probe-compression parameters "
                             "(amplitude, decay length) searched jointly; deformable: a dense "
                             "displacement field after the rigid or affine stage")
    similarity: Similarity | None = Field(
        None, description="disa (learned descriptors), mind (MIND-SSC, SSD) or lc2 (local only); "
                          "default: disa when the model ships, else mind")
    starts: int = Field(500, ge=1, le=20000, description="random starts of the global search")
    seed: int = Field(0, ge=0, description="seed of the random starts (same seed, same result)")
    rotation_range: float = Field(40.0, ge=0.0, le=180.0,
                                  description="starts draw angles in +- this many degrees per axis")
    translation_range: float | None = Field(
        None, ge=0.0, le=2000.0,
        description="starts draw shifts in +- this many mm per axis around the initial poses "
                    "(default: from the two images' extents, see docs/DESIGN.md \"Starts\"); "
                    "0 with rotation_range 0 refines the initial pose only")
    working_spacing: float | None = Field(
        None, gt=0.0, le=20.0,
        description="isotropic resampling spacing in mm (default: from the images' size); "
                    "each image's grid at this spacing may hold at most as many voxels as "
                    "one input may (512^3; DISA_MAX_VOXELS in the service)")
    init: Literal["auto", "centers", "geometry"] = Field(
        "auto", description="auto: starts around the header pose, the aligned foreground "
                            "centroids and, when one field of view is much smaller, placements "
                            "of it over the other's foreground; centers: around the aligned "
                            "centroids only; geometry: around the header pose only (an "
                            "initial transform, when given, replaces the header pose)")
    precision: Literal["int8", "float32"] = Field(
        "int8", description="descriptor storage used by the objective")
    top_k: int = Field(8, ge=1, le=64, description="solutions refined with L-BFGS")
    mind_radius: int = Field(1, ge=1, le=4, description="MIND-SSC box radius (voxels)")
    mind_dilation: int = Field(2, ge=1, le=6, description="MIND-SSC neighbour distance (voxels)")
    deformable_from: Literal["rigid", "affine"] = Field(
        "affine",
        description="deformable mode: the linear stage the displacement field starts from "
                    "(rigid whenever the moving image is the smaller view)")
    regularisation: float = Field(
        1.0, gt=0.0, le=1000.0,
        description="deformable mode: weight of the smoothness (diffusion) term, relative to the "
                    "tuned default 1; larger is smoother")
    search_radius: float | None = Field(
        None, gt=0.0, le=100.0,
        description="deformable mode: half-width (mm) of the discrete displacement search "
                    "(default 1.5 control-grid spacings)")
    ultrasound: Literal["moving", "fixed"] | None = Field(
        None, description="which image is an ultrasound volume (default: detected from the "
                          "data, a sector-shaped field of view with zeros outside); rigid+probe "
                          "mode fits the probe compression in that image")
    probe_origin: Point | None = Field(
        None, description="rigid+probe mode: centre of the probe face, LPS mm in the ultrasound "
                          "image's space (default: from the ultrasound's field of view)")
    probe_axis: Point | None = Field(
        None, description="rigid+probe mode: direction from the probe into the body, LPS "
                          "(any length; default: from the ultrasound's field of view)")

    @model_validator(mode="after")
    def _check_mode_options(self) -> RegistrationOptions:
        for name in ("probe_origin", "probe_axis"):
            value = getattr(self, name)
            if value is not None and not all(math.isfinite(v) for v in value):
                raise ValueError(f"{name} must be finite numbers")
        if self.probe_axis is not None and math.hypot(*self.probe_axis) < 1e-9:
            raise ValueError("probe_axis must not be the zero vector")
        if self.mode != "rigid+probe" and (self.probe_origin is not None
                                           or self.probe_axis is not None):
            raise ValueError("probe_origin and probe_axis apply to mode 'rigid+probe' only")
        if self.similarity is not None and not similarity(self.similarity).uses_descriptors \
                and self.mode in ("rigid+probe", "deformable"):
            raise ValueError(f"mode '{self.mode}' needs a descriptor similarity (disa or mind)")
        return self
