"""A small DIMSE client (pynetdicom): C-ECHO, C-FIND a series, fetch it with C-GET or
C-MOVE (to a temporary storage SCP of ours), and C-STORE files back.

Association failures and timeouts are retried with bounded exponential
back-off. Received instances are written under counter names (000001.dcm, ...)
into a new or empty folder; a failed attempt removes the files it wrote and
nothing else.
pynetdicom's own logger is kept at WARNING: at INFO and below it prints
datasets, identifiers included.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    DeformableSpatialRegistrationStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    SpatialRegistrationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    Verification,
)

from disa.core.io.limits import DEFAULT_LIMITS
from disa.pacs.dicomweb import SeriesRef, check_uid, prepare_target, remove_files
from disa.pacs.retry import PacsError, RetryPolicy, SeriesNotFound, call_with_retries

logging.getLogger("pynetdicom").setLevel(logging.WARNING)

#: Image storage classes we accept when fetching (volumes DISA can register) and send.
IMAGE_STORAGE = (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
    NuclearMedicineImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)
RESULT_STORAGE = (SpatialRegistrationStorage, DeformableSpatialRegistrationStorage,
                  CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage)
_SUCCESS, _PENDING = 0x0000, (0xFF00, 0xFF01)


class AssociationFailed(PacsError):
    """No association: the peer is down, refused us, or did not answer in time."""


@dataclass(frozen=True)
class Peer:
    """The remote application entity and who we are to it."""

    host: str
    port: int
    called_aet: str
    calling_aet: str = "DISA"
    timeout_s: float = 30.0


class DimseClient:
    """C-FIND / C-GET / C-MOVE / C-STORE against one peer, with retries."""

    def __init__(self, peer: Peer, retry: RetryPolicy | None = None,
                 max_instances: int = DEFAULT_LIMITS.max_zip_members,
                 retrieve: str = "get", listen: tuple[str, int] = ("127.0.0.1", 11113)
                 ) -> None:
        if retrieve not in ("get", "move"):
            raise ValueError("retrieve must be 'get' or 'move'")
        self.peer = peer
        self.retry = retry or RetryPolicy()
        self.max_instances = max_instances
        self.retrieve, self.listen = retrieve, listen

    def fetch(self, ref: SeriesRef, folder: Path) -> list[Path]:
        """Retrieve a series the configured way: C-GET, or C-MOVE to our own SCP."""
        if self.retrieve == "move":
            return self.move_series(ref, folder, *self.listen)
        return self.get_series(ref, folder)

    # ------------------------------------------------------------ plumbing

    def _ae(self) -> AE:
        ae = AE(ae_title=self.peer.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.peer.timeout_s
        ae.connection_timeout = min(self.peer.timeout_s, 10.0)
        return ae

    def _associate(self, ae: AE, contexts: list[PresentationContext],
                   ext_neg: list[Any] | None = None,
                   handlers: list[Any] | None = None) -> Any:
        assoc = ae.associate(self.peer.host, self.peer.port, contexts=contexts,
                             ae_title=self.peer.called_aet, ext_neg=ext_neg,
                             evt_handlers=handlers)
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "no answer"
            raise AssociationFailed(f"association with {self.peer.called_aet} failed ({reason})")
        _no_delay(assoc)
        return assoc

    def _retrying(self, call: Callable[[], Any], what: str) -> Any:
        return call_with_retries(call, self.retry,
                                 lambda exc: isinstance(exc, AssociationFailed | TimeoutError),
                                 what)

    # ---------------------------------------------------------------- echo

    def echo(self) -> None:
        """C-ECHO: raises PacsUnavailable when the peer does not answer."""

        def run() -> None:
            ae = self._ae()
            assoc = self._associate(ae, [build_context(Verification)])
            try:
                status = assoc.send_c_echo()
            finally:
                assoc.release()
            if not status or status.Status != _SUCCESS:
                raise AssociationFailed("C-ECHO got no success status")

        self._retrying(run, "C-ECHO")

    # ---------------------------------------------------------------- find

    def find_series(self, series_uid: str, study_uid: str | None = None) -> SeriesRef:
        """C-FIND at SERIES level (study root); SeriesNotFound if the peer lacks it."""
        check_uid(series_uid)
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = check_uid(study_uid) if study_uid else ""
        query.SeriesInstanceUID = series_uid
        query.Modality = ""
        query.NumberOfSeriesRelatedInstances = ""

        def run() -> list[Dataset]:
            ae = self._ae()
            assoc = self._associate(ae, [build_context(StudyRootQueryRetrieveInformationModelFind)])
            found = []
            try:
                for status, identifier in assoc.send_c_find(
                        query, StudyRootQueryRetrieveInformationModelFind):
                    if not status:
                        raise AssociationFailed("C-FIND: the peer stopped answering")
                    if status.Status in _PENDING and identifier is not None:
                        found.append(identifier)
                    elif status.Status != _SUCCESS:
                        raise PacsError(f"C-FIND failed (status 0x{status.Status:04X})")
            finally:
                assoc.release()
            return found

        for item in self._retrying(run, "C-FIND"):
            if str(item.get("SeriesInstanceUID", "")) == series_uid:
                study = str(item.get("StudyInstanceUID", "") or study_uid or "")
                count = item.get("NumberOfSeriesRelatedInstances", None)
                return SeriesRef(check_uid(study), series_uid,
                                 str(item.get("Modality", "")) or None,
                                 int(count) if count not in (None, "") else None)
        raise SeriesNotFound("the PACS has no series with that SeriesInstanceUID")

    # ------------------------------------------------------------ retrieve

    def get_series(self, ref: SeriesRef, folder: Path) -> list[Path]:
        """C-GET a series into `folder` (the peer sends C-STOREs on our association).

        `folder` must be new or empty (FileExistsError otherwise, before any
        association); a failed attempt's files are removed before the retry,
        and when the call fails for good.
        """
        identifier = _retrieve_identifier(ref)
        prepare_target(folder)

        def run() -> list[Path]:
            with _Sink(folder, self.max_instances) as sink:
                ae = self._ae()
                contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
                contexts += [build_context(c) for c in IMAGE_STORAGE]
                roles = [build_role(c, scp_role=True) for c in IMAGE_STORAGE]
                assoc = self._associate(ae, contexts, ext_neg=roles,
                                        handlers=[(evt.EVT_C_STORE, sink.handle)])
                try:
                    final = _last_status(assoc.send_c_get(
                        identifier, StudyRootQueryRetrieveInformationModelGet))
                finally:
                    assoc.release()
                return sink.finish(final, "C-GET")

        return self._retrying(run, "C-GET")

    def move_series(self, ref: SeriesRef, folder: Path, listen_host: str = "127.0.0.1",
                    listen_port: int = 11113) -> list[Path]:
        """C-MOVE a series to a storage SCP we run for the duration of the call.

        The peer must know our calling AE title with this host and port (for
        Orthanc: DicomModalities). `folder` must be new or empty, as for
        `get_series`, and only this call's files are ever removed from it.
        """
        identifier = _retrieve_identifier(ref)
        prepare_target(folder)

        def run() -> list[Path]:
            with _Sink(folder, self.max_instances) as sink:
                ae = self._ae()
                for sop_class in IMAGE_STORAGE:
                    ae.add_supported_context(sop_class)
                server = ae.start_server((listen_host, listen_port), block=False,
                                         evt_handlers=[(evt.EVT_C_STORE, sink.handle)])
                try:
                    assoc = self._associate(
                        ae, [build_context(StudyRootQueryRetrieveInformationModelMove)])
                    try:
                        final = _last_status(assoc.send_c_move(
                            identifier, self.peer.calling_aet,
                            StudyRootQueryRetrieveInformationModelMove))
                    finally:
                        assoc.release()
                finally:
                    server.shutdown()
                return sink.finish(final, "C-MOVE")

        return self._retrying(run, "C-MOVE")

    # --------------------------------------------------------------- store

    def store(self, files: Sequence[Path]) -> int:
        """C-STORE files (REG objects, CT/MR images) in one association; return the count."""
        if not files:
            return 0
        datasets = [dcmread(str(f)) for f in files]
        classes = sorted({str(ds.SOPClassUID) for ds in datasets})

        def run() -> int:
            ae = self._ae()
            contexts = [build_context(c) for c in classes]
            assoc = self._associate(ae, contexts)
            refused = 0
            try:
                for ds in datasets:
                    status = assoc.send_c_store(ds)
                    if not status:
                        raise AssociationFailed("C-STORE: the peer stopped answering")
                    if status.Status not in (_SUCCESS, 0xB000, 0xB007, 0xB006):
                        refused += 1
            finally:
                assoc.release()
            if refused:
                raise PacsError(f"C-STORE: the PACS refused {refused} of {len(datasets)} "
                                "instances")
            return len(datasets)

        return self._retrying(run, "C-STORE")


# ------------------------------------------------------------------ helpers


def _no_delay(assoc: Any) -> None:
    """Send small PDUs at once: pynetdicom writes a command and its dataset as separate
    PDUs, and Nagle's algorithm with the peer's delayed ACK then costs ~40 ms each."""
    with contextlib.suppress(AttributeError, OSError):
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _retrieve_identifier(ref: SeriesRef) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = check_uid(ref.study_uid)
    identifier.SeriesInstanceUID = check_uid(ref.series_uid)
    return identifier


def _last_status(responses: Any) -> Dataset | None:
    final = None
    for status, _identifier in responses:
        if not status:
            raise AssociationFailed("the peer stopped answering during the retrieve")
        final = status
    return final


class _Sink:
    """Writes instances received through C-STORE into a folder, counting them.

    Used as a context manager around one attempt: when the attempt raises,
    the files it wrote (and only those) are removed, so a retry or the caller
    starts from the folder as it was.
    """

    def __init__(self, folder: Path, max_instances: int) -> None:
        self.folder, self.max_instances = folder, max_instances
        self.files: list[Path] = []
        self.overflow = False
        self._lock = threading.Lock()

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None:
            with self._lock:
                remove_files(self.files)

    def handle(self, event: Any) -> int:
        with self._lock:
            if len(self.files) >= self.max_instances:
                self.overflow = True
                return 0xA700  # out of resources
            path = self.folder / f"{len(self.files) + 1:06d}.dcm"
            self.files.append(path)
        # Raw encoded bytes with a file meta header: no decode and re-encode.
        with open(path, "wb") as fh:
            fh.write(event.encoded_dataset())
        return _SUCCESS

    def finish(self, final: Dataset | None, what: str) -> list[Path]:
        if self.overflow:
            raise PacsError(f"{what}: the series has more than {self.max_instances} instances, "
                            "the limit")
        if final is None or final.Status not in (_SUCCESS, 0xB000):
            code = "none" if final is None else f"0x{final.Status:04X}"
            raise PacsError(f"{what} failed (status {code})")
        if final.Status == 0xB000 or final.get("NumberOfFailedSuboperations", 0):
            raise PacsError(f"{what}: some instances were not delivered")
        if not self.files:
            raise SeriesNotFound(f"{what}: the PACS sent no instances for the series")
        return list(self.files)
