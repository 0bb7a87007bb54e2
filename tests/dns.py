"""A stand-in for DNS (common.urls.Resolver) for tests that must not need the internet."""
import socket


class FakeDns:
    """Maps names to addresses and records every lookup; an unknown name does not resolve."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]

    @property
    def hosts(self) -> list[str]:
        return [host for host, _port in self.asked]
