"""Helpers for programs that start a server and talk to it: a free port, waiting until it answers."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from ..errors import ServerNotReadyError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now: for ``hub serving start --port`` (or torchrun's
    ``--master_port``) beside other servers, e.g. in deployment scripts and tests."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(base_url: str, *, timeout: float = 120.0, process=None) -> dict:
    """Poll ``GET /health`` until the server answers; returns its JSON.

    For scripts that start ``hub serving start`` and must wait for the model to load. Raises
    :class:`ServerNotReadyError` after ``timeout`` s, or at once when ``process`` (the server's
    ``subprocess.Popen``) exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServerNotReadyError(f"the server exited with status {process.returncode} before answering "
                                      f"{base_url}/health", hint="read its error output (stderr)")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise ServerNotReadyError(f"{base_url} did not answer /health within {timeout:g} s",
                                          hint="check the server's output; a large model may need a longer timeout") from None
            time.sleep(0.2)
