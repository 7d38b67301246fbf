"""The similarities the engine offers (DISA, MIND-SSC, LC2) and what each one implies.

A registration names its similarity as a string (``RegistrationOptions.similarity``,
a contract of the CLI, the REST API and result.json). The pipeline and the
service's heatmap resolve that name once, with ``similarity(name)``, to a
``Similarity`` and then ask it: which cost the objective computes, which way the
cost turns into the reported ``similarity_value``, how many re-orientation passes
the refinement runs, how far a descriptor sees, whether the DISA model is needed,
and the heatmap's values. A new similarity is one more entry in ``SIMILARITIES``
(plus its descriptors: ``pipeline.descriptor_maps``) instead of a branch in each
of those places.

This module imports the engine's errors only (numpy when heatmap values are asked
for), so that options validation can load it without numpy, numba or SimpleITK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from disa.core.errors import InputError

if TYPE_CHECKING:  # (annotations only)
    import numpy as np

    from disa.registration.options import RegistrationOptions

CostKind = Literal["dot", "ssd", "lc2"]
HeatmapKind = Literal["dot", "neg_ssd"]


@dataclass(frozen=True)
class Similarity:
    """One similarity and the behaviour that follows from it.

    ``cost_kind``: the objective's per-point cost (objective.DescriptorObjective's
    ``kind``: "dot" is -<F, M>, "ssd" is ||F - M||^2; "lc2": the intensity-based
    LC2Objective, no descriptors). ``higher_is_better``: whether the similarity a user
    reads (result.json's ``similarity_value``) is the negated cost (DISA's dot product,
    LC2) or the cost itself (MIND-SSC's SSD, 0 = identical).
    """

    name: str
    cost_kind: CostKind
    higher_is_better: bool
    #: Most re-orientation passes of the refinement (pipeline._reoriented_refinement).
    #: Each re-extracts the moving descriptors: cheap for MIND-SSC, a network inference
    #: for DISA, whose coarser grid needs fewer passes anyway. 4 for MIND-SSC measured
    #: the same median TRE on 8 realistic cases at 2/3 of the time, but the PACS phantom
    #: study then ended 2.0 mm off (limit 1.5): 8 stay until that is understood.
    reorient_passes: int
    #: Gaussian (descriptor voxels) on both maps in the re-oriented refinement
    #: (DescriptorMap.smoothed says why; chosen on the realistic cases: MIND-SSC t1-t2 TRE
    #: 1.07/1.38/2.27/0.27 -> 0.85/0.90/0.61/0.50 mm; DISA's quarter-resolution maps are
    #: smooth already, and 0.5 / 1 voxel made its ct-mr TREs worse, 0.9 -> 1.7 / 5.6).
    refine_smoothing_voxels: float
    #: Whether the global search scores each start on a sampled map of its own orientation
    #: (orientations.py). MIND-SSC: cheap to recompute (~0.05 s per bin on a slab);
    #: realistic t1-t2 failures 3 -> 1 on the cases that showed the problem.
    oriented_search: bool
    #: Whether its descriptors come from the DISA network (model card and ONNX file).
    needs_model: bool
    #: Gaussian (mm) over an ultrasound image's data region before it is described
    #: (pipeline._despeckled). MIND-SSC compares each voxel's patch with its neighbours',
    #: and speckle makes those patch distances noise: on the realistic CT/ultrasound cases
    #: (both seeds, 48) 1.5 mm converged 4 more (ct-us-moving 17 -> 21 of 24), 3 mm lost
    #: accuracy on converged ones. DISA's network saw speckle in training; LC2 is local.
    #: Rigid and affine modes only (pipeline._prepare_pair says why).
    ultrasound_smoothing_mm: float
    #: What the viewer's heatmap shows (service/heatmap.py), None: no heatmap.
    heatmap_kind: HeatmapKind | None

    @property
    def uses_descriptors(self) -> bool:
        """Whether it compares descriptor maps (DISA, MIND-SSC) rather than intensities."""
        return self.cost_kind != "lc2"

    @property
    def objective_kind(self) -> Literal["dot", "ssd"]:
        """The DescriptorObjective's ``kind`` (ValueError for LC2, which has none)."""
        if self.cost_kind == "lc2":
            raise ValueError(f"similarity {self.name!r} has no descriptor objective")
        return self.cost_kind

    def similarity_value(self, cost: float) -> float:
        """The similarity a user reads (result.json ``similarity_value``) from the final
        objective ``cost``: the negated cost where higher is better, else the cost."""
        return -cost if self.higher_is_better else cost

    def descriptor_footprint_voxels(self, options: RegistrationOptions,
                                    receptive_field_voxels: int | None = None) -> int:
        """How far (working voxels) a descriptor sees from its centre: beyond this, cropping
        an image does not change the descriptors. A network's: half its receptive field
        (``receptive_field_voxels``, from the model card); MIND-SSC's: neighbour distance
        plus patch radius."""
        if self.needs_model:
            if receptive_field_voxels is None:
                raise ValueError(f"similarity {self.name!r}: the footprint needs the "
                                 "network's receptive field")
            return int(receptive_field_voxels) // 2 + 1
        return options.mind_dilation + options.mind_radius + 1

    def validity_erosion_voxels(self, stride: int, options: RegistrationOptions) -> int:
        """How far (working voxels) inside its data region a moving descriptor counts: one
        descriptor cell (``stride`` working voxels) for the network, the MIND-SSC footprint
        otherwise. Descriptors nearer to the edge of the data describe the edge."""
        if self.needs_model:
            return stride
        return options.mind_dilation + options.mind_radius

    def heatmap_values(self, fixed_descriptor: np.ndarray, moving_descriptors: np.ndarray
                       ) -> np.ndarray:
        """The heatmap's s per row of ``moving_descriptors`` (N, C) against one
        ``fixed_descriptor`` (C,), float32: the dot product ("dot", higher = more alike)
        or the negated SSD ("neg_ssd", 0 = identical), summed in float64."""
        import numpy as np

        if self.heatmap_kind is None:
            raise InputError(f"similarity {self.name!r} has no descriptor heatmap")
        f = fixed_descriptor.astype(np.float64)
        m = moving_descriptors.astype(np.float64)
        if self.heatmap_kind == "dot":
            return (m @ f).astype(np.float32)
        return (-np.sum((m - f) ** 2, axis=1)).astype(np.float32)


#: Every similarity by its option name (options.Similarity lists the same names).
SIMILARITIES: dict[str, Similarity] = {
    "disa": Similarity("disa", cost_kind="dot", higher_is_better=True, reorient_passes=4,
                       refine_smoothing_voxels=0.0, oriented_search=False, needs_model=True,
                       ultrasound_smoothing_mm=0.0, heatmap_kind="dot"),
    "mind": Similarity("mind", cost_kind="ssd", higher_is_better=False, reorient_passes=8,
                       refine_smoothing_voxels=1.0, oriented_search=True, needs_model=False,
                       ultrasound_smoothing_mm=1.5, heatmap_kind="neg_ssd"),
    # (LC2 searches locally on intensities: no re-orientation, no descriptor maps.)
    "lc2": Similarity("lc2", cost_kind="lc2", higher_is_better=True, reorient_passes=4,
                      refine_smoothing_voxels=0.0, oriented_search=False, needs_model=False,
                      ultrasound_smoothing_mm=0.0, heatmap_kind=None),
}


#: The default similarity (RegistrationOptions.similarity None) when a shipped model meets
#: its accuracy target (pipeline.resolve_similarity), and otherwise.
DEFAULT_WITH_MODEL = "disa"
DEFAULT_WITHOUT_MODEL = "mind"


def similarity(name: str | Similarity) -> Similarity:
    """The similarity named ``name`` (an option value); a Similarity is returned as is.
    InputError for an unknown name."""
    if isinstance(name, Similarity):
        return name
    found = SIMILARITIES.get(name)
    if found is None:
        raise InputError(f"unknown similarity {name!r} (one of: {', '.join(SIMILARITIES)})")
    return found
