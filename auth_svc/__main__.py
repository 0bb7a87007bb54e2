"""python -m auth_svc"""
from common import runtime
from auth_svc import config, server

# Guarded: the password pool's worker processes are spawned, and a spawned process imports
# its parent's main module (as __mp_main__): it must not start a second service.
if __name__ == "__main__":
    runtime.run(server.main(config.Settings.from_env()))
