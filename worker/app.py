"""The Celery app of the workers: `celery -A disa.worker.app worker` (or `disa worker`).

Settings are read when this module is imported, i.e. in the worker process,
from the same DISA_ environment as the API.
"""

from __future__ import annotations

from disa.jobs.settings import get_settings
from disa.worker.config import make_celery

app = make_celery(get_settings())
