"""Parses `./dev` arguments and dispatches to the subcommand's module."""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


CHROMIUM = "/usr/bin/chromium"


# pytest options whose value is the next argument (`-k dashboard` names no path).
_VALUE_OPTIONS = {"-k", "-m", "-p", "-o", "-c", "-W", "-r", "--tb", "--maxfail", "--deselect", "--ignore",
                  "--ignore-glob", "--rootdir", "--junitxml", "--timeout", "--durations", "--basetemp"}


def _test_paths(args: list[str]) -> list[str]:
    """The test paths among pytest's arguments: what names a file or folder here, not an option's value."""
    paths, after_option = [], False
    for arg in args:
        if not after_option and not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists():
            paths.append(arg)
        after_option = arg in _VALUE_OPTIONS
    return paths


def _chromium(args: list[str]) -> None:
    """The dashboard's browser test drives Debian's Chromium (a browser download is impossible
    here): installed with apt-get when it is missing and this runs as root; otherwise that test
    skips and says what to install."""
    paths = _test_paths(args)
    if paths and not any("e2e" in a or a.rstrip("/") == "tests" for a in paths):
        return
    if os.access(CHROMIUM, os.X_OK) or shutil.which("chromium"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"{CHROMIUM} is missing: the browser test will skip (apt-get install chromium)", file=sys.stderr)
        return
    print("installing Debian's chromium for the dashboard's browser test (apt-get) ...", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{' '.join(command)} failed; the browser test will skip:\n{done.stderr[-2000:]}", file=sys.stderr)
            return


def _test(args: list[str]) -> int:
    _chromium(args)
    env = dict(os.environ)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    cmd = [sys.executable, "-m", "pytest", *args]
    return subprocess.call(cmd, cwd=ROOT, env=env)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the whole mesh on the embedded default", add_help=False)
    sub.add_parser("test", help="run every test (extra arguments go to pytest)", add_help=False)
    sub.add_parser("admin", help="operators' CLI", add_help=False)
    sub.add_parser("gen", help="regenerate gRPC code and the descriptor set")
    sub.add_parser("docs", help="generate docs/pricing-and-limits.md", add_help=False)
    sub.add_parser("bench", help="run a benchmark in bench/ (e.g. ./dev bench chain)", add_help=False)
    sub.add_parser("compose", help="write (or --check) envoy/envoy.compose.yaml", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "test":
        return _test(rest)
    if command == "gen":
        from devtool import gen
        gen.generate(force=True)
        return 0
    if command == "up":
        from devtool import up
        return up.main(rest)
    if command == "admin":
        from devtool import admin
        return admin.main(rest)
    if command == "bench":
        if not rest or rest[0].startswith("-"):
            print("usage: ./dev bench NAME [options]; NAME is a module in bench/ (chain, ...)")
            return 2
        import importlib
        importlib.import_module(f"bench.{rest[0]}").main(rest[1:])
        return 0
    if command == "compose":
        from devtool import compose
        return compose.main(rest)
    if command == "docs":
        from devtool import docs
        return docs.main(rest)
    parser.print_help()
    return 2
