"""The uvicorn server of ``python -m aggregator serve --port-file``: it reports the port it bound.

With ``--port 0`` the operating system picks a free port while binding, so two servers started at once can never
race for one port (picking a "free" port first and binding it later can). The port is written to the file,
atomically, once the server accepts connections.
"""

from __future__ import annotations

from pathlib import Path

import uvicorn

from device_sdk.fileio import atomic_write_bytes


class PortReportingServer(uvicorn.Server):
    """A uvicorn server that writes its bound port to ``port_file`` once it is listening."""

    def __init__(self, config: uvicorn.Config, port_file: Path) -> None:
        super().__init__(config)
        self.port_file = Path(port_file)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            atomic_write_bytes(self.port_file, f"{port}\n".encode())
