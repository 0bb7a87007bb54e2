"""python -m ratelimit_svc"""
from common import runtime
from ratelimit_svc import config, server

runtime.run(server.main(config.Settings.from_env()))
