"""The server's defaults and limits, in one place (the CLI shows them as option defaults)."""
from __future__ import annotations

#: Most requests run together in one forward.
DEFAULT_MAX_BATCH = 32
#: How long the first request of a batch waits for others.
DEFAULT_MAX_WAIT_MS = 5.0
#: Largest request body accepted (413 above).
DEFAULT_MAX_BODY_BYTES = 10 * 2**20
#: Classes returned when a request does not say.
DEFAULT_TOP_K = 5
#: Larger images are refused before decoding (a small compressed file can expand to gigabytes).
MAX_IMAGE_PIXELS = 40_000_000
