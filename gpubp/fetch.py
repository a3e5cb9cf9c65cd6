"""Fetching a file over HTTPS, bounded: https only (redirects included), at most
:data:`MAX_BYTES` (a body that never ends stops there), and an overall deadline
(:data:`DEADLINE_SECONDS`: a body that trickles a byte at a time stops there, where a per-read
timeout alone would wait forever). Every failure is a :class:`~gpubp.errors.DatasetError`
naming the URL. What is fetched is verified by the caller (:func:`gpubp.datasets.verify`).
"""

from __future__ import annotations

import http.client
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from .errors import DatasetError

__all__ = ["DEADLINE_SECONDS", "MAX_BYTES", "fetch"]

#: The largest download taken: the biggest official dataset file is about 26 MiB.
MAX_BYTES = 64 << 20
#: The longest one file may take, in all.
DEADLINE_SECONDS = 600.0
_READ_TIMEOUT = 60.0
_CHUNK = 1 << 16


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to another ``https://`` URL."""

    def redirect_request(self, req: Any, fp: Any, code: Any, msg: Any, headers: Any, newurl: str):  # type: ignore[no-untyped-def]
        if not newurl.lower().startswith("https://"):
            raise DatasetError(
                f"{req.full_url}: redirected to {newurl[:200]!r}, not https; refused"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, timeout: float) -> Any:
    opener = urllib.request.build_opener(_HttpsOnlyRedirects)
    return opener.open(url, timeout=timeout)


def fetch(
    url: str,
    progress: bool = False,
    max_bytes: int = MAX_BYTES,
    deadline: float = DEADLINE_SECONDS,
) -> bytes:
    """The body of ``url`` (``https://`` only), at most ``max_bytes`` long, within
    ``deadline`` seconds; progress on stderr when ``progress``.

    Raises
    ------
    DatasetError
        Naming the URL: not https, a network or HTTP error, a body larger than ``max_bytes``
        (declared or sent), the deadline passed.
    """
    if not url.lower().startswith("https://"):
        raise DatasetError(f"{url}: not an https:// URL; gpubp downloads over https only")
    start = time.monotonic()
    try:
        with _open(url, _READ_TIMEOUT) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            if total > max_bytes:
                raise DatasetError(
                    f"{url}: declares {total} bytes, more than the {max_bytes} taken"
                )
            chunks, done = [], 0
            while True:
                if time.monotonic() - start > deadline:
                    raise DatasetError(f"{url}: not done after {deadline:g} s; gave up")
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                done += len(chunk)
                if done > max_bytes:
                    raise DatasetError(f"{url}: sends more than {max_bytes} bytes; gave up")
                chunks.append(chunk)
                if progress and total:
                    sys.stderr.write(f"\r  {url.rsplit('/', 1)[-1]}: {done * 100 // total}%")
            if progress and total:
                sys.stderr.write("\n")
            return b"".join(chunks)
    except DatasetError:
        raise
    except (OSError, ValueError, http.client.HTTPException, urllib.error.URLError) as exc:
        raise DatasetError(f"{url}: {type(exc).__name__}: {str(exc)[:200]}") from None
