"""One registration, end to end, in process: images in, transform and diagnostics out.

    fixed, moving (sitk images, LPS mm)
      -> resample to an isotropic working spacing, foreground masks, z-score
      -> descriptor maps (DISA network via ONNX Runtime, or MIND-SSC)
      -> weights w(p) from the local standard deviation of the fixed image
      -> global multi-start search (coarse), L-BFGS refinement (fine)
      -> optional affine refinement
      -> optional deformable stage (``deformable``) or, in rigid+probe mode, the search
         runs on rigid pose + probe compression (``probe``) from the start
      -> RegistrationResult (transform fixed -> moving, confidence, timings; a displacement
         field and its ITK transform for non-linear modes)

The CLI (`disa register`) and the Celery worker both call ``register``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.grid import Grid
from disa.core.preprocess import (
    MAX_WORKING_VOXELS,
    IntensityNormalisation,
    antialias,
    foreground_mask,
    intensity_normalisation,
    labelled,
    mask_to_grid,
    masked_gaussian,
    resample_to_spacing,
)
from disa.registration.deformable.probe import ProbeModel, resolve_probe
from disa.registration.deformable.stage import DeformableSettings, deformable_stage
from disa.registration.fov import (
    DataRegion,
    data_region,
    eroded,
    grid_open_faces,
    mapped_inside,
    physical_volume_ml,
    regions_on_grid,
    sector_shaped,
)
from disa.registration.options import RegistrationOptions
from disa.registration.search import translation_scan
from disa.registration.search.global_search import (
    Cancel,
    Progress,
    SearchResult,
    SearchSettings,
    global_search,
    lbfgs_refine,
    local_search,
    mapping_distance,
)
from disa.registration.search.orientations import (
    OrientedObjective,
    bin_directions,
    orientation_bins,
)
from disa.registration.search.translation_scan import (
    BinScan,
    ScanTerms,
    block_factor,
    other_terms,
    sampled_terms,
    scan_poses,
    within_ranges,
)
from disa.registration.search.verdict import Evidence, verdict
from disa.registration.similarity.contrast import local_std
from disa.registration.similarity.descriptor_map import DescriptorMap, pool_weights
from disa.registration.similarity.objective import (
    DescriptorObjective,
    LC2Objective,
    Objective,
    PointObjective,
)
from disa.registration.similarity.spec import (
    DEFAULT_WITH_MODEL,
    DEFAULT_WITHOUT_MODEL,
    Similarity,
)
from disa.registration.similarity.spec import similarity as similarity_spec
from disa.registration.threads import serial_blas
from disa.registration.transform.displacement import (
    covering_grid,
    dense_displacement,
    jacobian_metrics,
    residual_transform,
)
from disa.registration.transform.parametric import (
    TransformModel,
    nearest_rotation,
    rigid_parameters,
    rotation_matrix,
)

#: Points of the fixed descriptor grid used by the coarse, fine and refinement objectives.
COARSE_POINTS = 512
FINE_POINTS = 4096
REFINE_POINTS = 16384
#: The coarse level is the base map pooled 2x when the base grid is larger than this.
COARSE_POOL_ABOVE = 40
#: (Re-orientation passes, the refinement's smoothing and which similarities search on
#: oriented maps are properties of each similarity: similarity_spec.py.)
#: Room (mm) the first re-oriented pass's crop leaves for the pose to move within that pass
#: (the search's pose can still be several mm off: first steps of up to 17 mm measured).
REORIENT_MOTION_MM = 16.0
#: Later passes leave this many times the previous pass's step (mm at the sample radius:
#: points farther out move up to ~2x that), and at least one descriptor voxel. The steps
#: after the first pass are 0.1-1.5 mm on the realistic cases, so a later crop holds a
#: margin of ~4-6 mm instead of 16 (22-38 % fewer voxels to re-grid and describe).
REORIENT_STEP_ROOM = 4.0
#: A re-oriented pass whose step (mm at the sample radius) is below this fraction of a
#: descriptor voxel has converged: the final refinement reuses its descriptors.
REORIENT_CONVERGED = 0.03
#: Other basins of the search (search.basins, the rivals first) screened on re-oriented
#: maps besides the best. 2 (rivals only, until 2026-12-05): 3 realistic cases ended 10-35
#: mm off in a basin whose re-oriented cost was worse than a runner-up's; 3 fixed all three.
#: 7 (every basin the 8 refined solutions hold, 2026-12-07): a head CT against a moving
#: ultrasound ended 110 mm off with the truth's basin 4th of the runners-up (search cost
#: 1.572 against the winner's 1.537; re-oriented, the truth's was the lower).
MAX_RIVALS = 7
#: Re-orientation passes that screen a runner-up basin: only a runner-up whose screened
#: cost comes within the ambiguity margin of the winner's is refined in full. Every
#: runner-up in full doubled the time a case (full-field CT-MR 2.8 -> 4-7 s).
SCREEN_PASSES = 2
#: Runners-up from this rank on (0 = the best) are screened with LATE_SCREEN_PASSES only.
#: Why: screening all 7 with 2 passes cost a torso case ~1 s more (a pass re-grids and
#: describes a torso crop); the rank-4 basin that motivated MAX_RIVALS = 7 came within
#: the margin after one pass as after two.
LATE_RIVALS_FROM = 3
LATE_SCREEN_PASSES = 1
#: A runner-up of any rank is screened only when its search cost lies within this fraction
#: of the search's contrast (SearchResult.contrast) of the best. On 180 realistic cases
#: (three seeds, 2026-12-07) every runner-up that went on to win lay within 0.15 (the
#: rank-4 basin above at 0.05); a torso's runners-up, 200 mm off, lay at 0.5-0.9, and the
#: screenings beyond 0.25 took about a quarter of the re-oriented stage (until 2026-12-07
#: this gate applied from LATE_RIVALS_FROM on only).
RIVAL_GAP = 0.25
#: LC2 runs on a grid of at most this many voxels along its longest axis (it is slow).
LC2_MAX_DIM = 64


@dataclass
class PreparedImage:
    """An image on the working grid: z-scored array (z, y, x), its grid, foreground mask, the
    intensity normalisation that z-scored it, where it has data (``fov``, fov.py) and that
    data region on the image's own grid (``region``, for re-gridding)."""

    volume: np.ndarray
    grid: Grid
    mask: np.ndarray
    normalisation: IntensityNormalisation
    fov: np.ndarray
    region: DataRegion
    user_mask: bool = False
    #: False only on the padding (outside the buffer counts as True): what erosion shrinks.
    unpadded: np.ndarray | None = None
    #: Which faces of the working grid lie in air (fov.FACES order; fov.grid_open_faces):
    #: the objective carries their descriptors on beyond them.
    open_faces: tuple[bool, ...] = (False,) * 6

    def trusted(self, voxels: int) -> np.ndarray:
        """The field of view less ``voxels`` working voxels along padding edges (a sector's
        or a slab's cut), where descriptors and local contrast describe the cut. The
        buffer's own edges are not eroded: there the image ends without a cut in it."""
        unpadded = self.fov if self.unpadded is None else self.unpadded
        if unpadded is not self.fov and unpadded.all():
            # No padding on this grid (an image without any, or a rotated bin's grid away
            # from it): nothing to erode, and the three filter passes cost ~25 ms a
            # torso bin.
            return self.fov.copy()
        return self.fov & eroded(unpadded, voxels)

    @property
    def data_volume_ml(self) -> float:
        """Physical volume (ml) of the foreground that has data: the extent that decides
        which image provides the sample points."""
        return physical_volume_ml(self.mask & self.fov, float(self.grid.spacing[0]))

    @property
    def centroid(self) -> np.ndarray:
        """Physical centroid (LPS mm) of the foreground mask."""
        z, y, x = np.nonzero(self.mask)
        idx = np.stack([x, y, z], axis=1).astype(np.float64)
        return self.grid.to_physical(idx).mean(axis=0)


@dataclass
class RegistrationResult:
    """A registration's outcome; ``transform`` maps fixed points to moving points (LPS mm)."""

    mode: str
    similarity: str
    theta: np.ndarray
    transform: sitk.Transform
    initial_transform: sitk.Transform
    matrix: np.ndarray
    cost: float
    similarity_value: float
    evaluations: int
    starts: int
    confidence: float
    agreeing: int
    refined: int
    ambiguous: bool
    overlap: float
    working_spacing_mm: float
    descriptor_spacing_mm: float
    timings: dict[str, float]
    solutions: list[dict[str, float]] = field(default_factory=list)
    model: dict[str, Any] | None = None
    #: Non-linear modes: the full mapping fixed -> moving (``transform`` is its linear part).
    field_transform: sitk.Transform | None = None
    #: u(x) = T(x) - x of the full mapping on the fixed image grid (VectorFloat32, LPS mm).
    displacement: sitk.Image | None = None
    #: Jacobian metrics of the full mapping and facts of the deformable stage.
    deformation: dict[str, Any] | None = None
    #: rigid+probe mode: probe geometry and the fitted compression.
    probe: dict[str, Any] | None = None
    #: Which image provided the sample points ("fixed", or "moving": a smaller field of view).
    sampled: str = "fixed"
    #: Which image is an ultrasound volume (given or detected), or None.
    ultrasound: str | None = None
    #: Final cost between chance (0) and a perfect descriptor match (1); LC2 for lc2.
    match_quality: float = float("nan")
    #: What was found about the fields of view (padding fractions, data volumes in ml).
    fields_of_view: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> tuple[str, str]:
        """("likely" | "uncertain" | "failed", reason): see verdict.py."""
        # A network's verdict thresholds hold for a model that meets its accuracy target,
        # which is when the default resolves to it.
        calibrated = not similarity_spec(self.similarity).needs_model or similarity_spec(
            resolve_similarity(RegistrationOptions())).needs_model
        return verdict(Evidence(self.confidence, self.ambiguous, self.overlap,
                                self.match_quality, self.refined, calibrated,
                                ultrasound=self.ultrasound is not None))

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields of result.json (units in the key names or documented there)."""
        decision, reason = self.verdict
        return {
            "verdict": decision,
            "verdict_reason": reason,
            "mode": self.mode,
            "similarity": self.similarity,
            "parameters": [float(v) for v in self.theta],
            "parameter_names": _parameter_names(len(self.theta)),
            "matrix_fixed_to_moving": self.matrix.tolist(),
            "final_objective": self.cost,
            "similarity_value": self.similarity_value,
            "evaluations": self.evaluations,
            "starts": self.starts,
            "confidence": self.confidence,
            "agreeing_solutions": self.agreeing,
            "refined_solutions": self.refined,
            "ambiguous": self.ambiguous,
            "overlap": self.overlap,
            "match_quality": self.match_quality,
            "sampled_image": self.sampled,
            "ultrasound": self.ultrasound,
            "fields_of_view": self.fields_of_view,
            "working_spacing_mm": self.working_spacing_mm,
            "descriptor_spacing_mm": self.descriptor_spacing_mm,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "solutions": self.solutions,
            "model": self.model,
            **({"deformation": self.deformation} if self.deformation is not None else {}),
            **({"probe": self.probe} if self.probe is not None else {}),
        }


def _parameter_names(n_params: int) -> list[str]:
    """Names of theta: rigid (6), rigid + probe (8) or affine (12) parameters."""
    rigid = ["angle_x_rad", "angle_y_rad", "angle_z_rad", "t_x_mm", "t_y_mm", "t_z_mm"]
    if n_params == 6:
        return rigid
    if n_params == 8:
        return [*rigid, "probe_amplitude_mm", "probe_decay_length_mm"]
    return [f"m{i}{j}" for i in range(3) for j in range(3)] + ["t_x_mm", "t_y_mm", "t_z_mm"]


#: DISA is the default similarity once the shipped model's held-out MSE (its model card)
#: reaches the paper's validation figure; a weaker model stays available on request.
DISA_DEFAULT_MAX_MSE = 0.0083


def resolve_similarity(options: RegistrationOptions) -> str:
    """The similarity to use: the option; else DISA when a shipped model meets the held-out
    accuracy target on its card (DISA_DEFAULT_MAX_MSE), else MIND-SSC."""
    if options.similarity is not None:
        return options.similarity
    from disa.model.card import default_card_path, load_model_card

    card_path = default_card_path()
    if card_path is None:
        return DEFAULT_WITHOUT_MODEL
    mse = load_model_card(card_path, verify=False).held_out_metrics.get("mse")
    good = isinstance(mse, int | float) and mse <= DISA_DEFAULT_MAX_MSE
    return DEFAULT_WITH_MODEL if good else DEFAULT_WITHOUT_MODEL


def auto_working_spacing(fixed: sitk.Image, moving: sitk.Image,
                         similarity: str | Similarity) -> float:
    """Working spacing (mm): DISA uses its model card's input spacing; MIND-SSC and LC2 the
    finest native spacing, coarsened so the larger field of view spans at most 160 voxels."""
    spec = similarity_spec(similarity)
    if spec.needs_model:
        from disa.model.card import default_card_path, load_model_card

        card_path = default_card_path()
        if card_path is None:
            raise InputError(f"similarity '{spec.name}' needs the DISA model, which is not "
                             "installed")
        return float(load_model_card(card_path, verify=False).input_spacing_mm)
    # Resolving finer than the coarser of the two images adds cost, not information.
    finest = max(min(fixed.GetSpacing()), min(moving.GetSpacing()))
    # Both images are resampled at this spacing on axes parallel to the fixed image's: the
    # larger box on those axes decides. (With the fixed image's own extent alone, a small
    # ultrasound sector as the fixed image set ~1 mm and the moving CT's grid held 5-10x
    # the voxels; with each image's own axes, an oblique moving CT's box on the fixed
    # axes was ~1.5x larger per axis than counted: 8 s a case instead of 3.)
    axes = np.asarray(fixed.GetDirection(), dtype=float).reshape(3, 3)
    extent = max(float(np.max(box_extent_mm(image, axes))) for image in (fixed, moving))
    return float(round(max(finest, extent / 160.0), 3))


def box_extent_mm(image: sitk.Image, axes: np.ndarray) -> np.ndarray:
    """Side lengths (mm) of the box with edges along ``axes`` (3x3, columns = unit axes in
    LPS) that holds the voxel centres of ``image``."""
    size = np.asarray(image.GetSize()) - 1
    corners = [image.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in np.array(bits) * size]) for bits in np.ndindex(2, 2, 2)]
    local = np.asarray(corners) @ axes
    return local.max(0) - local.min(0)


def prepare(image: sitk.Image, spacing_mm: float, user_mask: sitk.Image | None,
            direction: np.ndarray | None = None, role: str | None = None,
            region: DataRegion | None = None, max_voxels: int = MAX_WORKING_VOXELS,
            smoothed: sitk.Image | None = None) -> PreparedImage:
    """Resample to the working spacing (optionally onto axes ``direction``), find the
    foreground and z-score the intensities. ``smoothed``: ``antialias(image, spacing_mm)``
    made by the caller, or ``image`` itself when it is antialiased already; it is resampled
    instead of ``image`` (the same grid values: padding takes ``image``'s minimum). None:
    antialiased here.

    ``role`` ("fixed" or "moving") prefixes every InputError message ("fixed: ...",
    "moving mask: ..."), so that a user knows which of the inputs to fix. ``region``: the
    image's data region when already known (a smoothed copy's padding is no longer exactly
    constant, so it must come from the original image). ``max_voxels``: the most voxels
    the working grid may hold (InputError above it, before it is made).
    """
    mask_role = f"{role} mask" if role else None
    region = region or data_region(image)
    fill = region.air_fill
    if smoothed is None:
        resampled = resample_to_spacing(image, spacing_mm, direction=direction,
                                        max_voxels=max_voxels, default_value=fill)
    else:
        resampled = resample_to_spacing(
            smoothed, spacing_mm, direction=direction, smooth=False, max_voxels=max_voxels,
            default_value=float(sitk.GetArrayViewFromImage(image).min()) if fill is None
            else fill)
    array = sitk.GetArrayFromImage(resampled).astype(np.float32)
    if min(array.shape) < 8:
        raise InputError(labelled(role, f"image is only {array.shape[::-1]} voxels at "
                                        f"{spacing_mm} mm working spacing: too small to "
                                        "register (choose a finer --working-spacing)"))
    fov, unpadded = regions_on_grid(region.mask, resampled, region.open_faces)
    if not region.has_padding:
        unpadded = np.ones(fov.shape, dtype=bool)
    if fov.sum() < 64:
        raise InputError(labelled(role, "image holds (nearly) no data (its voxels are one "
                                        "constant value): nothing to register"))
    # The foreground never includes padding: it would skew Otsu and the z-score.
    mask = (mask_to_grid(user_mask, resampled, mask_role)
            if user_mask is not None else foreground_mask(np.where(fov, array, array[fov].min()))
            & fov)
    if mask.sum() < 64:
        if user_mask is not None:
            # The user's mask decides the foreground here: name it, not the image.
            raise InputError(labelled(mask_role, f"mask covers only {int(mask.sum())} voxels "
                                                 f"at {spacing_mm} mm working spacing: too "
                                                 "few to register"))
        raise InputError(labelled(role, "image foreground is (nearly) empty: nothing to "
                                        "register"))
    normalisation = intensity_normalisation(array, mask, role)
    faces = grid_open_faces(fov, array, region)
    return PreparedImage(normalisation.apply(array), Grid.from_image(resampled), mask,
                         normalisation, fov, region, user_mask is not None, unpadded, faces)


def regrid(smoothed: sitk.Image, spacing_mm: float, user_mask: sitk.Image | None,
           direction: np.ndarray, bounds: tuple[np.ndarray, np.ndarray], align_voxels: int,
           normalisation: IntensityNormalisation, region: DataRegion | None = None,
           max_voxels: int = MAX_WORKING_VOXELS) -> PreparedImage:
    """A prepared image again, on axes ``direction`` over ``bounds`` only (mm along those
    axes; ``resample_to_spacing``), z-scored by its first preparation's ``normalisation``.

    ``smoothed`` is the image already antialiased for ``spacing_mm``. The mask is the user
    mask on the new grid, or the whole grid without one: after its first preparation a
    moving image's automatic foreground served only its statistics, which are kept.
    ``max_voxels``: the most voxels the new grid may hold (InputError above it).
    """
    region = region or data_region(smoothed)
    resampled = resample_to_spacing(smoothed, spacing_mm, direction=direction, smooth=False,
                                    bounds=bounds, align_voxels=align_voxels,
                                    max_voxels=max_voxels, default_value=region.air_fill)
    array = sitk.GetArrayFromImage(resampled).astype(np.float32)
    mask = (mask_to_grid(user_mask, resampled, "moving mask") if user_mask is not None
            else np.ones(array.shape, dtype=bool))
    fov, unpadded = regions_on_grid(region.mask, resampled, region.open_faces)
    if not region.has_padding:
        unpadded = np.ones(fov.shape, dtype=bool)
    faces = grid_open_faces(fov, array, region)
    return PreparedImage(normalisation.apply(array), Grid.from_image(resampled), mask,
                         normalisation, fov, region, user_mask is not None, unpadded, faces)


_extractors: dict[str, Any] = {}


def disa_extractor() -> tuple[Any, dict[str, Any]]:
    """The process-wide DISA extractor (created lazily, after any fork) and model facts."""
    from disa.model.card import default_card_path, load_model_card
    from disa.model.runtime import DescriptorExtractor, default_engine

    card_path = default_card_path()
    if card_path is None:
        raise InputError("similarity 'disa' needs the DISA model, which is not installed")
    key = str(card_path)
    if key not in _extractors:
        card = load_model_card(card_path)
        onnx_path = card.onnx_path(card_path.parent)
        extractor = DescriptorExtractor(onnx_path, engine=default_engine(model_path=onnx_path))
        _extractors[key] = (extractor, {"name": card.name, "version": card.version,
                                        "sha256": card.sha256, "stride": card.output_stride,
                                        "receptive_field_voxels": card.receptive_field_voxels,
                                        "engine": extractor.engine})
    return _extractors[key]


def descriptor_maps(image: PreparedImage, similarity: str | Similarity,
                    options: RegistrationOptions
                    ) -> tuple[DescriptorMap, int, dict[str, Any] | None]:
    """The base descriptor map of a prepared image, its stride (working voxels) and model facts."""
    if similarity_spec(similarity).needs_model:
        extractor, facts = disa_extractor()
        data = extractor.extract(image.volume)
        stride = int(facts["stride"])
        return (DescriptorMap(np.ascontiguousarray(data), image.grid.strided(stride),
                              open_faces=image.open_faces), stride, facts)
    from disa.registration.similarity.mind import mind_ssc

    data = mind_ssc(image.volume, radius=options.mind_radius, dilation=options.mind_dilation)
    # MIND is computed at the working spacing and pooled once: the objective then runs on a
    # grid of the same order as DISA's, at a quarter of the cost of the full-resolution map.
    return DescriptorMap(np.ascontiguousarray(data), image.grid,
                         open_faces=image.open_faces), 1, None


def fixed_weights(image: PreparedImage, stride: int) -> np.ndarray:
    """w(p) on the descriptor grid: local standard deviation of the z-scored fixed image in a
    cube of about one descriptor cell, inside the fixed foreground (flat regions carry no
    information for any similarity)."""
    radius = max(1, stride // 2 + 1)
    std = local_std(image.volume, radius)  # (similarity/contrast.py: compiled, scipy's numbers)
    # Only where the whole filter cube has data: the edge of a sector or a slab is the
    # largest local contrast in the image and no anatomy (fov.py).
    std = np.where(image.mask & image.trusted(radius + 1), std, 0.0)
    weights = std[::stride, ::stride, ::stride]
    weights = np.where(weights > 0.05 * weights.max(), weights, 0.0)
    return np.ascontiguousarray(weights.astype(np.float32))


#: The translation scan of oriented_levels: given a test of admissible poses (thetas (N, 6)
#: -> bool (N,)), the scanned poses (search frame).
Scan = Callable[[Callable[[np.ndarray], np.ndarray]], list[np.ndarray]]


def oriented_levels(levels: tuple[Objective, Objective, Objective], a_img: sitk.Image,
                    a_p: PreparedImage, b_direction: np.ndarray, spacing: float,
                    similarity: Similarity, options: RegistrationOptions, stride: int, pool: bool,
                    smoothed: sitk.Image, max_voxels: int = MAX_WORKING_VOXELS
                    ) -> tuple[tuple[Objective, Objective, Objective], Scan | None]:
    """The search's (coarse, fine, refine) objectives with the sampled image ``a`` also
    described on one rotated grid per orientation bin (orientations.py says why), and the
    translation scan over the bins (search/translation_scan.py; None without bins or with
    fewer than SCAN_MIN_STARTS starts): called with a test of admissible poses (the search's
    ranges), it builds every bin and returns the scan's poses (search frame).

    ``levels`` are the identity bin's objectives (unrotated maps); the other bins' maps
    cover a's foreground within its data region (plus the descriptor footprint) on rotated
    axes, z-scored by a's first normalisation. A bin's map and its three level objectives
    are built the first time a start falls into it, and the map is dropped then.
    ``max_voxels``: the most voxels a rotated grid may hold; ``smoothed``: antialias(a_img).
    """
    bins = orientation_bins(options.rotation_range)
    if len(bins) == 1:
        return levels, None
    directions = bin_directions(bins, a_p.grid.direction, b_direction)
    mask = a_p.grid.image_like(a_p.mask.astype(np.uint8))
    margin_mm = (descriptor_footprint_voxels(similarity, options) + stride) * spacing
    # a's foreground: its weights' support (docs/DESIGN.md, "Bins over the foreground")
    index = np.argwhere(a_p.fov & a_p.mask)[::7, ::-1].astype(np.float64)
    points = a_p.grid.to_physical(index)
    rigid = levels[0].model
    built: dict[int, tuple[Objective, ...] | None] = {}
    identity_map: DescriptorMap = levels[1].fixed  # type: ignore[attr-defined]
    base_rotation = b_direction @ a_p.grid.direction.T
    factor = block_factor(float(identity_map.grid.spacing[0]))
    scanned: dict[int, ScanTerms] = {}
    per_bin = (translation_scan.SCAN_PER_BIN  # (SCAN_MIN_STARTS says why)
               if options.starts >= translation_scan.SCAN_MIN_STARTS else 0)

    def bin_objectives(k: int) -> tuple[Objective, ...] | None:
        """Bin k's (coarse, fine, refine) objectives (None: no contrast on its grid)."""
        if k not in built:
            local = points @ directions[k]
            bounds = (local.min(axis=0) - margin_mm, local.max(axis=0) + margin_mm)
            image = regrid(smoothed, spacing, mask, directions[k], bounds, stride,
                           a_p.normalisation, a_p.region, max_voxels)
            # Not quantised (even with precision int8): only the values at the sample points
            # are kept, and quantising the whole map took longer than describing it.
            fmap, _, _ = descriptor_maps(image, similarity, options)
            weights = fixed_weights(image, stride)
            if not np.any(weights > 0):
                built[k] = None
                return None
            objectives = _bin_level_objectives(fmap, weights, levels, pool, options.seed)
            built[k] = objectives
            if per_bin > 0:
                scanned[k] = sampled_terms(fmap, weights, factor)
        return built[k]

    def level(index: int) -> OrientedObjective:
        identity = levels[index]

        def build(k: int) -> Objective:
            found = bin_objectives(k)
            # (no contrast on this bin's grid: score with the identity's)
            return identity if found is None else found[index]
        objectives: list[Objective | None] = [identity] + [None] * (len(bins) - 1)
        return OrientedObjective(rigid, bins, base_rotation, build, objectives)

    def scan(admissible: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
        fine_identity = levels[1]
        other = other_terms(fine_identity.moving, factor)  # type: ignore[attr-defined]
        scanned[0] = sampled_terms(identity_map, fine_identity.weight_map,  # type: ignore
                                   factor)
        to_scan = []
        for k in range(len(bins)):
            found = bin_objectives(k) if k else (levels[0], fine_identity)
            if found is not None:
                to_scan.append(BinScan(scanned.pop(k), bins[k] @ base_rotation,
                                       found[1].chance_cost))  # type: ignore[attr-defined]
        return scan_poses(to_scan, other, similarity.objective_kind, rigid.center, per_bin,
                          admissible)

    return (level(0), level(1), level(2)), (scan if per_bin > 0 else None)


def _bin_level_objectives(fmap: DescriptorMap, weights: np.ndarray,
                          levels: tuple[Objective, Objective, Objective], pool: bool, seed: int
                          ) -> tuple[Objective, ...]:
    """An orientation bin's (coarse, fine, refine) objectives on its sampled map ``fmap``
    (the coarse one pooled when ``pool``), against the identity levels' other maps.

    All three at once, then the map goes (``release_fixed_map``): an objective needs the
    sampled map's values at its points only, and a map kept for a later level (90 MB a
    torso bin) made every later bin's descriptors land on fresh pages (2.5x slower here;
    building a level that no surviving start needs costs ~8 ms).
    """
    objectives = []
    for index, identity in enumerate(levels):
        level_map, level_weights = fmap, weights
        if index == 0 and pool:
            level_map = fmap.pooled()
            level_weights = pool_weights(weights, level_map.grid.shape)
        objective = _objective(level_map, identity.moving,  # type: ignore[attr-defined]
                               level_weights, identity.model,  # type: ignore[attr-defined]
                               identity.kind,  # type: ignore[attr-defined]
                               COARSE_POINTS if index == 0 else FINE_POINTS, seed)
        objective.release_fixed_map()
        objectives.append(objective)
    return tuple(objectives)


def _timed(timings: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    timings[name] = timings.get(name, 0.0) + now - start
    return now


def register(fixed: sitk.Image, moving: sitk.Image, options: RegistrationOptions | None = None,
             fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
             progress: Progress | None = None, cancel: Cancel | None = None,
             initial_transform: sitk.Transform | None = None,
             max_voxels: int = MAX_WORKING_VOXELS) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; the result maps fixed points to moving points (mm).

    ``initial_transform`` (fixed -> moving, LPS mm, linear: ``transforms.linear_matrix``)
    replaces the header pose as the pose the search centres on (a tracked probe, an
    earlier result); with zero rotation and translation ranges it is refined only.
    ``max_voxels``: the most voxels any working grid of the registration may hold
    (InputError naming --working-spacing above it; runner.run_registration passes its
    ``InputLimits.max_voxels``).
    """
    with serial_blas():  # see threads.py: spinning BLAS workers stall a busy machine
        return _register(fixed, moving, options, fixed_mask, moving_mask, progress, cancel,
                         initial_transform, max_voxels)


class _Clock:
    """Stage timings (s) of one registration: each ``lap`` adds the time since the last."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        self.t = _timed(self.timings, name, self.t)


@dataclass(frozen=True)
class _Inputs:
    """A pair's inputs as ``_prepare_pair`` made them, before any ultrasound smoothing, for
    another run on the same inputs (``_nonlinear_from_rigid``): each image antialiased for
    the working ``spacing`` (mm; ``antialias``), and each prepared as that run prepares it
    (None where the next run prepares it otherwise: another mask, other axes)."""

    spacing: float
    fixed_smoothed: sitk.Image
    moving_smoothed: sitk.Image
    fixed_p: PreparedImage | None = None
    moving_p: PreparedImage | None = None


@dataclass
class _Pair:
    """The two prepared images of a registration and the search frame over them.

    The search frame's "fixed" side (a) provides the sample points, the other side (b)
    is interpolated; ``swap``: a is the moving image (the search then finds the mapping
    moving -> fixed and the result is its inverse). ``anchors`` (A, P), ``spreads`` (A,)
    mm and ``shares`` (A,): the poses the starts are drawn around (initial_poses), in
    the search frame; the first is the header pose or the user's initial transform.
    ``max_voxels``: the most voxels any working grid may hold.
    """

    similarity: Similarity
    spacing: float
    user_init: np.ndarray | None
    fixed_p: PreparedImage
    moving_p: PreparedImage
    ultrasound: str | None
    swap: bool
    a_img: sitk.Image
    a_p: PreparedImage
    b_img: sitk.Image
    b_p: PreparedImage
    b_mask: sitk.Image | None
    center: np.ndarray
    rigid: TransformModel
    search_model: TransformModel | ProbeModel
    anchors: np.ndarray
    spreads: np.ndarray
    shares: np.ndarray
    refine_only: bool
    max_voxels: int
    #: the inputs before any ultrasound smoothing (what a run in another mode on the same
    #: inputs would prepare: _nonlinear_from_rigid hands them on).
    inputs: _Inputs
    #: a_img and b_img antialiased for the working spacing (``antialias``): what the
    #: orientation bins and re-oriented passes re-grid.
    a_smoothed: sitk.Image
    b_smoothed: sitk.Image

    @property
    def init(self) -> np.ndarray:
        """The pose the search centres on (search frame parameters)."""
        return self.anchors[0]


@dataclass
class _Found:
    """The search's answer in the search frame: pose ``theta``, its ``cost``, the objective
    it was refined on (None for LC2), the sample points' RMS ``radius`` (mm) about the
    rotation centre, the descriptor spacing (mm), the objective's overlap and match
    quality (0-1), and the model's facts (None without the network)."""

    search: SearchResult
    theta: np.ndarray
    cost: float
    refine_objective: DescriptorObjective | None
    radius: float
    desc_spacing: float
    overlap: float
    quality: float
    model_facts: dict[str, Any] | None


@dataclass
class _Descriptors:
    """The search frame's base descriptor maps: a's (``fixed_map``, sampled at points
    weighted by ``weights``) and b's (``moving_map``, with its validity), their stride
    (working voxels), the moving validity's erosion (working voxels) and model facts."""

    fixed_map: DescriptorMap
    moving_map: DescriptorMap
    weights: np.ndarray
    stride: int
    erosion: int
    model_facts: dict[str, Any] | None


def _register(fixed: sitk.Image, moving: sitk.Image, options: RegistrationOptions | None,
              fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None,
              progress: Progress | None, cancel: Cancel | None,
              initial_transform: sitk.Transform | None = None,
              max_voxels: int = MAX_WORKING_VOXELS, rigid_found: bool = False,
              prepared: _Inputs | None = None) -> RegistrationResult:
    """``rigid_found``: the rigid pose is known (``_nonlinear_from_rigid``'s second run).
    ``prepared``: what an earlier preparation of these inputs made (``_nonlinear_from_rigid``
    hands it to both its runs)."""
    options = options or RegistrationOptions()
    report = progress or (lambda stage, fraction: None)
    clock = _Clock()
    pair = _prepare_pair(fixed, moving, options, fixed_mask, moving_mask, initial_transform,
                         max_voxels, report, clock, prepared)
    if not rigid_found and _linear_first(options, pair):
        return _nonlinear_from_rigid(fixed, moving, options, fixed_mask, moving_mask,
                                     progress, cancel, initial_transform, max_voxels,
                                     pair.moving_p.region, clock.timings, pair.inputs)
    if not pair.similarity.uses_descriptors:
        found = _lc2_search(pair, cancel, clock)
    else:
        found = _descriptor_search(pair, options, report, cancel, clock)
    return _finish_result(pair, found, fixed, options, report, cancel, clock)


#: How far (working voxels) inside the moving data a fixed point must map to be sampled by
#: a deformable or rigid+probe run on a smaller moving view: the MIND-SSC footprint (3
#: voxels at radius 1, dilation 2), so that no sampled descriptor sees the view's edge.
OVERLAP_MARGIN_VOXELS = 3


def _linear_first(options: RegistrationOptions, pair: _Pair) -> bool:
    """Whether a deformable or rigid+probe run must find its rigid pose in a run of its own
    first: the moving image is the smaller view, which the rigid search samples
    (sampling_is_moving), while these modes sample the fixed image (their fields live on
    its grid)."""
    if options.mode not in ("deformable", "rigid+probe"):
        return False
    # An ultrasound moving counts only with a padded field of view (a fan): one named so
    # that covers the whole grid keeps the joint search (the probe phantom's compression:
    # 8.0 mm found jointly, 9.8 mm refined from the rigid pose).
    fan = pair.ultrasound == "moving" and pair.moving_p.region.has_padding
    return fan or sampling_is_moving(options.model_copy(update={"mode": "rigid"}),
                                     pair.fixed_p, pair.moving_p, None)


def _nonlinear_from_rigid(fixed: sitk.Image, moving: sitk.Image, options: RegistrationOptions,
                          fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None,
                          progress: Progress | None, cancel: Cancel | None,
                          initial_transform: sitk.Transform | None, max_voxels: int,
                          moving_region: DataRegion, decided: dict[str, float],
                          prepared: _Inputs) -> RegistrationResult:
    """A deformable or rigid+probe run on a smaller moving view: the rigid registration
    (moving image sampled; the global search, or with zero ranges the refinement of the
    initial transform), then the run in its own mode refined from that pose only, on the
    fixed points the pose maps inside the moving data (``moving_region``, the moving
    image's data region); a deformable field starts from the rigid stage (not the affine
    one, whatever ``deformable_from`` says).

    Why: sampled on the fixed image, the linear search of a partial moving view (a T2
    slab, a cropped MR) ended 40-78 mm off on realistic cases where the rigid mode, which
    samples the smaller view, converged (0.5-1.9 mm); rigid+probe on a realistic
    ultrasound fan ended 34 mm off or with no foreground left after a wild compression.
    The result carries the rigid run's search evidence (confidence, agreement, ambiguity,
    overlap, match quality: what the verdict was calibrated on) and both runs' timings;
    ``decided``: the timings of the preparation that chose this path; ``prepared``: what it
    made: the rigid run takes its prepared images over (the same inputs, masks, working
    spacing and axes: only the mode differs, and it changes no preparation but the
    ultrasound smoothing, which comes after), the refinement its antialiased images only
    (its fixed mask and moving axes differ); an antialias pass costs 2.6 s on a
    512 x 512 x 300 CT."""
    linear = _register(fixed, moving, options.model_copy(update={"mode": "rigid"}),
                       fixed_mask, moving_mask, progress, cancel, initial_transform,
                       max_voxels, prepared=prepared)
    # The fixed points the deformable stage samples: those the rigid pose maps well inside
    # the moving data. Sampled over the whole fixed image, the objective's set of valid
    # points changes with the pose, and its optimum moved away from the overlap: refined
    # from the truth on a T2 slab, 22 mm off; with this mask 1.2 mm (realistic t1-t2).
    overlap = mapped_inside(moving_region.mask, fixed, linear.transform,
                            OVERLAP_MARGIN_VOXELS * linear.working_spacing_mm)
    if fixed_mask is not None:
        inside = (sitk.GetArrayViewFromImage(overlap) > 0) & mask_to_grid(fixed_mask, fixed,
                                                                          "fixed mask")
        overlap = sitk.GetImageFromArray(inside.astype(np.uint8))
        overlap.CopyInformation(fixed)
    # From the rigid pose: the affine stage, sampled on the fixed image, still drifted on
    # a torso CT-MR case (3.2 -> 25.5 mm; 2.4 mm as an affine run sampling the moving view).
    refine = options.model_copy(update={"rotation_range": 0.0, "translation_range": 0.0,
                                        "deformable_from": "rigid"})
    smoothed = replace(prepared, fixed_p=None, moving_p=None)
    try:
        refined = _register(fixed, moving, refine, overlap, moving_mask, progress, cancel,
                            linear.transform, max_voxels, rigid_found=True, prepared=smoothed)
    except InputError:
        # (An overlap too small for a mask at the working spacing: the whole fixed image.)
        refined = _register(fixed, moving, refine, fixed_mask, moving_mask, progress,
                            cancel, linear.transform, max_voxels, rigid_found=True,
                            prepared=smoothed)
    refined.initial_transform = linear.initial_transform
    for name in ("confidence", "agreeing", "refined", "ambiguous", "overlap", "match_quality",
                 "solutions", "starts"):
        setattr(refined, name, getattr(linear, name))
    refined.evaluations += linear.evaluations
    refined.sampled = linear.sampled
    refined.timings = {**{f"linear_{k}": v for k, v in linear.timings.items()},
                       **{f"linear_decision_{k}": v for k, v in decided.items()},
                       **refined.timings}
    return refined


def _prepare_pair(fixed: sitk.Image, moving: sitk.Image, options: RegistrationOptions,
                  fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None,
                  initial_transform: sitk.Transform | None, max_voxels: int,
                  report: Progress, clock: _Clock, prepared: _Inputs | None = None) -> _Pair:
    """Both images on the working grid, which one is sampled, the search model and the
    poses its starts are drawn around. ``prepared``: what an earlier preparation of these
    inputs made (``_register`` says when)."""
    similarity = similarity_spec(resolve_similarity(options))
    spacing = options.working_spacing or auto_working_spacing(fixed, moving, similarity)
    user_init = _user_initial_matrix(initial_transform)
    report("preprocess", 0.0)
    # The moving image on axes parallel to the fixed image's (under the header pose or the
    # initial transform): neither descriptor is rotation invariant, and a moving image
    # stored on an oblique grid (another scanner's, a probe's) otherwise describes its
    # neighbourhoods along axes 30-90 degrees off, so that even the true pose scored
    # badly and a refinement started there walked 10-30 mm away (realistic family).
    start_rotation = np.eye(3) if user_init is None else nearest_rotation(user_init[:3, :3])
    moving_direction = start_rotation @ Grid.from_image(fixed).direction
    inputs = _prepared_inputs(fixed, moving, fixed_mask, moving_mask, spacing,
                              moving_direction, max_voxels, prepared)
    fixed_p, moving_p = inputs.fixed_p, inputs.moving_p
    fixed_s, moving_s = inputs.fixed_smoothed, inputs.moving_smoothed
    assert fixed_p is not None and moving_p is not None
    ultrasound = resolve_ultrasound(options, fixed_p, moving_p)
    if ultrasound is not None:
        inputs = _ultrasound_closed(inputs, ultrasound, fixed, moving, fixed_mask, moving_mask,
                                    moving_direction, max_voxels)
        fixed_p, moving_p = inputs.fixed_p, inputs.moving_p
        assert fixed_p is not None and moving_p is not None
    # (Measured for the linear modes only; the probe's compression lives in the detail near
    # the probe, and 1.5 mm of smoothing moved the probe phantom's decay length 30 -> 41 mm.)
    despeckle = similarity.ultrasound_smoothing_mm > 0 and options.mode in ("rigid", "affine")
    if ultrasound == "fixed" and despeckle:
        fixed, fixed_p, fixed_s = _despeckled(fixed, fixed_p, "fixed", fixed_mask, spacing,
                                              similarity, max_voxels)
    elif ultrasound == "moving" and despeckle:
        moving, moving_p, moving_s = _despeckled(moving, moving_p, "moving", moving_mask,
                                                 spacing, similarity, max_voxels,
                                                 direction=moving_direction)
    clock.lap("preprocess")

    swap = sampling_is_moving(options, fixed_p, moving_p, ultrasound)
    # The search frame: its "fixed" side (a) provides the sample points, the other side
    # (b) is interpolated. With the moving image sampled, the search finds the mapping
    # moving -> fixed and the result is its inverse (the contract stays fixed -> moving).
    a_img, a_p, b_img, b_p, b_mask = ((moving, moving_p, fixed, fixed_p, fixed_mask) if swap
                                      else (fixed, fixed_p, moving, moving_p, moving_mask))
    a_smoothed, b_smoothed = (moving_s, fixed_s) if swap else (fixed_s, moving_s)
    header = np.eye(4) if user_init is None else user_init  # fixed -> moving, LPS mm
    header_search = np.linalg.inv(header) if swap else header

    center = Grid.from_image(a_img).center
    rigid = TransformModel("rigid", center)
    # The search model: rigid, or (rigid+probe) rigid pose and compression searched jointly.
    search_model: TransformModel | ProbeModel = rigid
    if options.mode == "rigid+probe":
        # No sector found: the paper's set-up, the ultrasound registered as the moving image.
        ultrasound = ultrasound or "moving"
        probe = resolve_probe(options.probe_origin, options.probe_axis,
                              moving if ultrasound == "moving" else fixed)
        search_model = ProbeModel(center, probe, ultrasound)
    anchors, spreads, shares = initial_poses(search_model, header_search, a_p, b_p, options,
                                             user_init is not None)
    refine_only = options.rotation_range == 0 and options.translation_range == 0
    return _Pair(similarity, spacing, user_init, fixed_p, moving_p, ultrasound, swap, a_img,
                 a_p, b_img, b_p, b_mask, center, rigid, search_model, anchors, spreads, shares,
                 refine_only, max_voxels, inputs, a_smoothed, b_smoothed)


def _prepared_inputs(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None,
                     moving_mask: sitk.Image | None, spacing: float,
                     moving_direction: np.ndarray, max_voxels: int,
                     prepared: _Inputs | None) -> _Inputs:
    """Both images antialiased for the working ``spacing`` (mm) and prepared (the moving
    one on axes ``moving_direction``), taking over what ``prepared`` already holds for
    that spacing.

    Each image is antialiased once per registration, and the copy kept for the stages
    that re-grid it (orientation bins, re-oriented refinement): a 512 x 512 x 300 CT takes
    2.6 s a Gaussian pass on 2 cores, and it was made two or three times a run (six in a
    deformable run on a smaller moving view, ``_nonlinear_from_rigid``)."""
    if prepared is None or prepared.spacing != spacing:
        prepared = _Inputs(spacing, antialias(fixed, spacing), antialias(moving, spacing))
    fixed_p, moving_p = prepared.fixed_p, prepared.moving_p
    if fixed_p is None:
        fixed_p = prepare(fixed, spacing, fixed_mask, role="fixed", max_voxels=max_voxels,
                          smoothed=prepared.fixed_smoothed)
    if moving_p is None:
        moving_p = prepare(moving, spacing, moving_mask, role="moving",
                           direction=moving_direction, max_voxels=max_voxels,
                           smoothed=prepared.moving_smoothed)
    return replace(prepared, fixed_p=fixed_p, moving_p=moving_p)


def _ultrasound_closed(inputs: _Inputs, ultrasound: str, fixed: sitk.Image,
                       moving: sitk.Image, fixed_mask: sitk.Image | None,
                       moving_mask: sitk.Image | None, moving_direction: np.ndarray,
                       max_voxels: int) -> _Inputs:
    """``inputs`` with the ultrasound image prepared again with no open face, where it had
    one: a dark face of an ultrasound is fluid or shadow, not air, and what lies beyond
    its box is unknown tissue (docs/DESIGN.md, "Open faces")."""
    prepared = inputs.fixed_p if ultrasound == "fixed" else inputs.moving_p
    assert prepared is not None
    if not any(prepared.region.open_faces):
        return inputs
    region = replace(prepared.region, open_faces=(False,) * 6)
    if ultrasound == "fixed":
        return replace(inputs, fixed_p=prepare(
            fixed, inputs.spacing, fixed_mask, role="fixed", region=region,
            max_voxels=max_voxels, smoothed=inputs.fixed_smoothed))
    return replace(inputs, moving_p=prepare(
        moving, inputs.spacing, moving_mask, role="moving", direction=moving_direction,
        region=region, max_voxels=max_voxels, smoothed=inputs.moving_smoothed))


def _no_structure(role: str) -> InputError:
    return InputError(labelled(role, "no structure inside the image's data region (no voxel "
                                     "has local contrast): nothing to register"))


def _require_structure(prepared: PreparedImage, role: str) -> None:
    """InputError when the ultrasound about to be smoothed has no local contrast as given
    (stride 1: MIND-SSC's, the similarity that smooths): smoothing an apex reflector into
    the shadow below it would otherwise make a gradient to register on."""
    if not np.any(fixed_weights(prepared, 1) > 0):
        raise _no_structure(role)


def _despeckled(image: sitk.Image, prepared: PreparedImage, role: str,
                mask: sitk.Image | None, spacing: float, similarity: Similarity,
                max_voxels: int, direction: np.ndarray | None = None
                ) -> tuple[sitk.Image, PreparedImage, sitk.Image]:
    """The ultrasound ``image`` under the similarity's Gaussian (Similarity.
    ultrasound_smoothing_mm says why) inside its data region, and that image prepared as
    ``prepared`` was (same role, mask, axes and data region): the image every later stage
    (orientation bins, re-oriented passes, the affine stage) re-grids and describes; and
    that image antialiased for ``spacing``.
    InputError first when the image as given has no structure (``_require_structure``)."""
    _require_structure(prepared, role)
    smoothed = masked_gaussian(image, prepared.region.mask, similarity.ultrasound_smoothing_mm)
    antialiased = antialias(smoothed, spacing)
    return smoothed, prepare(smoothed, spacing, mask, role=role, direction=direction,
                             region=prepared.region, max_voxels=max_voxels,
                             smoothed=antialiased), antialiased


def _lc2_search(pair: _Pair, cancel: Cancel | None, clock: _Clock) -> _Found:
    """LC2: a local search on the intensities (no descriptors, no re-orientation)."""
    search, radius, model_facts, desc_spacing, overlap = _run_lc2(
        pair.a_p, pair.b_p, pair.rigid, pair.init, pair.spacing, cancel)
    clock.lap("search")
    return _Found(search, search.theta, search.cost, None, radius, desc_spacing, overlap,
                  float(-search.cost), model_facts)


def _descriptor_search(pair: _Pair, options: RegistrationOptions, report: Progress,
                       cancel: Cancel | None, clock: _Clock) -> _Found:
    """DISA or MIND-SSC: descriptors, the global search, then the refinement of its best
    basins on re-oriented maps."""
    report("descriptors", 0.0)
    described = _describe_pair(pair, options)
    clock.lap("descriptors")
    search, settings, radius, check = _global_search(pair, described, options, report,
                                                     cancel, clock)
    theta, cost, refine_objective = _refine_basins(pair, described, search, settings, radius,
                                                   check, options, cancel)
    overlap = refine_objective.overlap(theta[None, :])
    quality = refine_objective.match_quality(cost)
    clock.lap("reorient")
    return _Found(search, theta, cost, refine_objective, radius,
                  float(described.fixed_map.grid.spacing[0]), overlap, quality,
                  described.model_facts)


def _describe_pair(pair: _Pair, options: RegistrationOptions) -> _Descriptors:
    """The base descriptor maps of both images (the moving one's validity set, both int8
    codes with precision int8) and the sampled image's weights."""
    a_p, b_p, similarity = pair.a_p, pair.b_p, pair.similarity
    fixed_map, stride, model_facts = descriptor_maps(a_p, similarity, options)
    moving_map, _, _ = descriptor_maps(b_p, similarity, options)
    erosion = validity_erosion_voxels(similarity, stride, options)
    moving_map = moving_map.with_validity(moving_validity(b_p, stride, erosion))
    if options.precision == "int8":
        fixed_map, moving_map = fixed_map.quantised(), moving_map.quantised()
    weights = fixed_weights(a_p, stride)
    if not np.any(weights > 0):
        # (An ultrasound that is all shadow, a slab of uniform tissue.)
        raise _no_structure("moving" if pair.swap else "fixed")
    return _Descriptors(fixed_map, moving_map, weights, stride, erosion, model_facts)


def _global_search(pair: _Pair, described: _Descriptors, options: RegistrationOptions,
                   report: Progress, cancel: Cancel | None, clock: _Clock
                   ) -> tuple[SearchResult, SearchSettings, float, np.ndarray]:
    """The multi-start search on the (coarse, fine, refine) objectives; returns its result,
    its settings, the sample points' RMS radius (mm) and the points (LPS mm, search frame)
    that mapping distances are measured on."""
    kind = pair.similarity.objective_kind
    fixed_map, moving_map, weights = described.fixed_map, described.moving_map, described.weights
    pool = max(fixed_map.grid.shape) > COARSE_POOL_ABOVE
    coarse_fixed = fixed_map.pooled() if pool else fixed_map
    coarse_moving = moving_map.pooled() if pool else moving_map
    coarse_weights = pool_weights(weights, coarse_fixed.grid.shape) if pool else weights

    def objective(f: DescriptorMap, m: DescriptorMap, w: np.ndarray, n: int,
                  model: TransformModel | ProbeModel) -> DescriptorObjective:
        return _objective(f, m, w, model, kind, n, options.seed)

    search_model = pair.search_model
    coarse = objective(coarse_fixed, coarse_moving, coarse_weights, COARSE_POINTS, search_model)
    fine = objective(fixed_map, moving_map, weights, FINE_POINTS, search_model)
    refine_objective = objective(fixed_map, moving_map, weights, FINE_POINTS, search_model)
    points = refine_objective.physical_points
    levels: tuple[Objective, Objective, Objective] = (coarse, fine, refine_objective)
    anchors, spreads, shares = pair.anchors, pair.spreads, pair.shares
    placed: np.ndarray | None = None
    if pair.similarity.oriented_search and isinstance(search_model, TransformModel) \
            and not pair.refine_only:
        levels, scan = oriented_levels(levels, pair.a_img, pair.a_p, pair.b_p.grid.direction,
                                       pair.spacing, pair.similarity, options, described.stride,
                                       pool, pair.a_smoothed, pair.max_voxels)
        clock.lap("orientations")
        if scan is not None:
            # Each scanned pose is one start of its own (spread 0, no share of the random
            # ones), within the search's ranges: the 500-start budget stays.
            poses = scan(functools.partial(within_ranges, anchors=anchors, spreads_mm=spreads,
                                           rotation_range_deg=options.rotation_range))
            if poses:
                placed = np.arange(len(anchors) + len(poses)) >= len(anchors)
                anchors = np.vstack([anchors, poses])
                spreads = np.concatenate([spreads, np.zeros(len(poses))])
                shares = np.concatenate([shares, np.zeros(len(poses))])
            clock.lap("scan")
    radius = _radius(points, pair.center)
    refine_only = pair.refine_only
    settings = SearchSettings(
        starts=1 if refine_only else options.starts, rotation_range_deg=options.rotation_range,
        top_k=1 if refine_only else options.top_k, seed=options.seed,
        # Refining a given pose: no Adam walk on the pooled maps, straight to L-BFGS.
        coarse_rounds=() if refine_only else SearchSettings.coarse_rounds,
        fine_steps=0 if refine_only else SearchSettings.fine_steps,
        agree_tolerance_mm=max(5.0, 2.0 * float(fixed_map.grid.spacing[0])),
    )
    check = points[:: max(1, len(points) // 2000)]
    search = global_search(
        *levels, search_model, anchors, settings, radius,
        coarse_spacing_mm=float(coarse_fixed.grid.spacing[0]),
        fine_spacing_mm=float(fixed_map.grid.spacing[0]),
        check_points=check, progress=report, cancel=cancel,
        spreads_mm=spreads, shares=shares, placed=placed)
    clock.lap("search")
    clock.timings.update({f"search_{k}": v for k, v in search.timings.items()})
    report("reorient", 0.0)
    return search, settings, radius, check


def _refine_basins(pair: _Pair, described: _Descriptors, search: SearchResult,
                   settings: SearchSettings, radius: float, check: np.ndarray,
                   options: RegistrationOptions, cancel: Cancel | None
                   ) -> tuple[np.ndarray, float, DescriptorObjective]:
    """The search's best basin and its runners-up refined on re-oriented maps; the lowest
    cost wins (pose, cost, objective). Sets ``search.ambiguous`` when a rival within the
    ambiguity margin maps points elsewhere, and counts the refinements' evaluations."""
    # Antialiased once for the winner and every runner-up, by _prepare_pair (0.1-0.4 s a
    # phantom torso, 2.6 s a 512 x 512 x 300 CT); the smoothed fixed map they share is
    # cached by DescriptorMap.smoothed.
    b_p = pair.b_p

    def reoriented(start: np.ndarray, passes: int | None = None,
                   memo: dict[Any, Any] | None = None
                   ) -> tuple[np.ndarray, float, DescriptorObjective]:
        return _reoriented_refinement(
            start, pair.b_mask, b_p.normalisation, pair.spacing,
            pair.a_p.grid.direction, pair.search_model, options, pair.similarity,
            described.fixed_map, described.weights, pair.similarity.objective_kind, radius,
            cancel, smoothed=pair.b_smoothed, passes=passes, region=b_p.region,
            erosion=described.erosion, max_voxels=pair.max_voxels, memo=memo)

    outcomes = [reoriented(search.theta)]
    search.evaluations += outcomes[0][2].evaluations
    # Rivals (another basin that scored almost as well) are decided by the refinement
    # on re-oriented maps, the only cost that compares neighbourhoods in one
    # orientation: the search's maps (even its orientation bins) rank basins up to
    # their orientation error, and 9 of the 11 ambiguous realistic results were wrong.
    # Runner-up basins too, even beyond the ambiguity margin (up to RIVAL_GAP): on
    # realistic cases the search's best basin ended 10-35 mm off where a runner-up
    # refined to a lower re-oriented cost.
    # A runner-up is screened with a few passes and refined in full only when it comes
    # within the ambiguity margin of the winner: the rest cannot win or be ambiguous.
    tolerance = settings.agree_tolerance_mm
    decided = False  # whether re-oriented costs decide the ambiguity (not the search's)
    for rank, rival in enumerate(search.basins[:MAX_RIVALS]):
        if (rival.cost - search.cost) / search.contrast >= RIVAL_GAP:
            break  # (basins are sorted by cost: the rest lie further)
        # The full refinement starts as the screening did: the screening's first passes
        # (re-gridded maps, non-final L-BFGS) are kept for it, per rival, then dropped.
        memo: dict[Any, Any] = {}
        passes = SCREEN_PASSES if rank < LATE_RIVALS_FROM else LATE_SCREEN_PASSES
        screened = reoriented(rival.theta, passes, memo)
        search.evaluations += screened[2].evaluations
        if (screened[1] - outcomes[0][1]) / search.contrast >= settings.ambiguity_margin:
            continue
        if any(mapping_distance(pair.search_model, screened[0], outcome[0], check)
               <= tolerance for outcome in outcomes):
            # Screened into a basin already refined: the same answer, which can neither
            # make the result ambiguous nor move it beyond the agreement tolerance.
            decided = True
            continue
        # From the basin again, not from the screened pose: continuing from there
        # ended a realistic T1-T2 case in another basin (4.4 -> 87 mm).
        outcomes.append(reoriented(rival.theta, memo=memo))
        search.evaluations += outcomes[-1][2].evaluations
    outcomes.sort(key=lambda outcome: outcome[1])
    theta, cost, refine_objective = outcomes[0]
    if decided or len(outcomes) > 1:
        search.ambiguous = any(
            (other_cost - cost) / search.contrast < settings.ambiguity_margin
            and mapping_distance(pair.search_model, other, theta, check) > tolerance
            for other, other_cost, _ in outcomes[1:])
    return theta, cost, refine_objective


def _finish_result(pair: _Pair, found: _Found, fixed: sitk.Image,
                   options: RegistrationOptions, report: Progress, cancel: Cancel | None,
                   clock: _Clock) -> RegistrationResult:
    """The later stages (affine, deformable or the probe's field) and the result, mapped
    back to the contract's direction (fixed -> moving) when the moving image was sampled."""
    model, theta, cost = _affine_if_asked(pair, found, options, report, cancel, clock)
    overlap = found.overlap
    if isinstance(pair.search_model, TransformModel):
        # The overlap a user reads: of the data volumes, not of the objective's weights.
        overlap = data_overlap(pair.a_p, pair.b_p, model.matrix_4x4(theta))
    field_transform, displacement, deformation, probe_facts = _nonlinear_field(
        pair, found, model, theta, fixed, options, report, cancel, clock)

    a_p, search, search_model = pair.a_p, found.search, pair.search_model
    check = a_p.grid.to_physical(np.argwhere(a_p.mask)[::97, ::-1].astype(np.float64))
    solutions = [{"cost": s.cost, "distance_to_best_mm": mapping_distance(
        search_model, s.theta, search.theta, check)} for s in search.solutions]
    start_matrix = _search_matrix(search_model, pair.init)
    if pair.swap:
        # Back to the contract's direction: the search mapped moving points to fixed ones.
        assert isinstance(model, TransformModel)
        model, theta = _inverted(model, theta, Grid.from_image(fixed).center)
        start_matrix = np.linalg.inv(start_matrix)
    fixed_p, moving_p = pair.fixed_p, pair.moving_p
    return RegistrationResult(
        mode=options.mode, similarity=pair.similarity.name, theta=theta,
        transform=model.to_sitk(theta), initial_transform=_affine_sitk(start_matrix),
        matrix=model.matrix_4x4(theta), cost=cost,
        similarity_value=pair.similarity.similarity_value(cost),
        evaluations=search.evaluations, starts=search.starts, confidence=search.confidence,
        agreeing=search.agreeing, refined=len(search.solutions), ambiguous=search.ambiguous,
        overlap=overlap, working_spacing_mm=pair.spacing,
        descriptor_spacing_mm=found.desc_spacing, timings=clock.timings, solutions=solutions,
        model=found.model_facts, field_transform=field_transform, displacement=displacement,
        deformation=deformation, probe=probe_facts, sampled="moving" if pair.swap else "fixed",
        ultrasound=pair.ultrasound, match_quality=found.quality,
        fields_of_view={"fixed_padding_fraction": round(fixed_p.region.padding_fraction, 4),
                        "moving_padding_fraction": round(moving_p.region.padding_fraction, 4),
                        "fixed_data_ml": round(fixed_p.data_volume_ml, 1),
                        "moving_data_ml": round(moving_p.data_volume_ml, 1)},
    )


def _affine_if_asked(pair: _Pair, found: _Found, options: RegistrationOptions,
                     report: Progress, cancel: Cancel | None, clock: _Clock
                     ) -> tuple[TransformModel | ProbeModel, np.ndarray, float]:
    """(model, pose, cost) of the linear answer: the search's, or the affine refinement's
    in affine mode and in deformable mode from an affine start."""
    if options.mode == "affine" or (options.mode == "deformable"
                                    and options.deformable_from == "affine"):
        report("affine", 0.0)
        model = TransformModel("affine", pair.center)
        theta, cost = _affine_stage(pair.similarity, model, found.theta,
                                    found.refine_objective, found.radius, cancel, pair.a_p,
                                    pair.b_p)
        clock.lap("affine")
        return model, theta, cost
    return pair.search_model, found.theta, found.cost


def _nonlinear_field(pair: _Pair, found: _Found, model: TransformModel | ProbeModel,
                     theta: np.ndarray, fixed: sitk.Image, options: RegistrationOptions,
                     report: Progress, cancel: Cancel | None, clock: _Clock
                     ) -> tuple[sitk.Transform | None, sitk.Image | None,
                                dict[str, Any] | None, dict[str, Any] | None]:
    """The full non-linear mapping of deformable and rigid+probe modes (None otherwise):
    its ITK transform, u(x) = T(x) - x on the fixed grid (LPS mm), the deformation's
    facts (Jacobian metrics included) and the probe's facts."""
    field_transform: sitk.Transform | None = None
    deformation: dict[str, Any] | None = None
    probe_facts: dict[str, Any] | None = None
    if options.mode == "deformable":
        report("deformable", 0.0)
        assert found.refine_objective is not None  # options refuse LC2 for this mode
        assert not pair.swap  # (sampling_is_moving keeps the fixed image sampled here)
        assert isinstance(model, TransformModel)  # (not rigid+probe)
        field_transform, deformation = _deformable(
            model, theta, found.refine_objective, pair.similarity.objective_kind, fixed,
            pair.spacing, options, cancel)
        clock.timings.update(deformation.pop("timings"))
        clock.lap("deformable")
    elif isinstance(model, ProbeModel):
        field_transform = _probe_transform(model, theta, fixed, pair.fixed_p.grid)
        probe_facts = model.describe(theta)
    displacement = None
    if field_transform is not None:
        report("field", 0.0)
        displacement = dense_displacement(field_transform, fixed)
        deformation = {**jacobian_metrics(displacement), **(deformation or {})}
        clock.lap("field")
    return field_transform, displacement, deformation, probe_facts


def _user_initial_matrix(transform: sitk.Transform | None) -> np.ndarray | None:
    """The 4x4 fixed -> moving matrix of a user's initial transform (InputError if it is not
    linear)."""
    if transform is None:
        return None
    from disa.registration.transform.parametric import linear_matrix

    try:
        return linear_matrix(transform)
    except ValueError as exc:
        raise InputError(f"initial transform: {exc}") from exc


def _search_matrix(model: TransformModel | ProbeModel, theta: np.ndarray) -> np.ndarray:
    """4x4 matrix of the linear (rigid) part of ``theta`` in the search frame."""
    rigid = model.rigid if isinstance(model, ProbeModel) else model
    return rigid.matrix_4x4(theta[: rigid.n_params])


def _affine_sitk(matrix: np.ndarray) -> sitk.Transform:
    """A 4x4 fixed -> moving matrix as a SimpleITK affine transform."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in matrix[:3, :3].ravel()))
    tx.SetTranslation(tuple(float(v) for v in matrix[:3, 3]))
    return tx


def _inverted(model: TransformModel, theta: np.ndarray, center: np.ndarray
              ) -> tuple[TransformModel, np.ndarray]:
    """The inverse mapping of ``theta`` as parameters of the same family about ``center``."""
    inverse = np.linalg.inv(model.matrix_4x4(theta))
    out = TransformModel(model.mode, np.asarray(center, dtype=np.float64))
    if model.mode == "rigid":
        return out, rigid_parameters(inverse, center)
    a, b = inverse[:3, :3], inverse[:3, 3]
    t = a @ center + b - center
    return out, np.concatenate([a.ravel(), t])


#: An ultrasound is recognised by a padded field of view covering at least this fraction of
#: its buffer (a fan or cone leaves 30-60 % of a scan-converted volume at zero).
ULTRASOUND_MIN_PADDING = 0.15
#: The moving image provides the sample points when its data volume is below this fraction
#: of the fixed image's (docs/DESIGN.md, "Which image is sampled").
SAMPLE_SMALLER_BELOW = 0.7


def resolve_ultrasound(options: RegistrationOptions, fixed_p: PreparedImage,
                       moving_p: PreparedImage) -> str | None:
    """Which image is an ultrasound volume: the option, else the one whose field of view is
    padded like a sector (zeros around a fan that narrows to its probe), the more padded
    of two; None for neither. (Zeros alone also pad a skull-stripped brain: the bundled
    sample's T2 was taken for an ultrasound until the shape was asked for too.)"""
    if options.ultrasound is not None:
        return options.ultrasound
    padded = {role: p.region.padding_fraction for role, p in
              (("fixed", fixed_p), ("moving", moving_p))
              if p.region.padding_value == 0.0 and p.region.padding_fraction
              >= ULTRASOUND_MIN_PADDING and sector_shaped(p.region)}
    if not padded:
        return None
    return max(padded, key=lambda role: padded[role])


def data_overlap(a_p: PreparedImage, b_p: PreparedImage, a_to_b: np.ndarray,
                 max_points: int = 20_000) -> float:
    """The overlap a user reads (0-1): the share of one image's data (foreground inside its
    field of view) that lands in the other image's field of view under ``a_to_b`` (4x4,
    LPS mm), the larger of the two shares, so that a smaller view wholly inside the other
    counts as full overlap.

    Why not the objective's overlap (the weighted share of the sampled points): its
    weights follow local contrast, so a whole head sampled against a skull-stripped
    brain of about its data volume overlapped "38 %" at the right pose, the scalp's
    edges carrying most of the weight.
    """
    def share(src: PreparedImage, dst: PreparedImage, matrix: np.ndarray) -> float:
        voxels = np.argwhere(src.mask & src.fov)
        if len(voxels) == 0:
            return 0.0
        voxels = voxels[:: max(1, len(voxels) // max_points)]
        points = src.grid.to_physical(voxels[:, ::-1].astype(np.float64))
        mapped = points @ matrix[:3, :3].T + matrix[:3, 3]
        index = np.rint(dst.grid.to_index(mapped)).astype(int)[:, ::-1]  # (z, y, x)
        inside = np.all((index >= 0) & (index < np.asarray(dst.fov.shape)), axis=1)
        hits = np.zeros(len(index), dtype=bool)
        hits[inside] = dst.fov[tuple(index[inside].T)]
        return float(hits.mean())

    return max(share(a_p, b_p, a_to_b), share(b_p, a_p, np.linalg.inv(a_to_b)))


def sampling_is_moving(options: RegistrationOptions, fixed_p: PreparedImage,
                       moving_p: PreparedImage, ultrasound: str | None) -> bool:
    """True when the moving image should provide the sample points: it is the ultrasound
    (given or detected), or its data covers clearly less than the fixed image's. Deformable
    and rigid+probe runs keep the fixed image sampled (their fields live on its grid)."""
    if options.mode in ("deformable", "rigid+probe"):
        return False
    if ultrasound is not None:
        return ultrasound == "moving"
    return moving_p.data_volume_ml < SAMPLE_SMALLER_BELOW * fixed_p.data_volume_ml


def validity_erosion_voxels(similarity: str | Similarity, stride: int,
                            options: RegistrationOptions) -> int:
    """How far (working voxels) inside its data region a moving descriptor counts: one
    descriptor cell for DISA, the MIND-SSC footprint for MIND-SSC (Similarity says why)."""
    return similarity_spec(similarity).validity_erosion_voxels(stride, options)


def moving_validity(image: PreparedImage, stride: int, erosion_voxels: int) -> np.ndarray:
    """Validity (bool) of the interpolated image's descriptor grid: its data region, within
    the user's mask if one was given, eroded by ``erosion_voxels``."""
    valid = image.trusted(erosion_voxels)
    if not valid.any():  # (a tiny field of view: better its edge than nothing)
        valid = image.fov
    if image.user_mask:
        valid = valid & image.mask
    return np.ascontiguousarray(valid[::stride, ::stride, ::stride])


def _data_extent_mm(image: PreparedImage) -> np.ndarray:
    """Extent (mm) along the grid axes of the foreground that has data."""
    idx = np.argwhere(image.mask & image.fov)
    if len(idx) == 0:
        idx = np.argwhere(image.fov)
    return (idx.max(axis=0) - idx.min(axis=0) + 1)[::-1] * image.grid.spacing


#: Placements of a small field of view over the larger one's foreground (init "auto").
PLACEMENTS = 24
#: Starts of a placement are spread by this much (mm) around it.
PLACEMENT_SPREAD_MM = 15.0
#: Fields of view this much smaller (data volume ratio) than the other get placements.
PLACE_BELOW = 0.5


def translation_range_mm(options: RegistrationOptions, a_p: PreparedImage,
                         b_p: PreparedImage) -> float:
    """The starts' translation range (mm): the option, else half the larger data extent,
    clipped to [40, 120] mm (a head: ~100 mm; a torso is capped)."""
    if options.translation_range is not None:
        return float(options.translation_range)
    extent = max(float(_data_extent_mm(a_p).max()), float(_data_extent_mm(b_p).max()))
    return float(np.clip(0.5 * extent, 40.0, 120.0))


def initial_poses(model: TransformModel | ProbeModel, header: np.ndarray, a_p: PreparedImage,
                  b_p: PreparedImage, options: RegistrationOptions, given: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The poses the starts are drawn around (A, P), their translation spreads (A,) mm and
    their shares of the starts (A,), in the search frame (a's points -> b's points).

    Row 0 is the pose the search never drops (search.py): the header pose or the user's
    initial transform (``header``, 4x4), or with init "centers" the centroid pose. Then:
    the header pose with its foreground centroid moved onto the other's (init auto or
    centers), and, when a's data is much smaller than b's (a slab, a sector, a crop),
    PLACEMENTS poses that put a's centroid on points spread over b's foreground (init
    auto), each searched within PLACEMENT_SPREAD_MM: a centroid-to-centroid start is wrong
    whenever one image sees only a part of the other.
    """
    rigid = model.rigid if isinstance(model, ProbeModel) else model
    base = model.identity()
    base[:6] = rigid_parameters(header, rigid.center)
    spread = translation_range_mm(options, a_p, b_p)
    if options.rotation_range == 0 and options.translation_range == 0:
        return base[None, :], np.zeros(1), np.ones(1)
    r = rotation_matrix(base[:3])
    c = rigid.center
    a_centroid = a_p.centroid  # (a pass over the whole mask: once, not per placement)

    def placed(target: np.ndarray) -> np.ndarray:
        theta = base.copy()
        theta[3:6] = target - r @ (a_centroid - c) - c
        return theta

    centred = placed(b_p.centroid)
    poses: list[np.ndarray] = []
    spreads: list[float] = []
    shares: list[float] = []
    if options.init == "centers":
        poses, spreads, shares = [centred], [spread], [1.0]
    elif options.init == "geometry":
        poses, spreads, shares = [base], [spread], [1.0]
    else:
        poses, spreads, shares = [base, centred], [spread, spread], [0.5, 0.5]
        if a_p.data_volume_ml < PLACE_BELOW * b_p.data_volume_ml:
            rng = np.random.default_rng([options.seed, 7])
            region = np.argwhere(b_p.mask & b_p.fov)[:, ::-1].astype(np.float64)
            picks = region[rng.choice(len(region), min(PLACEMENTS, len(region)), replace=False)]
            targets = b_p.grid.to_physical(picks)
            # The header keeps half the starts: a scanner's frame of reference is the best
            # prior there is, and placements are the fallback when it is useless. With a
            # quarter (the first version) the torso CT-MR cases lost the true basin that the
            # header-only search found (2/4 -> 4/4 on those cases, 1 per bin; chosen on the
            # benchmark's own cases, so a rerun with more cases must confirm it).
            shares = [0.5, 0.2]
            for target in targets:
                poses.append(placed(target))
                spreads.append(PLACEMENT_SPREAD_MM)
                shares.append(0.3 / len(targets))
    if given and options.init != "geometry" and not any(np.array_equal(base, p) for p in poses):
        poses.insert(0, base)
        spreads.insert(0, spread)
        shares.insert(0, 0.5)
    return np.array(poses), np.array(spreads), np.array(shares) / np.sum(shares)


def _objective(fixed_map: DescriptorMap, moving_map: DescriptorMap, weights: np.ndarray,
               model: TransformModel | ProbeModel, kind: str, n_points: int, seed: int
               ) -> DescriptorObjective:
    """Eq. 2 for a transform family: the matrix kernel for rigid/affine, the per-point
    kernel for non-linear families (rigid+probe). DISA's points are jittered within
    their 8 mm descriptor cells (``DescriptorObjective``: the grid-alignment bias)."""
    cls = PointObjective if isinstance(model, ProbeModel) else DescriptorObjective
    return cls(fixed_map, moving_map, weights, model, kind=kind,  # type: ignore[arg-type]
               n_points=n_points, seed=seed, jitter=kind == "dot")


def _deformable(model: TransformModel, theta: np.ndarray, objective: DescriptorObjective,
                kind: str, fixed: sitk.Image, spacing: float, options: RegistrationOptions,
                cancel: Cancel | None) -> tuple[sitk.Transform, dict[str, Any]]:
    """The deformable stage on the final linear stage's descriptor maps (the moving map
    re-gridded along the fixed axes); returns T(x) = L(x + v(x)) and the stage's facts."""
    linear = model.matrices(theta[None, :])[0][0]
    # DISA's 8 mm moving map pulls node-sampled similarity onto its nodes: integrate
    # over each cell instead (deformable.py, step 4).
    settings = DeformableSettings(regularisation=options.regularisation,
                                  search_radius_mm=options.search_radius,
                                  sub_points=8 if kind == "dot" else 0)
    stage = deformable_stage(objective.fixed, objective.moving, objective.weight_map, linear,
                             kind, fixed, spacing, settings, cancel)  # type: ignore[arg-type]
    transform = residual_transform(model.to_sitk(theta), stage.field, stage.grid)
    facts = {"linear_stage": model.mode,
             "control_spacing_mm": float(stage.grid.spacing[0]),
             "control_grid_size": list(stage.grid.size_xyz),
             "similarity_term_before": stage.similarity_before,
             "similarity_term_after": stage.similarity_after,
             "min_control_jacobian": stage.min_corner_jacobian,
             "timings": stage.timings}
    return transform, facts


def _probe_transform(model: ProbeModel, theta: np.ndarray, fixed: sitk.Image,
                     working_grid: Grid) -> sitk.Transform:
    """The rigid+probe mapping as T(x) = R(x + r(x)), r on a 2-voxel grid covering the fixed
    image (the compression varies over tens of mm: linear interpolation is exact to
    ~0.05 mm there)."""
    grid, _ = covering_grid(working_grid.strided(2), fixed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    points = grid.to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1).astype(float))
    p = model.rigid.matrices(theta[None, :6])[0][0]
    moved = model.apply(theta, points)
    residual = np.linalg.solve(p[:, :3], (moved - points @ p[:, :3].T - p[:, 3]).T).T
    return residual_transform(model.to_sitk(theta), residual.reshape(*grid.shape, 3), grid)


def _matched_deformation(model: ProbeModel, theta: np.ndarray, smoothed: sitk.Image,
                         mask: sitk.Image | None, regridded: PreparedImage, spacing: float,
                         fixed_grid: Grid, region: DataRegion | None = None,
                         max_voxels: int = MAX_WORKING_VOXELS) -> PreparedImage:
    """The re-gridded moving image resampled so that it shows the tissue deformed as the
    fixed image does under theta (probe.py, "Matched-deformation refinement")."""
    reference = regridded.grid.reference_image()
    stride = max(1, round(4.0 / float(fixed_grid.spacing[0])))  # ~4 mm: exact to ~0.1 mm
    field_grid, _ = covering_grid(fixed_grid.strided(stride), fixed_grid.reference_image())
    warp = model.regrid_transform(theta, regridded.grid.strided(2), field_grid)
    background = float(sitk.GetArrayViewFromImage(smoothed).min())
    image = sitk.Resample(smoothed, reference, warp, sitk.sitkLinear, background,
                          sitk.sitkFloat32)
    warped_mask = None if mask is None else sitk.Resample(
        mask, reference, warp, sitk.sitkNearestNeighbor, 0)
    # (The data region moves by the compression, a few mm: the unwarped one is kept.)
    return prepare(image, spacing, warped_mask, smoothed=image, role="moving", region=region,
                   max_voxels=max_voxels)


def _radius(points: np.ndarray, center: np.ndarray) -> float:
    """RMS distance (mm) of the sample points from the rotation centre, at least 10 mm."""
    return max(10.0, float(np.sqrt(np.mean(np.sum((points - center) ** 2, axis=1)))))


def descriptor_footprint_voxels(similarity: str | Similarity,
                                options: RegistrationOptions) -> int:
    """How far (working voxels) a descriptor sees from its centre: beyond this, cropping an
    image does not change the descriptors (DISA: half the network's receptive field, from
    the loaded model; MIND-SSC: neighbour distance plus patch radius)."""
    spec = similarity_spec(similarity)
    receptive_field = None
    if spec.needs_model:
        _, facts = disa_extractor()
        receptive_field = int(facts["receptive_field_voxels"])
    return spec.descriptor_footprint_voxels(options, receptive_field)


def reoriented_bounds(model: TransformModel, theta: np.ndarray, fixed_map: DescriptorMap,
                      weights: np.ndarray, direction: np.ndarray, margin_mm: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): the box, in mm along the axes ``direction``, of the moving points that the
    weighted fixed descriptor points map to under ``theta``, widened by ``margin_mm``."""
    index = np.argwhere(weights > 0)[:, ::-1].astype(np.float64)  # (x, y, z) voxel indices
    mapped = model.apply(theta, fixed_map.grid.to_physical(index))
    local = mapped @ direction
    return local.min(axis=0) - margin_mm, local.max(axis=0) + margin_mm


@dataclass
class _Reorientation:
    """What every pass of one re-oriented refinement shares: the moving image antialiased
    for the working spacing (``smoothed``), how it is re-gridded (``align``: the descriptor
    stride in working voxels, crops start a whole stride into the full grid; ``max_voxels``:
    the most voxels a re-gridded image may hold) and described, and the fixed side
    (``sampled``: the fixed map under the refinement's Gaussian of ``sigma`` descriptor
    voxels). ``footprint_mm``: how far a descriptor sees; a crop's margin is that plus the
    room a pass leaves for motion (``motion_mm``)."""

    smoothed: sitk.Image
    moving_mask: sitk.Image | None
    normalisation: IntensityNormalisation
    spacing: float
    fixed_direction: np.ndarray
    model: TransformModel | ProbeModel
    options: RegistrationOptions
    similarity: Similarity
    fixed_map: DescriptorMap
    sampled: DescriptorMap
    weights: np.ndarray
    kind: str
    region: DataRegion | None
    erosion: int
    sigma: float
    align: int
    footprint_mm: float
    max_voxels: int
    #: Results kept across refinements that share this set-up and a start (a runner-up's
    #: screening and its full refinement): re-gridded maps by pose, non-final L-BFGS
    #: results by (pose, points, iterations). Deterministic, so the same numbers.
    memo: dict[Any, Any] | None = None

    def first_motion_mm(self) -> float:
        """Room (mm) for the first pass's motion: the search's pose may still be far off."""
        return max(REORIENT_MOTION_MM, 2.0 * float(self.fixed_map.grid.spacing[0]))

    def later_motion_mm(self, previous_step_mm: float) -> float:
        """Room (mm) for a later pass's motion, from the previous pass's step (module
        constants say why); never more than the first pass's."""
        return min(self.first_motion_mm(),
                   max(REORIENT_STEP_ROOM * previous_step_mm,
                       float(self.fixed_map.grid.spacing[0])))

    def describe_moving(self, theta: np.ndarray, motion_mm: float
                        ) -> tuple[DescriptorMap, DescriptorMap, TransformModel | ProbeModel]:
        """The moving image re-gridded along the fixed axes rotated by ``theta`` (over the
        mapped fixed points, the descriptors' footprint and ``motion_mm`` of room around
        them) and described: (its map, that map smoothed by ``sigma``, the pass's model)."""
        key = ("describe", theta.tobytes(), motion_mm)
        if self.memo is not None and key in self.memo:
            return self.memo[key]  # type: ignore[no-any-return]
        described = self._describe_moving(theta, motion_mm)
        if self.memo is not None:
            self.memo[key] = described
        return described

    def refine(self, objective: DescriptorObjective, theta: np.ndarray, scales: np.ndarray,
               iterations: int, cancel: Cancel | None, n_points: int
               ) -> tuple[np.ndarray, float]:
        """L-BFGS from ``theta`` on ``objective`` (of ``n_points`` sample points), or the
        memo's result of the same refinement."""
        key = ("refine", theta.tobytes(), n_points, iterations)
        if self.memo is not None and key in self.memo:
            return self.memo[key]  # type: ignore[no-any-return]
        refined = lbfgs_refine(objective, theta, scales, iterations, cancel,
                               step_tolerance_mm=self.model.step_tolerance_mm)
        if self.memo is not None:
            self.memo[key] = refined
        return refined

    def _describe_moving(self, theta: np.ndarray, motion_mm: float
                         ) -> tuple[DescriptorMap, DescriptorMap, TransformModel | ProbeModel]:
        model, smoothed, spacing = self.model, self.smoothed, self.spacing
        rotation = model.linear_part(theta[None, :])[0][0]
        direction = rotation @ self.fixed_direction
        pass_model = model
        if isinstance(model, ProbeModel):
            # (The probe's matched deformation resamples the whole re-gridded image.)
            moving_p = prepare(smoothed, spacing, self.moving_mask, direction=direction,
                               smoothed=smoothed, role="moving", region=self.region,
                               max_voxels=self.max_voxels)
            moving_p = _matched_deformation(model, theta, smoothed, self.moving_mask, moving_p,
                                            spacing, self.fixed_map.grid, self.region,
                                            self.max_voxels)
            pass_model = model.referenced(theta)
        else:
            bounds = reoriented_bounds(model, theta, self.fixed_map, self.weights, direction,
                                       self.footprint_mm + motion_mm)
            moving_p = regrid(smoothed, spacing, self.moving_mask, direction, bounds,
                              self.align, self.normalisation, self.region, self.max_voxels)
        moving_map, stride, _ = descriptor_maps(moving_p, self.similarity, self.options)
        moving_map = moving_map.with_validity(moving_validity(moving_p, stride, self.erosion))
        if self.options.precision == "int8":
            moving_map = moving_map.quantised()
        return moving_map, moving_map.smoothed(self.sigma), pass_model

    def objective(self, fixed_map: DescriptorMap, moving_map: DescriptorMap,
                  model: TransformModel | ProbeModel, n_points: int) -> DescriptorObjective:
        return _objective(fixed_map, moving_map, self.weights, model, self.kind, n_points,
                          self.options.seed)


def _reoriented_refinement(theta: np.ndarray, moving_mask: sitk.Image | None,
                           normalisation: IntensityNormalisation,
                           spacing: float, fixed_direction: np.ndarray,
                           model: TransformModel | ProbeModel,
                           options: RegistrationOptions, similarity: Similarity,
                           fixed_map: DescriptorMap, weights: np.ndarray, kind: str,
                           radius: float, cancel: Cancel | None, *, smoothed: sitk.Image,
                           passes: int | None = None, region: DataRegion | None = None,
                           erosion: int = 1, max_voxels: int = MAX_WORKING_VOXELS,
                           memo: dict[Any, Any] | None = None
                           ) -> tuple[np.ndarray, float, DescriptorObjective]:
    """L-BFGS refinement on moving descriptors computed on a grid aligned with the fixed axes.

    Why: neither DISA nor MIND-SSC descriptors are rotation invariant; each
    image's descriptors describe its neighbourhood along its own grid axes. After
    the global search has found the rotation R, the moving image is re-gridded
    with axes R x (fixed axes) and its descriptors recomputed, so that fixed and
    moving descriptors compare neighbourhoods in the same orientation. Without
    this, a 10 degree rotation was recovered as 3 degrees on a MIND phantom.

    Each pass re-grids only the moving region that the weighted fixed points map to
    (plus the descriptors' footprint and a motion margin), with the moving image's
    first normalisation: a rotated box around the whole moving field of view held
    3x the voxels on the engine benchmark's phantom, all of them run through the
    network. The crop starts a whole descriptor stride from the uncropped grid, so
    the descriptors at the sampled points are the uncropped ones. ``smoothed``: the moving
    image antialiased for ``spacing`` (mm), which every pass re-grids. ``max_voxels``: the
    most voxels a re-gridded moving image may hold. ``memo``: shared by refinements from
    the same start (``_Reorientation.memo``).
    """
    if passes is None:
        passes = similarity.reorient_passes  # (Similarity.reorient_passes says why)
    # Both descriptor maps under the same small Gaussian (DescriptorMap.smoothed: the
    # interpolation blur otherwise pins rotations to the re-gridded lattice).
    sigma = similarity.refine_smoothing_voxels
    sampled_map = fixed_map.smoothed(sigma)
    align = max(1, round(float(fixed_map.grid.spacing[0]) / spacing))
    footprint_mm = descriptor_footprint_voxels(similarity, options) * spacing
    setup = _Reorientation(smoothed, moving_mask, normalisation, spacing, fixed_direction,
                           model, options, similarity, fixed_map, sampled_map, weights, kind,
                           region, erosion, sigma, align, footprint_mm, max_voxels, memo)
    theta, cost, objective, raw_moving_map, pass_model = _reorientation_passes(
        setup, theta, passes, model.scales(radius), cancel)
    if sigma > 0:
        # The pose comes from the smoothed maps; its cost, match quality and any later
        # stage (affine, deformable) use the unsmoothed descriptors, on which the verdict
        # was calibrated and which keep the detail a deformation needs.
        objective = setup.objective(fixed_map, raw_moving_map, pass_model, REFINE_POINTS)
        cost = float(objective.cost(theta[None, :])[0])
    return theta, cost, objective


def _reorientation_passes(setup: _Reorientation, theta: np.ndarray, passes: int,
                          scales: np.ndarray, cancel: Cancel | None
                          ) -> tuple[np.ndarray, float, DescriptorObjective, DescriptorMap,
                                     TransformModel | ProbeModel]:
    """At most ``passes`` re-grid, describe and refine passes from ``theta`` (``scales``:
    the model's parameter scales, mm of displacement at the sample radius per unit).
    Returns the pose, its cost on the smoothed maps, that objective, the last pass's
    unsmoothed moving map and the pass's model."""
    model = setup.model
    converged = False
    history: list[tuple[np.ndarray, np.ndarray]] = []  # (pose, step) in mm units
    descriptor_mm = float(setup.fixed_map.grid.spacing[0])
    motion_mm = setup.first_motion_mm()
    for pass_index in range(passes):
        raw_moving_map, moving_map, pass_model = setup.describe_moving(theta, motion_mm)
        final = pass_index == passes - 1 or converged
        n_points = REFINE_POINTS if final else FINE_POINTS
        objective = setup.objective(setup.sampled, moving_map, pass_model, n_points)
        refined, cost = setup.refine(objective, theta, scales, 100 if final else 30, cancel,
                                     n_points)
        if final:
            return refined, cost, objective, raw_moving_map, pass_model
        step = (refined - theta) / scales  # mm of displacement at the sample radius
        # Converged when the pass moved points by < REORIENT_CONVERGED of a descriptor voxel.
        converged = bool(np.abs(step).max() < REORIENT_CONVERGED * descriptor_mm)
        motion_mm = setup.later_motion_mm(float(np.abs(step).max()))
        if converged and not isinstance(model, ProbeModel):
            # The pose barely moved, so this pass's descriptors are already aligned
            # with it: the final, denser refinement reuses them rather than paying
            # for another network inference (same TRE on the capture-range cases).
            objective = setup.objective(setup.sampled, moving_map, pass_model, REFINE_POINTS)
            theta, cost = lbfgs_refine(objective, refined, scales, 100, cancel,
                                       step_tolerance_mm=model.step_tolerance_mm)
            return theta, cost, objective, raw_moving_map, pass_model
        if isinstance(model, ProbeModel):
            # (converged or not: a converged probe pass makes the next one final.)
            # The probe's decay length is a flat, noisy direction from pass to pass:
            # extrapolating it (Anderson) diverged on phantoms; plain passes do not.
            theta = refined
            continue
        theta = theta + scales * _anderson_step(history, theta / scales, step)
    raise ValueError("a re-oriented refinement needs at least one pass")


def _anderson_step(history: list[tuple[np.ndarray, np.ndarray]], pose: np.ndarray,
                   step: np.ndarray, memory: int = 3) -> np.ndarray:
    """Next move of the re-orientation fixed-point iteration (Anderson acceleration).

    Each pass removes only part of the residual rotation: the optimum lies
    between the true pose and the pose of the descriptor grid (measured ratio
    ~0.5 near the solution, up to ~0.9 along poorly constrained axes), so plain
    passes converge slowly. Anderson acceleration fits the last few (pose,
    step) pairs and jumps towards the pose whose step is zero; the jump is
    capped at 4x the plain step so a noisy fit cannot throw the pose away.
    """
    history.append((pose.copy(), step.copy()))
    del history[:-(memory + 1)]
    if len(history) < 2:
        return 1.5 * step  # over-relaxed first move: contracting for any ratio in [0, 0.8]
    poses = np.array([h[0] for h in history])
    steps = np.array([h[1] for h in history])
    d_pose = np.diff(poses, axis=0).T
    d_step = np.diff(steps, axis=0).T
    gamma, *_ = np.linalg.lstsq(d_step, step, rcond=None)
    move = step - (d_pose + d_step) @ gamma
    limit = 4.0 * np.linalg.norm(step)
    norm = np.linalg.norm(move)
    return move * (limit / norm) if norm > limit else move


def _affine_stage(similarity: Similarity, model: TransformModel, rigid_theta: np.ndarray,
                  rigid_objective: DescriptorObjective | None, radius: float,
                  cancel: Cancel | None, fixed_p: PreparedImage, moving_p: PreparedImage
                  ) -> tuple[np.ndarray, float]:
    """Affine refinement from the best rigid solution (L-BFGS, or Powell for LC2)."""
    start = model.from_rigid(rigid_theta)
    if rigid_objective is None:
        lc2 = _lc2_objective(fixed_p, moving_p, model)
        result = local_search(lc2, model, start, radius, step_mm=2.0, max_evaluations=1200,
                              cancel=cancel)
        return result.theta, result.cost
    # Same sampling as the rigid stage, jitter included: without it DISA's affine
    # optimum snaps back to the 8 mm grid alignment that the jitter removed.
    affine_objective = DescriptorObjective(
        rigid_objective.fixed, rigid_objective.moving, rigid_objective.weight_map, model,
        kind=rigid_objective.kind, n_points=rigid_objective.n_points, seed=rigid_objective.seed,
        jitter=rigid_objective.jitter)
    theta, cost = lbfgs_refine(affine_objective, start, model.scales(radius), 200, cancel,
                               step_tolerance_mm=model.step_tolerance_mm)
    det = float(np.linalg.det(theta[:9].reshape(3, 3)))
    if not 0.25 < det < 4.0:
        # A collapsing or exploding affine part is not anatomy: keep the rigid answer.
        return start, float(affine_objective.cost(start[None, :])[0])
    return theta, cost


def _lc2_objective(fixed_p: PreparedImage, moving_p: PreparedImage,
                   model: TransformModel) -> LC2Objective:
    """LC2 on copies of both images coarsened to at most LC2_MAX_DIM voxels per axis."""
    factor = max(1, int(np.ceil(max(max(fixed_p.volume.shape), max(moving_p.volume.shape))
                                / LC2_MAX_DIM)))
    step = slice(None, None, factor)
    f, m = fixed_p.volume[step, step, step], moving_p.volume[step, step, step]
    valid = moving_p.fov & moving_p.mask if moving_p.user_mask else moving_p.fov
    fixed_ok = fixed_p.mask & fixed_p.fov
    return LC2Objective(np.ascontiguousarray(f), fixed_p.grid.strided(factor),
                        np.ascontiguousarray(m), moving_p.grid.strided(factor), model,
                        fixed_mask=fixed_ok[::factor, ::factor, ::factor],
                        moving_valid=np.ascontiguousarray(valid[::factor, ::factor, ::factor]))


def _run_lc2(fixed_p: PreparedImage, moving_p: PreparedImage, rigid: TransformModel,
             init: np.ndarray, spacing: float, cancel: Cancel | None
             ) -> tuple[SearchResult, float, None, float, float]:
    objective = _lc2_objective(fixed_p, moving_p, rigid)
    z, y, x = np.nonzero(objective.fixed_mask)
    points = objective.fixed_grid.to_physical(np.stack([x, y, z], 1).astype(np.float64))
    radius = _radius(points, rigid.center)
    step = float(objective.fixed_grid.spacing[0])
    search = local_search(objective, rigid, init, radius, step_mm=step, cancel=cancel)
    return search, radius, None, step, objective.overlap(search.theta)


def load_mask(path: str | Path | None) -> sitk.Image | None:
    """A mask file (any engine input format) or None."""
    if path is None:
        return None
    from disa.core.io.images import read_image

    return read_image(path)
