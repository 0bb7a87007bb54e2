"""Developer and operator tooling: `./dev up`, `./dev test`, `./dev admin`."""
