"""Runs the reference backend: python -m backends.reference."""
from backends.reference import app, config
from common import runtime

runtime.run(app.main(config.Settings.from_env()))
