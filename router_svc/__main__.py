"""python -m router_svc"""
from common import runtime
from router_svc import config, server

runtime.run(server.main(config.Settings.from_env()))
