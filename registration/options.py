"""Options of one registration, shared by the CLI, the worker and the HTTP API.

Field names are the CLI option names with underscores; the service accepts the
same names in its ``options`` JSON.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Similarity = Literal["disa", "mind", "lc2"]


class RegistrationOptions(BaseModel):
    """What to register and how. Angles in degrees, distances in mm."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["rigid", "affine"] = Field(
        "rigid", description="rigid: 6 parameters; affine: 12 (rigid search, affine refinement)")
    similarity: Similarity | None = Field(
        None, description="disa (learned descriptors), mind (MIND-SSC, SSD) or lc2 (local only); "
                          "default: disa when the model ships, else mind")
    starts: int = Field(500, ge=1, le=20000, description="random starts of the global search")
    seed: int = Field(0, ge=0, description="seed of the random starts (same seed, same result)")
    rotation_range: float = Field(40.0, ge=0.0, le=180.0,
                                  description="starts draw angles in +- this many degrees per axis")
    translation_range: float = Field(100.0, ge=0.0, le=2000.0,
                                     description="starts draw shifts in +- this many mm per axis")
    working_spacing: float | None = Field(
        None, gt=0.0, le=20.0,
        description="isotropic resampling spacing in mm (default: from the images' size)")
    init: Literal["centers", "geometry"] = Field(
        "centers", description="centers: align foreground centroids first; geometry: trust headers")
    precision: Literal["int8", "float32"] = Field(
        "int8", description="descriptor storage used by the objective")
    top_k: int = Field(8, ge=1, le=64, description="solutions refined with L-BFGS")
    mind_radius: int = Field(1, ge=1, le=4, description="MIND-SSC box radius (voxels)")
    mind_dilation: int = Field(2, ge=1, le=6, description="MIND-SSC neighbour distance (voxels)")
