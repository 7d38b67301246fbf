"""PACS integration: fetch two series from a PACS, register them with a DISA service,
store the Spatial Registration object (and optionally the registered series) back.

    dicomweb.py        QIDO-RS / WADO-RS / STOW-RS client (httpx)
    dimse.py           C-FIND / C-GET / C-MOVE / C-STORE client (pynetdicom)
    workflow.py        the pull -> register -> store flow both transports share
    retry.py           bounded exponential back-off and the errors of this package
    cli.py             `disa pacs pull` and `disa pacs dimse`
    orthanc_plugin.py  an Orthanc Python plugin that registers series pairs as they arrive
                       (runs inside Orthanc's interpreter: standard library only)

Patient identifiers never go into logs, file names or the DISA service's URLs:
series are written under counter names and uploaded under role names.
"""

from disa.pacs.retry import PacsError, PacsUnavailable, RetryPolicy, SeriesNotFound

__all__ = ["PacsError", "PacsUnavailable", "RetryPolicy", "SeriesNotFound"]
