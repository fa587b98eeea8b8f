"""The GPU install's pins (constraints-gpu.txt) against constraints.txt and torch's CUDA wheel.

No wheel is ever downloaded: torch's CUDA wheel is known by the Requires-Dist lines of its PEP 658
metadata file, committed in tools/torch_cuda_wheel_metadata.txt with their source URL and sha256
(refreshed by ``python3 tools/gen_constraints_gpu.py --fetch-torch-metadata``). Every check runs
offline on that copy; one more compares the copy with the index when the index is reachable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_constraints_gpu", ROOT / "tools" / "gen_constraints_gpu.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

CPU_TEXT = (ROOT / "constraints.txt").read_text()
GPU_TEXT = (ROOT / "constraints-gpu.txt").read_text()
# the environment torch's CUDA wheel is installed into (the project's Python on Linux)
TARGET_ENV = {"platform_system": "Linux", "sys_platform": "linux", "python_version": "3.11",
              "python_full_version": "3.11.7", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def pins(text: str) -> dict[str, Requirement]:
    """Package name -> its pin, for a constraints file's text (comments dropped as pip does)."""
    out = {}
    for cpu, _ in gen.pin_lines(text):
        req = Requirement(cpu)
        name = canonicalize_name(req.name)
        assert name not in out, f"{name} is pinned twice"
        out[name] = req
    return out


def record() -> tuple[dict[str, str], list[str]]:
    return gen.parse_record(gen.METADATA_FILE.read_text())


def wheel_requirements(lines: list[str]) -> list[Requirement]:
    """The Requires-Dist entries that apply to a plain install on Linux / CPython 3.11."""
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET_ENV)]


def test_gpu_constraints_are_generated_from_cpu_constraints():
    # one source of truth: the committed GPU file is exactly what the generator makes of constraints.txt
    assert GPU_TEXT == gen.render_gpu(CPU_TEXT), "run python3 tools/gen_constraints_gpu.py"
    rc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_constraints_gpu.py"), "--check"]).returncode
    assert rc == 0


def test_cpu_and_gpu_pins_differ_only_in_torch_and_triton():
    cpu, gpu = pins(CPU_TEXT), pins(GPU_TEXT)
    assert set(cpu) == set(gpu)
    differing = {name for name in cpu if str(cpu[name]) != str(gpu[name])}
    assert differing == {"torch", "triton"}
    # the same torch release, but the GPU pin can never take the CPU build
    assert gen.pinned_version(str(cpu["torch"])) == gen.pinned_version(str(gpu["torch"]))
    version = gen.pinned_version(str(gpu["torch"]))
    assert not gpu["torch"].specifier.contains(f"{version}+cpu")
    assert gpu["torch"].specifier.contains(version) and gpu["torch"].specifier.contains(f"{version}+cu128")
    assert cpu["torch"].specifier.contains(f"{version}+cpu")


def test_generator_rewrites_only_annotated_lines():
    text = "# header\nfoo==1.0  # gpu: foo==2.0\n\nbar<3  # a plain comment\nbaz==1\n"
    assert gen.pin_lines(text) == [("foo==1.0", "foo==2.0"), ("bar<3", "bar<3"), ("baz==1", "baz==1")]
    assert gen.render_gpu(text).endswith("foo==2.0\nbar<3\nbaz==1\n")
    with pytest.raises(ValueError, match="pins no exact version"):
        gen.pinned_version("torch>=2")


def test_record_is_the_pinned_torch_release():
    info, lines = record()
    version = gen.pinned_version(gen.gpu_pin("torch", CPU_TEXT))
    assert f"Version: {version}" in lines and "Name: torch" in lines
    assert info["wheel"] == f"torch-{version}-{gen.WHEEL_TAG}.whl"
    assert info["metadata-url"] == info["wheel-url"] + ".metadata"
    for key in ("wheel-sha256", "metadata-sha256"):
        assert len(info[key]) == 64 and int(info[key], 16) >= 0


def test_gpu_pins_satisfy_torch_cuda_wheel_requirements():
    """Every requirement of the CUDA wheel that the GPU file pins is met by the pin; triton must be
    among them (the CUDA wheel requires one exact Triton), and the wheel really is a CUDA build."""
    gpu = pins(GPU_TEXT)
    _, lines = record()
    reqs = wheel_requirements(lines)
    names = {canonicalize_name(r.name) for r in reqs}
    assert "triton" in names, "the recorded wheel declares no triton: is it the CUDA build?"
    assert any(n.startswith("nvidia-") or n.startswith("cuda-") for n in names)
    checked = []
    for req in reqs:
        pin = gpu.get(canonicalize_name(req.name))
        if pin is None:
            continue
        version = gen.pinned_version(str(pin))
        assert req.specifier.contains(version, prereleases=True), \
            f"constraints-gpu.txt pins {pin} but torch's CUDA wheel requires {req}"
        checked.append(req.name)
    assert "triton" in checked
    # and the CPU pin of triton is exactly what the CUDA wheel would refuse (why two files exist)
    cpu_triton = gen.pinned_version(str(pins(CPU_TEXT)["triton"]))
    triton_req = next(r for r in reqs if canonicalize_name(r.name) == "triton")
    assert not triton_req.specifier.contains(cpu_triton)


def test_cpu_pins_satisfy_the_installed_cpu_torch():
    import importlib.metadata as md

    import torch

    if torch.version.cuda is not None:
        pytest.skip(f"this venv has a CUDA build ({torch.__version__}); the check is for the CPU build")
    cpu = pins(CPU_TEXT)
    for line in md.requires("torch") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
            continue
        pin = cpu.get(canonicalize_name(req.name))
        if pin is not None:
            assert req.specifier.contains(gen.pinned_version(str(pin)), prereleases=True), (pin, req)


def test_record_matches_the_index_when_reachable():
    """The committed copy is what the index serves now (sha256 of the metadata file and its lines).
    Skipped, with the reason, only when the index cannot be reached (a machine without network)."""
    info, lines = record()
    try:
        raw = gen.fetch(info["metadata-url"], timeout=20)
    except OSError as err:
        pytest.skip(f"index not reachable, compared offline copy only: {err}")
    assert hashlib.sha256(raw).hexdigest() == info["metadata-sha256"]
    assert gen.metadata_fields(raw.decode()) == lines


def _fake_wheel(folder: Path, version: str) -> None:
    """A metadata-only torch wheel: enough for pip's resolver, nothing to import."""
    dist = f"torch-{version}.dist-info"
    tag = "py3-none-any"
    with zipfile.ZipFile(folder / f"torch-{version}-{tag}.whl", "w") as z:
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{dist}/RECORD", "")


def _pip_pick(tmp_path: Path, constraints: str) -> subprocess.CompletedProcess:
    # isolated from this machine's pip config (its find-links hold the real CPU wheel)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--ignore-installed",
         "--disable-pip-version-check", "--find-links", str(tmp_path), "-c", str(ROOT / constraints), "torch"],
        capture_output=True, text=True, env=env, timeout=120)


def test_pip_takes_the_cuda_build_with_gpu_pins_and_the_cpu_build_with_cpu_pins(tmp_path):
    """Real pip resolution over metadata-only wheels of the pinned release. With only the CPU build
    on offer, the GPU file (its `!=+cpu` clause) refuses it and the CPU file (whose inline `# gpu:`
    comments pip must ignore) takes it; with a CUDA build beside it the GPU file takes that."""
    version = gen.pinned_version(gen.gpu_pin("torch", CPU_TEXT))
    _fake_wheel(tmp_path, f"{version}+cpu")
    gpu = _pip_pick(tmp_path, "constraints-gpu.txt")
    assert gpu.returncode != 0 and "Would install" not in gpu.stdout, gpu.stdout + gpu.stderr
    cpu = _pip_pick(tmp_path, "constraints.txt")
    assert cpu.returncode == 0 and f"Would install torch-{version}+cpu" in cpu.stdout, cpu.stdout + cpu.stderr
    _fake_wheel(tmp_path, f"{version}+cu130")
    gpu = _pip_pick(tmp_path, "constraints-gpu.txt")
    assert gpu.returncode == 0 and f"Would install torch-{version}+cu130" in gpu.stdout, gpu.stdout + gpu.stderr


# ---- tools/setup_env.sh: mode choice (--plan installs nothing) and option errors ------------------
def _setup_env(*args: str, fake_gpu: bool = False, tmp_path: Path) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    if fake_gpu:
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    # PATH without any real nvidia-smi: this machine's tools plus the fake one (if any)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(["bash", str(ROOT / "tools" / "setup_env.sh"), *args], capture_output=True, text=True,
                           env=env, timeout=60)


def test_setup_env_mode_choice(tmp_path):
    cpu = _setup_env("--plan", tmp_path=tmp_path)
    assert cpu.returncode == 0 and "mode: cpu" in cpu.stdout and "pins: constraints.txt" in cpu.stdout
    login = _setup_env("--gpu", "--plan", tmp_path=tmp_path)  # a login node: no GPU, flag given
    assert login.returncode == 0 and "mode: gpu (--gpu)" in login.stdout and "pins: constraints-gpu.txt" in login.stdout
    auto = _setup_env("--plan", fake_gpu=True, tmp_path=tmp_path)
    assert auto.returncode == 0 and "mode: gpu (nvidia-smi lists a GPU" in auto.stdout
    forced = _setup_env("--cpu", "--plan", fake_gpu=True, tmp_path=tmp_path)
    assert forced.returncode == 0 and "mode: cpu (--cpu)" in forced.stdout
    index = _setup_env("--gpu", "--cuda-index", "https://download.pytorch.org/whl/cu126", "--plan", tmp_path=tmp_path)
    assert "torch from: the configured index + https://download.pytorch.org/whl/cu126" in index.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--cuda-index", "https://x/cu126"], "--cuda-index is for the CUDA build: add --gpu"),
    (["--gpu", "--cuda-index"], "--cuda-index needs a URL"),
])
def test_setup_env_bad_options(tmp_path, args, message):
    res = _setup_env(*args, tmp_path=tmp_path)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ---- tools/check_torch_build.py: the final line of the install -------------------------------------
_spec2 = importlib.util.spec_from_file_location("check_torch_build", ROOT / "tools" / "check_torch_build.py")
ctb = importlib.util.module_from_spec(_spec2)
sys.modules["check_torch_build"] = ctb  # its dataclass looks its module up there
_spec2.loader.exec_module(ctb)


@pytest.mark.parametrize("facts, ok, words", [
    (dict(mode="cpu", torch_version="2.13.0+cpu", cuda_version=None, cuda_available=False, gpu_names=[],
          nvidia_smi_gpus=0, driver=None), True, "CPU build"),
    (dict(mode="gpu", torch_version="2.13.0+cpu", cuda_version=None, cuda_available=False, gpu_names=[],
          nvidia_smi_gpus=0, driver=None), False, "is a CPU build although GPU mode was asked"),
    (dict(mode="gpu", torch_version="2.13.0", cuda_version="13.0", cuda_available=True,
          gpu_names=["NVIDIA H100", "NVIDIA H100"], nvidia_smi_gpus=2, driver="580.65.06"), True,
     "CUDA build (CUDA 13.0), 2 GPU(s) visible: NVIDIA H100"),
    (dict(mode="gpu", torch_version="2.13.0", cuda_version="13.0", cuda_available=False, gpu_names=[],
          nvidia_smi_gpus=0, driver=None), True, "no GPU visible here (login node): fine"),
    (dict(mode="gpu", torch_version="2.13.0", cuda_version="13.0", cuda_available=False, gpu_names=[],
          nvidia_smi_gpus=4, driver="550.54.15"), False, "driver 550.54.15 is older than CUDA 13.0 needs (>= 580)"),
    (dict(mode="gpu", torch_version="2.13.0+cu126", cuda_version="12.6", cuda_available=False, gpu_names=[],
          nvidia_smi_gpus=1, driver="560.1"), False, "torch.cuda.is_available() is False (driver 560.1"),
])
def test_check_torch_build_verdicts(facts, ok, words):
    v = ctb.verdict(**facts)
    assert v.ok is ok and words in v.line and "\n" not in v.line
    if not ok and facts["cuda_version"]:
        assert "--cuda-index" in v.line  # the fix for an old driver


def test_check_torch_build_on_this_venv():
    """The script end to end on this venv's real torch (the CPU mode's line is the last line of
    every CPU install, tools/setup_env.sh in CI): GPU mode on a CPU build exits 1 with one line."""
    import torch

    res = subprocess.run([sys.executable, str(ROOT / "tools" / "check_torch_build.py"), "--mode", "gpu"],
                         capture_output=True, text=True, timeout=120)
    if torch.version.cuda is None:
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.startswith(f"torch {torch.__version__} is a CPU build although GPU mode was asked")
    else:
        assert "CUDA build" in res.stdout + res.stderr
