"""localstripe for the embedded default and the tests: `python -m ledger_svc.stripe_local`.

localstripe's own CLI binds every interface and pickles its state to
/tmp/localstripe.pickle, shared by every instance on the machine. This runs its
aiohttp app on 127.0.0.1 only, keeps the state in a file of this instance's own
(under the mesh's data dir, so a restart of `./dev up` still knows the Stripe
customers the ledger has recorded), and registers the ledger's webhook (through
Envoy, like Stripe's) with its signing secret. It also serves the Stripe.js
stand-in at /js.stripe.com/v3/ that the dashboard loads offline, and lists
PaymentIntents by their `created` time as Stripe does (localstripe refuses that
filter; `./dev admin reconcile --since` uses it).
"""
import argparse
import asyncio
import logging
import operator
import os
import pathlib
import pickle
import signal
import sys

from aiohttp import web

from ledger_svc import billing

WEBHOOK_ID = "token-service"


def _keep_state_in(path: pathlib.Path) -> None:
    from localstripe import resources

    def dump_to_disk(store) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as out:
            pickle.dump(dict(store), out, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    def try_load_from_disk(store) -> None:
        try:
            with open(path, "rb") as saved:
                old = pickle.load(saved)
        except FileNotFoundError:
            return
        dict.clear(store)
        dict.update(store, old)

    resources.Store.dump_to_disk = dump_to_disk
    resources.Store.try_load_from_disk = try_load_from_disk
    resources.store.try_load_from_disk()


_CREATED_BOUNDS = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _list_intents_by_creation() -> None:
    from localstripe import resources
    from localstripe.errors import UserError

    def api_list_all(cls, url, created=None, limit=None, starting_after=None, **kwargs):
        bounds = {}
        if created is not None:
            try:
                assert isinstance(created, dict) and created and set(created) <= set(_CREATED_BOUNDS)
                bounds = {_CREATED_BOUNDS[name]: int(value) for name, value in created.items()}
            except (AssertionError, TypeError, ValueError):
                raise UserError(400, "Bad request") from None
        listed = resources.StripeObject._api_list_all.__func__(cls, url, limit=limit, starting_after=starting_after,
                                                                **kwargs)
        listed._list = [intent for intent in listed._list
                        if all(compare(intent.created, value) for compare, value in bounds.items())]
        return listed

    resources.PaymentIntent._api_list_all = classmethod(api_list_all)


async def serve(host: str, port: int, state: pathlib.Path, webhook_url: str, webhook_secret: str) -> None:
    _keep_state_in(state)
    _list_intents_by_creation()
    from localstripe import server, webhooks

    runner = web.AppRunner(server.app, access_log=logging.getLogger("localstripe.access"))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    if webhook_url:
        webhooks.register_webhook(WEBHOOK_ID, webhook_url, webhook_secret, list(billing.EVENTS))
    logging.info("localstripe listening on http://%s:%d (state in %s), events to %s", host, port, state,
                 webhook_url or "nowhere")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ledger_svc.stripe_local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument("--state", type=pathlib.Path, required=True, help="file keeping its objects across restarts")
    parser.add_argument("--webhook-url", default="", help="where Stripe's events go (the ledger's webhook route)")
    parser.add_argument("--webhook-secret", default=os.environ.get("TOKENS_STRIPE_WEBHOOK_SECRET", ""))
    args = parser.parse_args(argv)
    if args.webhook_url and not args.webhook_secret:
        parser.error("--webhook-url needs --webhook-secret (or TOKENS_STRIPE_WEBHOOK_SECRET)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s localstripe %(message)s", stream=sys.stdout)
    asyncio.run(serve(args.host, args.port, args.state.resolve(), args.webhook_url, args.webhook_secret))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
