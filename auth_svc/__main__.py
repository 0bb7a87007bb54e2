"""python -m auth_svc"""
from common import runtime
from auth_svc import config, server

runtime.run(server.main(config.Settings.from_env()))
