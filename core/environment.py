"""The DISA_* variables that any process may read, other than the service settings.

The service settings (the API's and the workers': jobs folder, broker, limits)
are `disa.jobs.settings.Settings`. What is left are variables of the engine, of
the command-line clients and of training, read by code in every layer (model,
registration, training, the clients), so they live here, in the root of the
`disa` namespace that every subpackage already imports and that imports
nothing of DISA. docs/ARCHITECTURE.md, "Environment variables", lists them all.

Read afresh at each use (`Environment.read()`), as the process environment may
change between uses (tests, `disa serve --jobs-dir`); reading is a few dict
look-ups. Values are kept as given: what counts as unset (an empty value) and
which values are valid is decided where each is used, with its own message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

PREFIX = "DISA_"


@dataclass(frozen=True)
class Environment:
    """The DISA_* variables (name: DISA_ + the field's name in capitals); None: unset."""

    descriptor_engine: str | None = field(default=None, metadata={
        "doc": "program that runs the descriptor network (auto, onnxruntime, openvino-fp32, "
               "openvino-int8, openvino-bf16): disa.model.runtime.default_engine"})
    thread_policy: str | None = field(default=None, metadata={
        "doc": "passive (default) or default: OpenMP waiting and BLAS threads while "
               "registering, disa.registration.threads"})
    url: str | None = field(default=None, metadata={
        "doc": "the service URL of disa submit and disa pacs"})
    api_key: str | None = field(default=None, metadata={
        "doc": "the API key of disa submit and disa pacs (disa.service.client_key)"})
    api_key_file: str | None = field(default=None, metadata={
        "doc": "a file holding that key on its first line (preferred over DISA_API_KEY)"})
    dicomweb_token: str | None = field(default=None, metadata={
        "doc": "bearer token of the DICOMweb server of disa pacs pull"})
    cache_dir: str | None = field(default=None, metadata={
        "doc": "training's cache of derived source volumes (default ~/.cache/disa)"})

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """The variables of `environ` (default: this process's environment)."""
        environ = os.environ if environ is None else environ
        return cls(**{f.name: environ.get(variable(f.name)) for f in fields(cls)})


def variable(name: str) -> str:
    """The environment variable of an Environment field: descriptor_engine ->
    DISA_DESCRIPTOR_ENGINE."""
    return PREFIX + name.upper()
