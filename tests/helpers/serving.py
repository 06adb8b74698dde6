"""`lyra serve`'s app on a free loopback port, in a thread of the test process (so a test can reach its worker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

START_TIMEOUT_S = 30


@dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    app: Any  # the FastAPI app; `app.state.service` holds the engine and the worker

    @property
    def service(self) -> Any:
        return self.app.state.service


@contextmanager
def running_server(engine: Any, config: Any) -> Iterator[RunningServer]:
    import uvicorn

    from lyra_cli.commands.serve import bind
    from lyra_cli.serve.app import create_app

    app = create_app(engine, config)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app)
    finally:
        app.state.service.worker.cancel_all()
        server.should_exit = True
        thread.join(timeout=10)
        app.state.service.worker.stop()
        sock.close()
