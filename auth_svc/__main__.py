import asyncio

from auth_svc import config, server

asyncio.run(server.main(config.Settings.from_env()))
