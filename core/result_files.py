"""The names in a result folder, and the content types the API serves them with.

A result folder is a contract with users (docs/ARCHITECTURE.md, "Contracts"): the
engine writes it (`disa.registration.results.outputs`), the job core decides which of its
files the API may serve (`disa.jobs.store`), the worker lists them in the manifest
and `disa pacs` downloads some of them. The engine may not import the job core and
the job core may not import the engine's writers, so the names live here, in the root
of the namespace that every layer may import and that imports nothing of DISA. A new
result file is one row of `CONTENT_TYPES` (and, when the service must not serve it,
an entry of `NOT_SERVED`).
"""

from __future__ import annotations

TRANSFORM_FILE = "transform.tfm"
REGISTERED_FILE = "registered.nii.gz"
QA_FILE = "qa.png"
RESULT_FILE = "result.json"
DISPLACEMENT_FILE = "displacement.nii.gz"
FIELD_TRANSFORM_FILE = "transform.h5"
INVERSE_DISPLACEMENT_FILE = "inverse_displacement.nii.gz"
WARPED_LABELS_FILE = "warped_labels.nii.gz"
REGISTRATION_FILE = "registration.dcm"

#: Every name a result folder may hold -> its content type (registration.dcm: both
#: inputs DICOM; the fields: non-linear modes; warped labels: `--warp-labels`). The
#: order is the one the API lists them in (its 404 message, its OpenAPI schema).
CONTENT_TYPES: dict[str, str] = {
    TRANSFORM_FILE: "text/plain; charset=utf-8",
    REGISTERED_FILE: "application/gzip",
    DISPLACEMENT_FILE: "application/gzip",
    INVERSE_DISPLACEMENT_FILE: "application/gzip",
    FIELD_TRANSFORM_FILE: "application/x-hdf5",
    QA_FILE: "image/png",
    RESULT_FILE: "application/json",
    REGISTRATION_FILE: "application/dicom",
    WARPED_LABELS_FILE: "application/gzip",
}
#: Every name a result folder may hold.
RESULT_NAMES: frozenset[str] = frozenset(CONTENT_TYPES)
#: Written by the CLI only: the service takes no label map, so it never serves one.
NOT_SERVED: frozenset[str] = frozenset({WARPED_LABELS_FILE})
#: The names the API may serve, with their content types. Nothing else under a job
#: folder is ever served, whatever a URL asks for.
SERVED_FILES: dict[str, str] = {name: kind for name, kind in CONTENT_TYPES.items()
                                if name not in NOT_SERVED}
