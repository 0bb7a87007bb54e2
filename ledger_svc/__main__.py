"""python -m ledger_svc"""
from common import runtime
from ledger_svc import config, server

runtime.run(server.main(config.Settings.from_env()))
