"""Generates the Python gRPC code and Envoy's descriptor set from protos/.

The one place generated code comes from. Output goes to gen/ (never edited,
never committed); a stamp of the inputs makes a second run a no-op.
"""
import hashlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
DESCRIPTOR = GEN / "tokens.pb"
STAMP = GEN / ".stamp"
# Types that appear in error details must be in the descriptor set, or Envoy's
# transcoder answers an error that carries them with an empty body.
EXTRA_DESCRIPTOR_PROTOS = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def _proto_files() -> list[pathlib.Path]:
    return sorted(PROTOS.rglob("*.proto"))


def _include_dirs() -> list[str]:
    import grpc_tools
    import google.api.annotations_pb2 as annotations

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    # googleapis-common-protos ships google/api/*.proto beside its modules.
    googleapis = pathlib.Path(annotations.__file__).parent.parent.parent
    return [str(PROTOS), str(googleapis), str(well_known)]


def _fingerprint(files: list[pathlib.Path]) -> str:
    import grpc_tools

    digest = hashlib.sha256(grpc_tools.__file__.encode())
    digest.update(pathlib.Path(__file__).read_bytes())
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def generate(force: bool = False) -> bool:
    """Regenerates gen/ when protos changed. Returns True when it ran protoc."""
    from grpc_tools import protoc

    files = _proto_files()
    fingerprint = _fingerprint(files)
    if not force and STAMP.exists() and STAMP.read_text() == fingerprint:
        return False
    GEN.mkdir(exist_ok=True)
    includes = [f"-I{d}" for d in _include_dirs()]
    rel = [str(p.relative_to(PROTOS)) for p in files]
    code_args = ["protoc", *includes, f"--python_out={GEN}", f"--grpc_python_out={GEN}",
                 f"--pyi_out={GEN}", *rel]
    if protoc.main(code_args) != 0:
        raise SystemExit("protoc failed generating Python code")
    desc_args = ["protoc", *includes, "--include_imports", "--include_source_info",
                 f"--descriptor_set_out={DESCRIPTOR}", *rel, *EXTRA_DESCRIPTOR_PROTOS]
    if protoc.main(desc_args) != 0:
        raise SystemExit("protoc failed writing the descriptor set")
    for directory in (GEN / "tokens").rglob("*"):
        if directory.is_dir():
            (directory / "__init__.py").touch()
    (GEN / "tokens" / "__init__.py").touch()
    STAMP.write_text(fingerprint)
    return True


if __name__ == "__main__":
    ran = generate(force="--force" in sys.argv)
    print("generated gen/" if ran else "gen/ is up to date")
