"""DISA: multimodal 3D image registration on learned descriptors (Ronchetti et al., MICCAI 2023).

Subpackages: registration (engine), model (descriptor network runtime), training
(offline, needs torch), worker (Celery), service (FastAPI).
"""

from importlib import metadata

try:
    __version__ = metadata.version("disa")
except metadata.PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
