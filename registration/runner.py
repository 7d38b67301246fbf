"""Run one registration from files to a result folder: the entry of the CLI and the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disa.core.io.images import inspect_image, read_image
from disa.core.io.limits import DEFAULT_LIMITS, InputLimits
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register
from disa.registration.results.labels import read_label_map
from disa.registration.results.outputs import write_result_folder
from disa.registration.search.global_search import Cancel, Progress
from disa.registration.transform.initial import read_initial_transform, transform_matrix


def run_registration(fixed_path: str | Path, moving_path: str | Path, outdir: str | Path,
                     options: RegistrationOptions | None = None,
                     fixed_mask_path: str | Path | None = None,
                     moving_mask_path: str | Path | None = None,
                     progress: Progress | None = None, cancel: Cancel | None = None,
                     limits: InputLimits = DEFAULT_LIMITS,
                     fixed_series_uid: str | None = None,
                     moving_series_uid: str | None = None,
                     initial_transform_path: str | Path | None = None,
                     warp_labels_path: str | Path | None = None) -> dict[str, Any]:
    """Read and check the inputs, register, write the result folder; return result.json data.

    ``outdir`` is replaced as a whole once the result is complete (outputs.py); it
    must be absent, empty or an earlier result folder. Callers that take ``outdir``
    from a user check it first with ``outputs.check_output_folder``.

    Raises InputError for bad input (with a message for the user) and
    CancelledError when ``cancel`` asks to stop. ``*_series_uid`` choose one
    series of a DICOM folder or zip that holds several. ``progress(stage, fraction)``
    reports stages: read, preprocess, descriptors, search, refine, reorient,
    affine, deformable, field (non-linear modes), write.
    ``initial_transform_path``: an ITK linear transform file (fixed -> moving, LPS mm) or
    a DISA result folder, the pose the search starts around instead of the headers'
    (``initial_transform.read_initial_transform``); result.json's inputs record its matrix.
    ``warp_labels_path``: a label map on the moving image's grid, written onto the fixed
    grid as warped_labels.nii.gz through the final mapping (``labels.py``); checked
    right after the images' headers, before any pixel is registered.

    ``limits`` is the one way a voxel cap reaches the engine: ``limits.max_voxels`` caps
    every input (header check, ``io.inspect_image``) and every working grid the
    registration makes (``preprocess.check_working_grid``, InputError naming
    ``--working-spacing``). The worker passes DISA_MAX_VOXELS here; the CLI the default.
    """
    report = progress or (lambda stage, fraction: None)
    report("read", 0.0)
    options = options or RegistrationOptions()
    # First: a few hundred bytes, so a bad transform is refused before the images are read.
    initial = (read_initial_transform(initial_transform_path)
               if initial_transform_path is not None else None)
    fixed_info = inspect_image(fixed_path, limits, series_uid=fixed_series_uid)
    moving_info = inspect_image(moving_path, limits, series_uid=moving_series_uid)
    # Before the images' pixels: a bad label map must not cost a whole registration.
    labels = (read_label_map(warp_labels_path, moving_info, limits)
              if warp_labels_path is not None else None)
    fixed = read_image(fixed_path, limits, series_uid=fixed_series_uid)
    moving = read_image(moving_path, limits, series_uid=moving_series_uid)
    fixed_mask = read_image(fixed_mask_path, limits) if fixed_mask_path else None
    moving_mask = read_image(moving_mask_path, limits) if moving_mask_path else None
    # The same cap on every working grid the pipeline makes (preprocess.resample_to_spacing,
    # handed down as an argument from here).
    result = register(fixed, moving, options, fixed_mask, moving_mask, progress=report,
                      cancel=cancel, initial_transform=initial, max_voxels=limits.max_voxels)
    report("write", 0.0)
    inputs = {
        "fixed": _describe(fixed_info.as_dict()),
        "moving": _describe(moving_info.as_dict()),
        "fixed_mask": fixed_mask_path is not None,
        "moving_mask": moving_mask_path is not None,
        "warp_labels": Path(warp_labels_path).name if warp_labels_path is not None else None,
        # The basename (no folders) and the 4x4 homogeneous matrix (fixed -> moving,
        # LPS mm) the search started around, to reproduce the run.
        "initial_transform": ({"path": Path(initial_transform_path).name,
                               "matrix_fixed_to_moving": transform_matrix(initial)}
                              if initial is not None else None),
        "options": options.model_dump(),
    }
    both_dicom = fixed_info.format == moving_info.format == "dicom"
    data = write_result_folder(
        result, fixed, moving, outdir, inputs,
        # DICOM REG beside the other outputs when both inputs are DICOM series (written
        # into the folder being staged, which reads displacement.nii.gz back from it).
        extra=(lambda d, folder: _write_dicom_outputs(folder, fixed_path, moving_path, d,
                                                      limits, fixed_series_uid,
                                                      moving_series_uid))
        if both_dicom else None,
        labels=labels, labels_path=warp_labels_path, fixed_mask=fixed_mask)
    report("done", 1.0)
    return data


def _write_dicom_outputs(*args: Any) -> Any:
    """results.dicom_reg.write_dicom_outputs, imported when a DICOM pair needs it: pydicom
    and its SR code dictionaries take ~0.2 s of every process start otherwise."""
    from disa.registration.results.dicom_reg import write_dicom_outputs

    return write_dicom_outputs(*args)


def _describe(info: dict[str, Any]) -> dict[str, Any]:
    """Geometry facts of an input for result.json (no identifiers: only the file's basename).

    ``geometry_correction`` is None, or how a DICOM series was resampled onto the grid
    that ``size``/``spacing``/``origin``/``direction`` describe (gantry tilt, variable
    slice spacing: ``slice_stack.plan_stack_grid``)."""
    keep = ("path", "format", "size", "spacing", "origin", "direction", "modality",
            "geometry_correction")
    return {k: info[k] for k in keep if k in info}
