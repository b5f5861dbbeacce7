"""``hub serving start``: serve installed modules over HTTP (see :mod:`hubkit.serving`)."""
from __future__ import annotations

import click

from ..errors import ConfigError
from ..hub.manifest import parse_ref
from ..inference.module import Module
from ..serving.app import create_app
from ..serving.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAIT_MS
from .options import device_option, precision_option, runtime_option


@click.group()
def serving() -> None:
    """Serve modules over HTTP with dynamic micro-batching."""


@serving.command()
@click.option("-m", "--module", "names", multiple=True, required=True, metavar="NAME[==VERSION]",
              help="A module to serve (repeat for several); installed first when missing.")
@click.option("-p", "--port", default=8866, show_default=True, type=click.IntRange(1, 65535))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default only accepts connections from this machine.")
@click.option("--max-batch", default=DEFAULT_MAX_BATCH, show_default=True, type=click.IntRange(1, 1024),
              help="Most requests run together in one forward.")
@click.option("--max-wait-ms", default=DEFAULT_MAX_WAIT_MS, show_default=True, type=click.FloatRange(0, 10_000),
              help="How long the first request of a batch waits for others.")
@click.option("--no-batching", is_flag=True, help="Run every request as its own forward.")
@click.option("--max-body-mb", default=DEFAULT_MAX_BODY_BYTES / 2**20, show_default=True,
              type=click.FloatRange(0.001, 1024), help="Largest request body accepted (413 above).")
@device_option
@precision_option
@runtime_option
def start(names: tuple[str, ...], port: int, host: str, max_batch: int, max_wait_ms: float, no_batching: bool,
          max_body_mb: float, device: str, precision: str, runtime: str) -> None:
    """Load the modules, then answer prediction requests until interrupted."""
    try:
        import uvicorn  # noqa: PLC0415 (the optional `serving` extra)
    except ModuleNotFoundError:
        raise ConfigError("serving needs FastAPI and uvicorn", hint="pip install 'hubkit[serving]'") from None

    modules = []
    for ref in names:
        name, version = parse_ref(ref)
        module = Module(name=name, version=version, device=device, precision=precision, runtime=runtime)
        module.load()  # load (at first use convert) the model now, not on the first request
        modules.append(module)
    app = create_app(modules, max_batch=max_batch, max_wait_ms=max_wait_ms, batching=not no_batching,
                     max_body_bytes=int(max_body_mb * 2**20))
    mode = "off" if no_batching else f"up to {max_batch} requests / {max_wait_ms:g} ms"
    click.echo(f"serving {', '.join(m.manifest.ref for m in modules)} on http://{host}:{port} (batching {mode})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
