"""`launch slurm` checks before it submits (dry-run, no SLURM): the config's data, tokenizer and
init_from paths exist, the global batch is kept (or refused with the numbers), and node-local
paths for the run directory / --chdir are warned about."""

from __future__ import annotations

from pathlib import Path

import pytest

from miras_pretrain.cli import main
from miras_pretrain.launch.checks import node_local


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from miras_pretrain.data import prepare_embedded_corpus

    return prepare_embedded_corpus(str(tmp_path_factory.mktemp("prepared")), vocab_size=512, seq_len=32,
                                   layout="packed", max_bytes=120_000, val_fraction=0.1)


def _config(tmp_path: Path, prepared, *, out_dir: Path | None = None, data: str | None = None,
            train: str = "{micro_batch_size: 8, grad_accum_steps: 2}") -> Path:
    data = data or (f"{{streams: [{prepared.root}], tokenizer: {prepared.tokenizer_path}, layout: packed, "
                    f"seq_len: 32}}")
    path = tmp_path / "run.yaml"
    path.write_text(f"run: {{name: big, out_dir: {out_dir or tmp_path / 'out'}}}\nmodel: moneta_tiny\n"
                    f"data: {data}\ntrain: {train}\n")
    return path


def _dry_run(capsys, config: Path, *extra: str, nodes: str = "2", gpus: str = "8") -> tuple[int, str, str]:
    rc = main(["launch", "slurm", "--config", str(config), "--nodes", nodes, "--gpus-per-node", gpus,
               "--time", "60", "--no-venv", "--dry-run", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("miras-pretrain launch: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_data_stream_is_one_line_naming_the_field(capsys, tmp_path, prepared):
    cfg = _config(tmp_path, prepared, data=f"{{streams: [{tmp_path / 'nowhere'}], seq_len: 32}}")
    rc, out, err = _dry_run(capsys, cfg)
    assert rc == 2 and out == ""
    assert "data.streams[0]" in _one_error_line(err) and "nowhere: not found" in err


def test_missing_tokenizer_is_one_line_naming_the_field(capsys, tmp_path, prepared):
    cfg = _config(tmp_path, prepared, data=f"{{streams: [{prepared.root}], tokenizer: {tmp_path / 'tok.model'}, "
                                           f"layout: packed, seq_len: 32}}")
    rc, out, err = _dry_run(capsys, cfg)
    assert rc == 2 and "data.tokenizer" in _one_error_line(err) and "tok.model: not found" in err


def test_directory_that_is_not_prepared_data(capsys, tmp_path, prepared):
    (tmp_path / "raw").mkdir()
    cfg = _config(tmp_path, prepared, data=f"{{streams: [{tmp_path / 'raw'}], seq_len: 32}}")
    rc, _, err = _dry_run(capsys, cfg)
    assert rc == 2 and "no manifest.json, not a prepared dataset" in _one_error_line(err)


def test_missing_init_from_is_refused(capsys, tmp_path, prepared):
    cfg = _config(tmp_path, prepared, train=f"{{micro_batch_size: 8, init_from: {tmp_path / 'w.pt'}}}")
    rc, _, err = _dry_run(capsys, cfg)
    assert rc == 2 and "train.init_from" in _one_error_line(err) and "w.pt: not found" in err


def test_global_batch_is_kept_by_deriving_accumulation(capsys, tmp_path, prepared):
    # 8 x 2 x 8 GPUs = 128 on one node; on 2 x 8 GPUs the accumulation halves to keep 128
    cfg = _config(tmp_path, prepared, train="{micro_batch_size: 8, grad_accum_steps: 2, global_batch_size: 128}")
    rc, out, err = _dry_run(capsys, cfg)
    assert rc == 0, err
    assert ("global batch: 128 sequences = train.micro_batch_size 8 x grad_accum_steps 1 x 16 data-parallel "
            "ranks") in err
    rc, out, err = _dry_run(capsys, cfg, nodes="1")
    assert rc == 0 and "128 sequences = train.micro_batch_size 8 x grad_accum_steps 2 x 8" in err


def test_global_batch_that_does_not_divide_is_refused_with_the_numbers(capsys, tmp_path, prepared):
    cfg = _config(tmp_path, prepared, train="{micro_batch_size: 8, global_batch_size: 200}")
    rc, out, err = _dry_run(capsys, cfg)
    line = _one_error_line(err)
    assert rc == 2 and out == ""
    assert "train.global_batch_size 200 is not a multiple of train.micro_batch_size 8 x 16 data-parallel" in line
    assert "= 128" in line


def test_unset_global_batch_is_stated_not_silent(capsys, tmp_path, prepared):
    cfg = _config(tmp_path, prepared)
    rc, _, err = _dry_run(capsys, cfg)
    assert rc == 0, err
    assert "global batch: 256 sequences" in err and "train.global_batch_size is not set" in err


def test_world_not_a_multiple_of_model_parallel_is_refused(capsys, tmp_path, prepared):
    cfg = _config(tmp_path, prepared)
    rc, _, err = _dry_run(capsys, cfg, "--set", "parallel.tensor_parallel_size=3")
    assert rc == 2 and "not a multiple of tensor x pipeline x context parallel = 3" in _one_error_line(err)


def test_node_local_out_dir_and_chdir_warn(capsys, tmp_path, prepared, monkeypatch):
    cfg = _config(tmp_path, prepared, out_dir=Path("/tmp/miras-launch-check-run"))
    monkeypatch.chdir(tmp_path)  # pytest's tmp_path lives under /tmp here: a node-local --chdir
    rc, out, err = _dry_run(capsys, cfg)
    assert rc == 0, err
    assert "warning: run.out_dir /tmp/miras-launch-check-run is under /tmp, node-local" in err
    assert "warning: --chdir (the submitting directory)" in err
    assert "#SBATCH --chdir=" in out  # still rendered: a warning, not a refusal


@pytest.mark.parametrize("path, prefix", [("/tmp/x", "/tmp"), ("/dev/shm/a/b", "/dev/shm"),
                                          ("/scratch/local/u", "/scratch/local"), ("/tmpfoo/x", None),
                                          ("/scratch/project/u", None), ("/home/u/runs", None)])
def test_node_local_prefixes(path, prefix):
    assert node_local(Path(path)) == prefix
