"""The package works from a wheel, not only from the checkout.

* fast: the explicit ``packages`` list in pyproject.toml names every package folder of the tree
  (under its import name: ``kernels/`` is ``miras_kernels``; ``configs/`` and ``launch/`` are the
  data packages ``miras_pretrain.configs`` and ``miras_pretrain.launch.templates``), and nothing
  else -- a folder left out would be missing from the wheel while every checkout test passes.
* slow: build the wheel, install it (``--no-deps``) into a fresh venv outside the checkout that
  sees the dependencies of the running venv through a ``.pth`` line, and from a directory outside
  the checkout import both packages from the wheel, render a SLURM script with
  ``launch slurm --dry-run`` and run a few demo steps. Hugging Face's ``kernels`` (pip's usual
  configuration finds it: an index, or ``PIP_FIND_LINKS`` offline) is installed beside it and
  must stay a different package from our ``miras_kernels``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from miras_pretrain.testing import tiny_training

REPO = Path(__file__).resolve().parents[1]
# The newest Hugging Face kernels that installs beside this project's pins: 0.13 and later need
# huggingface-hub >= 1.0 (0.19.1: >= 1.32), which transformers < 5 (constraints.txt) refuses.
HF_KERNELS = "kernels==0.12.3"


def _setuptools_config() -> tuple[list[str], dict[str, str]]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return cfg["packages"], cfg.get("package-dir", {})


def _package_dir(name: str, mapping: dict[str, str]) -> Path:
    """Where setuptools takes package ``name`` from: the longest mapped prefix, else its dotted path."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return REPO / mapping[prefix] / Path(*parts[i:])
    return REPO / Path(*parts)


def _packages_in_tree(mapping: dict[str, str]) -> set[str]:
    """Import names of every folder with an ``__init__.py`` under each package root."""
    roots = {"miras_pretrain": REPO / "miras_pretrain", **{k: REPO / v for k, v in mapping.items()}}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join([name, *rel.parts]))
    return found


def test_packages_list_matches_the_tree():
    packages, mapping = _setuptools_config()
    assert mapping.get("miras_kernels") == "kernels"
    assert len(packages) == len(set(packages)), "a package is listed twice"
    listed = set(packages)
    in_tree = _packages_in_tree(mapping)
    assert not in_tree - listed, f"package folders missing from pyproject.toml's packages: {sorted(in_tree - listed)}"
    for name in packages:  # and every listed package is a real folder where setuptools looks
        assert (_package_dir(name, mapping) / "__init__.py").is_file(), f"{name}: no {_package_dir(name, mapping)}/__init__.py"


def test_package_data_is_where_the_code_reads_it():
    """The checkout (editable install) reads the same files the wheel ships."""
    from miras_pretrain.launch.render import DEFAULT_TEMPLATE
    from miras_pretrain.train.demo import demo_config_path

    assert DEFAULT_TEMPLATE == REPO / "launch" / "slurm_train.sbatch"
    assert demo_config_path() == REPO / "configs" / "demo_moneta_tiny.yaml"


# ---------------------------------------------------------------------------------- the wheel
def _copy_sources(dst: Path) -> Path:
    """The checkout without venvs, caches and outputs: building in a copy leaves no build/ or
    egg-info behind in the working tree."""
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "wandb",
        "bench_results"))
    return dst


def _run(cmd: list, *, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """``(python of the fresh venv, its bin/, a work dir outside the checkout, env)``."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert REPO not in tmp.parents
    env = tiny_training.child_env(tmp)
    env.pop("PYTHONPATH", None)
    src = _copy_sources(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
         cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("miras_pretrain-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    py = venv / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
                   env=env).stdout.strip()
    # the running venv's site-packages as plain path entries: its dependencies (and pip) import,
    # but the .pth files there -- the editable install's finder among them -- are not processed
    (Path(purelib) / "deps_of_the_test_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: the editable install's dist-info is visible there; never touch it
    pip = [py, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed"]
    _run([*pip, wheel], cwd=tmp, env=env)
    _run([*pip, HF_KERNELS], cwd=tmp, env=env)
    work = tmp / "work"
    work.mkdir()
    return py, venv / "bin", work, env


@pytest.mark.slow
def test_wheel_imports_its_own_copy_beside_hf_kernels(wheel_venv):
    py, _, work, env = wheel_venv
    code = ("import json, kernels, miras_kernels, miras_pretrain, miras_pretrain.configs, "
            "miras_pretrain.launch.templates\n"
            "print(json.dumps({m.__name__: m.__file__ for m in (kernels, miras_kernels, miras_pretrain, "
            "miras_pretrain.configs, miras_pretrain.launch.templates)} | "
            "{'hf_get_kernel': hasattr(kernels, 'get_kernel'), 'spec': hasattr(miras_kernels, 'MirasSpec'), "
            "'prefix': __import__('sys').prefix}))")
    files = json.loads(_run([py, "-c", code], cwd=work, env=env).stdout)
    site_dir = Path(files["prefix"])
    for name in ("kernels", "miras_kernels", "miras_pretrain", "miras_pretrain.configs",
                 "miras_pretrain.launch.templates"):
        path = Path(files[name])
        assert site_dir in path.parents, f"{name} imported from {path}, not from the wheel in {site_dir}"
        assert REPO not in path.parents
    assert Path(files["kernels"]).parent != Path(files["miras_kernels"]).parent
    assert files["hf_get_kernel"], "`import kernels` is not Hugging Face's package"
    assert files["spec"], "`import miras_kernels` is not the Miras operator package"


@pytest.mark.slow
def test_wheel_launch_dry_run_and_demo(wheel_venv):
    py, bin_dir, work, env = wheel_venv
    # the demo config from the wheel's own package data (it names its model YAML relative to itself)
    config = _run([py, "-c", "from miras_pretrain.train.demo import demo_config_path; print(demo_config_path())"],
                  cwd=work, env=env).stdout.strip()
    assert REPO not in Path(config).parents
    cli = bin_dir / "miras-pretrain"
    out = work / "demo"
    proc = _run([cli, "demo", "--out", "demo", "--steps", "3", "--corpus-mb", "0.3", "--threads", "1",
                 "--set", "train.micro_batch_size=2", "--set", "eval.batches=1", "--set", "eval.interval=0",
                 "--set", "log.wandb=false", "--set", "log.progress_bar=false"], cwd=work, env=env, timeout=900)
    assert "validation loss: step 0:" in proc.stdout and "-> " in proc.stdout, proc.stdout[-3000:]
    assert (out / "checkpoints" / "step_00000003" / "meta.json").is_file()

    # launch checks the config's data before it renders: point it at the demo's prepared corpus
    script = _run([cli, "launch", "slurm", "--config", config, "--nodes", "2", "--gpus-per-node", "0",
                   "--time", "30", "--no-venv", "--set", "data.streams=[demo/corpus/data]",
                   "--set", "data.tokenizer=demo/corpus/tokenizer.model", "--dry-run"], cwd=work, env=env).stdout
    assert script.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --time=30" in script
    assert "rendered by `miras-pretrain launch slurm`" in script  # the template's own header
    assert "@" + "SBATCH_DIRECTIVES@" not in script
    assert (out / "corpus" / "tokenizer.model").is_file()
    assert not (REPO / "demo").exists()
