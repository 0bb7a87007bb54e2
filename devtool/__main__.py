"""`./dev` subcommands; the bash wrapper has already set up .venv and gen/."""
import sys

from devtool import cli

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
