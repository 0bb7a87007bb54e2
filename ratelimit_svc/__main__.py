"""python -m ratelimit_svc"""
import asyncio

from ratelimit_svc import config, server

asyncio.run(server.main(config.Settings.from_env()))
