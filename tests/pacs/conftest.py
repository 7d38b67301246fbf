"""Real peers for the PACS tests: Orthanc (with its DICOMweb and Python plugins) and a
DISA service (`disa serve` without a broker: the worker runs in the API process).

Both run as subprocesses on free loopback ports with their data in temporary
folders, and are stopped when the tests that asked for them end. Tests skip
when Orthanc (Debian packages orthanc, orthanc-dicomweb, orthanc-python) is
not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from ..support import free_port

PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
PYTHON_PLUGIN = PLUGIN_DIR / "libOrthancPython.so"
PLUGIN_SCRIPT = Path(__file__).resolve().parents[2] / "disa" / "pacs" / "orthanc_plugin.py"
ORTHANC_AET = "ORTHANC"
TEST_AET = "DISATEST"  # the AE title the tests (and the pacs commands) call from


def load_dicom_fixtures() -> ModuleType:
    """tests/core/dicom_fixtures.py, loaded by path (test folders are not packages
    of one tree under pytest's importlib mode)."""
    path = Path(__file__).resolve().parents[1] / "core" / "dicom_fixtures.py"
    spec = importlib.util.spec_from_file_location("disa_test_dicom_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class OrthancServer:
    """One Orthanc process: REST at `url`, DICOMweb at `dicomweb`, DICOM at `dicom_port`."""

    folder: Path
    http_port: int
    dicom_port: int
    scp_port: int  # where Orthanc sends C-MOVEs for TEST_AET
    config: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def start(self, timeout: float = 30.0) -> None:
        config_path = self.folder / "config.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(config_path)],
                                        cwd=self.folder, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.dicomweb}/studies", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()  # never leave a half-started server behind
        raise TimeoutError(f"Orthanc did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # REST helpers (Orthanc's own API)
    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=30.0)
        response.raise_for_status()
        return response.json()

    def upload(self, files: list[Path]) -> None:
        for file in files:
            response = httpx.post(f"{self.url}/instances", content=file.read_bytes(),
                                  headers={"Content-Type": "application/dicom"}, timeout=30.0)
            response.raise_for_status()

    def clear(self) -> None:
        for patient in self.get("/patients"):
            httpx.delete(f"{self.url}/patients/{patient}", timeout=30.0).raise_for_status()

    def series_by_modality(self, modality: str) -> list[dict[str, Any]]:
        found = []
        for series_id in self.get("/series"):
            series = self.get(f"/series/{series_id}")
            if series["MainDicomTags"].get("Modality") == modality:
                found.append(series)
        return found


def orthanc_config(folder: Path, http_port: int, dicom_port: int, scp_port: int,
                   plugins: list[Path], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    return {
        "Name": "DISA-TEST",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpTimeout": 30,
        "StableAge": 1,
        "DicomScuTimeout": 10,
        "DicomCheckCalledAet": True,
        "Plugins": [str(p) for p in plugins],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        # Our test AE: Orthanc accepts its C-FIND/C-GET/C-MOVE/C-STORE and sends C-MOVEs to it.
        "DicomModalities": {
            "disa": {"AET": TEST_AET, "Host": "127.0.0.1", "Port": scp_port,
                     "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                     "AllowMove": True, "AllowStore": True},
        },
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": False,
        **(extra or {}),
    }


def _need_orthanc(*plugins: Path) -> None:
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (Debian packages orthanc orthanc-dicomweb "
                    "orthanc-python)")
    for plugin in plugins:
        if not plugin.exists():
            pytest.skip(f"Orthanc plugin {plugin.name} is not installed")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Orthanc with the DICOMweb plugin, knowing TEST_AET for DIMSE."""
    _need_orthanc(DICOMWEB_PLUGIN)
    folder = tmp_path_factory.mktemp("orthanc")
    ports = free_port(), free_port(), free_port()
    server = OrthancServer(folder, *ports)
    server.config = orthanc_config(folder, *ports, plugins=[DICOMWEB_PLUGIN])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def empty_orthanc(orthanc: OrthancServer) -> OrthancServer:
    """The session's Orthanc with no data left from earlier tests."""
    orthanc.clear()
    return orthanc


# ------------------------------------------------------------------ DISA service


@dataclass
class DisaService:
    url: str
    jobs_dir: Path
    log: Path
    proc: subprocess.Popen


def service_environment(jobs_dir: Path) -> dict[str, str]:
    return {**os.environ, "DISA_JOBS_DIR": str(jobs_dir), "DISA_BROKER_URL": "",
            "DISA_API_KEYS": "", "DISA_SWEEP_INTERVAL_S": "1", "DISA_READY_CACHE_S": "0",
            "DISA_SOFT_TIME_LIMIT_S": "300", "DISA_HARD_TIME_LIMIT_S": "330",
            "NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def disa_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DisaService]:
    """`disa serve` on a free port, embedded worker (no broker)."""
    folder = tmp_path_factory.mktemp("disa-service")
    port = free_port()
    log = folder / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "disa", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--jobs-dir", str(folder / "jobs"), "--log-level", "warning"],
            env=service_environment(folder / "jobs"), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"disa serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"disa serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield DisaService(url, folder / "jobs", log, proc)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ------------------------------------------------------------------ phantom series


@dataclass(frozen=True)
class PhantomStudy:
    """A fixed MR and a moving CT series of one patient and study, with a known motion."""

    fixed_dir: Path
    moving_dir: Path
    study_uid: str
    fixed_uid: str
    moving_uid: str
    truth: Any  # sitk transform, fixed point -> moving point

    def files(self) -> list[Path]:
        return sorted(self.fixed_dir.iterdir()) + sorted(self.moving_dir.iterdir())


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    from disa.training import phantom as ph

    dx = load_dicom_fixtures()
    root = tmp_path_factory.mktemp("phantom-study")
    truth = ph.rigid_truth((8.0, -6.0, 7.0), (10.0, -8.0, 9.0))
    pair = ph.make_pair(truth, fixed_grid=ph.make_grid((32, 32, 32), (5.0, 5.0, 5.0)))
    study = "1.2.826.0.1.3680043.9.7777.8.1"
    fixed, _ = dx.write_series(pair.fixed, root / "fixed", modality="MR", study_uid=study,
                               series_number=1, slope=0.001, intercept=0.0)
    moving, _ = dx.write_series(pair.moving, root / "moving", modality="CT", study_uid=study,
                                series_number=2, slope=1.0, intercept=0.0)
    return PhantomStudy(root / "fixed", root / "moving", study, str(fixed[0].SeriesInstanceUID),
                        str(moving[0].SeriesInstanceUID), truth)


def truth_error_mm(moving_to_fixed: np.ndarray, truth: Any, spacing: float = 15.0) -> float:
    """Mean distance (mm) between fixed lattice points and their moving-frame images
    mapped back by `moving_to_fixed` (a 4x4 REG matrix)."""
    from disa.training import phantom as ph

    fixed_points = ph.grid_points(ph.make_grid((5, 5, 5), (spacing,) * 3))
    moving_points = np.array([truth.TransformPoint(tuple(p)) for p in fixed_points])
    mapped = (np.c_[moving_points, np.ones(len(moving_points))] @ moving_to_fixed.T)[:, :3]
    return float(np.linalg.norm(mapped - fixed_points, axis=1).mean())
