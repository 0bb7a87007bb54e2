import asyncio

from ledger_svc import config, server

asyncio.run(server.main(config.Settings.from_env()))
