#!/usr/bin/env python3
"""Generate constraints-gpu.txt from constraints.txt (the one list of pins).

    python3 tools/gen_constraints_gpu.py           # (re)write constraints-gpu.txt
    python3 tools/gen_constraints_gpu.py --check   # exit 1 with one line if it is out of date
    python3 tools/gen_constraints_gpu.py --fetch-torch-metadata   # refresh the wheel record (network)

A pin line of constraints.txt that ends in ``# gpu: SPEC`` becomes ``SPEC`` in the GPU file
(torch: the CUDA build, never ``+cpu``; triton: the version torch's CUDA wheel requires); every
other pin is copied unchanged, so the two files can only differ where the CPU and CUDA builds of
torch must.

``--fetch-torch-metadata`` records what torch's CUDA wheel (Linux x86_64, CPython 3.11, from
PyPI, where PyTorch publishes its default CUDA build) declares: its PEP 658 metadata file is read
(tens of KB, never the wheel) and its Name/Version/Requires-Python/Requires-Dist lines are written
to tools/torch_cuda_wheel_metadata.txt with the source URLs and sha256 digests beside them, so the
test can check the GPU pins offline and compare the copy with the index when it is reachable.

Standard library only: tools/setup_env.sh runs it with the system Python before the
venv exists.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_FILE = ROOT / "constraints.txt"
GPU_FILE = ROOT / "constraints-gpu.txt"
METADATA_FILE = ROOT / "tools" / "torch_cuda_wheel_metadata.txt"
INDEX_URL = "https://pypi.org/simple/torch/"
# the wheel whose requirements are recorded: the project's Python on the usual cluster platform
WHEEL_TAG = "cp311-cp311-manylinux_2_28_x86_64"
_KEPT_FIELDS = ("Name", "Version", "Requires-Python", "Requires-Dist")

HEADER = """\
# GENERATED from constraints.txt by tools/gen_constraints_gpu.py: do not edit by hand (edit
# constraints.txt, its "# gpu:" comments for the CUDA-only pins, and rerun the tool).
# Pins for `tools/setup_env.sh --gpu`: the CUDA build of torch and the Triton it requires; every
# other pin equals constraints.txt. Checked by tests/test_install_gpu.py; see docs/install_gpu.md.
"""

_GPU_RE = re.compile(r"\s+#\s*gpu:\s*(\S.*?)\s*$")


def pin_lines(text: str) -> list[tuple[str, str]]:
    """``[(cpu_spec, gpu_spec), ...]`` for every pin line of a constraints.txt text (comments and
    blank lines dropped; the two specs are equal unless the line carries ``# gpu: SPEC``)."""
    pins = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _GPU_RE.search(line)
        gpu = m.group(1) if m else None
        # pip's own rule: a comment starts at " #"
        cpu = re.split(r"\s+#", line, maxsplit=1)[0].strip()
        pins.append((cpu, gpu or cpu))
    return pins


def render_gpu(cpu_text: str) -> str:
    """The full text of constraints-gpu.txt for a constraints.txt text."""
    return HEADER + "".join(f"{gpu}\n" for _, gpu in pin_lines(cpu_text))


def gpu_pin(package: str, cpu_text: str) -> str:
    """The GPU spec of ``package`` (e.g. ``triton==3.7.1``) from a constraints.txt text."""
    for _, gpu in pin_lines(cpu_text):
        if re.match(rf"{re.escape(package)}\s*[=<>!~;]", gpu):
            return gpu
    raise ValueError(f"constraints.txt has no pin for {package}: add one")


def pinned_version(spec: str) -> str:
    """``torch==2.13.0,!=2.13.0+cpu`` -> ``2.13.0`` (the version of the ``==`` clause)."""
    m = re.search(r"==\s*([0-9][^,;\s]*)", spec)
    if not m:
        raise ValueError(f"{spec!r} pins no exact version (==): pin one")
    return m.group(1)


def metadata_fields(metadata_text: str) -> list[str]:
    """The kept header lines (Name, Version, Requires-Python, Requires-Dist) of a METADATA file,
    in order. The header ends at the first blank line (the long description follows)."""
    header = metadata_text.split("\n\n", 1)[0]
    return [line.rstrip() for line in header.splitlines() if line.split(":", 1)[0] in _KEPT_FIELDS]


def fetch(url: str, timeout: float = 30.0, accept: str | None = None) -> bytes:
    """GET ``url`` (urllib; raises OSError when the index is not reachable)."""
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def find_wheel(version: str, timeout: float = 60.0) -> dict:
    """The PEP 691 index entry (filename, url, hashes) of torch ``version``'s ``WHEEL_TAG`` wheel."""
    index = json.loads(fetch(INDEX_URL, timeout, accept="application/vnd.pypi.simple.v1+json"))
    name = f"torch-{version}-{WHEEL_TAG}.whl"
    for entry in index["files"]:
        if entry["filename"] == name:
            return entry
    raise ValueError(f"{name} is not on {INDEX_URL}: check the torch pin in constraints.txt")


def parse_record(text: str) -> tuple[dict[str, str], list[str]]:
    """tools/torch_cuda_wheel_metadata.txt -> ``({"wheel-url": ..., ...}, [metadata lines])``."""
    info, lines = {}, []
    for line in text.splitlines():
        m = re.match(r"#\s*([a-z0-9-]+):\s*(\S.*)$", line)
        if m:
            info[m.group(1)] = m.group(2).strip()
        elif line.strip() and not line.startswith("#"):
            lines.append(line.rstrip())
    return info, lines


def fetch_torch_metadata() -> str:
    """The text of tools/torch_cuda_wheel_metadata.txt for the torch version constraints.txt pins."""
    version = pinned_version(gpu_pin("torch", CPU_FILE.read_text()))
    entry = find_wheel(version)
    meta_url = entry["url"] + ".metadata"
    raw = fetch(meta_url)
    fields = metadata_fields(raw.decode())
    return (
        "# What torch's CUDA wheel declares, copied from its PEP 658 metadata file (the header fields\n"
        "# only). Written by `python3 tools/gen_constraints_gpu.py --fetch-torch-metadata`; read by\n"
        "# tests/test_install_gpu.py, which checks constraints-gpu.txt against it offline and compares\n"
        "# it with metadata-url when that is reachable.\n"
        f"# wheel: {entry['filename']}\n"
        f"# wheel-url: {entry['url']}\n"
        f"# wheel-sha256: {entry['hashes']['sha256']}\n"
        f"# metadata-url: {meta_url}\n"
        f"# metadata-sha256: {hashlib.sha256(raw).hexdigest()}\n"
        f"# fetched: {datetime.date.today().isoformat()}\n"
        + "".join(f"{line}\n" for line in fields)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if constraints-gpu.txt is out of date")
    p.add_argument("--fetch-torch-metadata", action="store_true",
                   help=f"rewrite {METADATA_FILE.relative_to(ROOT)} from the index (metadata only)")
    args = p.parse_args(argv)
    if args.fetch_torch_metadata:
        METADATA_FILE.write_text(fetch_torch_metadata())
        print(f"wrote {METADATA_FILE}")
        return 0
    want = render_gpu(CPU_FILE.read_text())
    if args.check:
        have = GPU_FILE.read_text() if GPU_FILE.is_file() else None
        if have != want:
            print(f"{GPU_FILE.name} is out of date with {CPU_FILE.name}: run python3 tools/gen_constraints_gpu.py",
                  file=sys.stderr)
            return 1
        return 0
    GPU_FILE.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
