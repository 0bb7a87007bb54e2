"""Writing files that hold secrets (keys, Envoy's config, run.json) under their final mode."""
import os
import pathlib


def write(path: pathlib.Path, data: bytes | str, mode: int = 0o600, owner: int | None = None) -> None:
    """`data` into `path`, replacing it whole: written to a new file created with `mode` (never
    readable by others, not even for a moment), given to `owner` if set, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, mode)  # whatever the umask took away
    if owner is not None:
        os.chown(tmp, owner, -1)
    os.replace(tmp, path)
