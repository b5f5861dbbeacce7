"""The exceptions hubkit raises: one hierarchy, each also a matching builtin.

Every error carries a message that says what went wrong, where (file, module, URL),
and what to do next; ``HubkitError.hint`` holds the "what to do" part on its own so
that the CLI can print one clear line.
"""
from __future__ import annotations


class HubkitError(Exception):
    """Base class of every error hubkit raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class HubkitWarning(UserWarning):
    """Something was worked around and the user should know (the CLI prints it as one ``warning:`` line)."""


# --- registry and manifests -------------------------------------------------------------
class ManifestError(HubkitError, ValueError):
    """A module manifest is missing a field, has a wrong type or an impossible value."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None, hint: str | None = None):
        self.path, self.field = path, field
        where = " ".join(p for p in (f"in {path}" if path else "", f"at '{field}'" if field else "") if p)
        super().__init__(f"invalid manifest {where}: {message}" if where else f"invalid manifest: {message}", hint=hint)


class RegistryError(HubkitError, ValueError):
    """A registry file cannot be read or does not follow the registry format."""


class UnknownModuleError(HubkitError, LookupError):
    """No module of that name in any registry (nor installed)."""

    def __init__(self, name: str, suggestions: list[str] | None = None):
        self.name, self.suggestions = name, list(suggestions or [])
        hint = f"did you mean: {', '.join(self.suggestions)}?" if self.suggestions else "run `hub search` to see what is available"
        super().__init__(f"no module named '{name}'", hint=hint)



class UnknownVersionError(HubkitError, LookupError):
    """The module exists but not in the version asked for."""

    def __init__(self, name: str, version: str, available: list[str]):
        self.name, self.version, self.available = name, version, available
        super().__init__(f"module '{name}' has no version {version}",
                         hint=f"available: {', '.join(available) or 'none'}")


class NotInstalledError(HubkitError, LookupError):
    """An operation needs an installed module and it is not installed."""


# --- downloads and the cache -----------------------------------------------------------
class DownloadError(HubkitError, ConnectionError):
    """A file could not be fetched from a source (after retries)."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None, hint: str | None = None):
        self.url, self.status = url, status
        super().__init__(message, hint=hint)


class OfflineError(DownloadError):
    """A network access was needed while offline mode is on, or no network is reachable."""


class IntegrityError(HubkitError, OSError):
    """A file does not match the size or sha256 it should have (download or cache)."""

    def __init__(self, message: str, *, path: str | None = None, expected: str | None = None,
                 actual: str | None = None, hint: str | None = None):
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(message, hint=hint)



class UnsafeContentError(HubkitError, ValueError):
    """An archive member or a weights file tries something we refuse (path escape, pickle code...)."""


class UnknownTapError(HubkitError, KeyError):
    """A feature tap or layer name that the module does not declare."""

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


class WeightsError(HubkitError, ValueError):
    """Weights cannot be mapped onto the architecture (missing keys, wrong shapes)."""


# --- inputs, data, training -------------------------------------------------------------
class ImageError(HubkitError, ValueError):
    """A file is not a readable image."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot read image {path}: {reason}")


class DatasetError(HubkitError, ValueError):
    """A dataset is malformed: wrong paths, unknown labels, empty splits..."""


class ConfigError(HubkitError, ValueError):
    """A RunConfig, strategy, head or option is given values that cannot work (together)."""


class CheckpointError(HubkitError, ValueError):
    """A checkpoint is missing, corrupt, or made with another configuration."""


class ConversionError(HubkitError, RuntimeError):
    """A model could not be converted for a compiled runtime (hubkit then runs it with torch)."""


class ServerNotReadyError(HubkitError, ConnectionError, TimeoutError):
    """A model server did not start answering (it exited, or did not answer in time)."""


__all__ = [n for n, v in dict(globals()).items() if isinstance(v, type) and issubclass(v, HubkitError)]
