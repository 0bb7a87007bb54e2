"""Runs the reference backend: python -m backends.reference."""

import asyncio

from backends.reference import app, config

asyncio.run(app.main(config.Settings.from_env()))
