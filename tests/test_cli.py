"""The top-level command line: the deepspeed launcher's --local_rank is accepted before the
subcommand and exported as LOCAL_RANK; user errors are one line with exit code 2."""

import os

from miras_pretrain import cli


def test_deepspeed_local_rank_flag_is_accepted(monkeypatch, tmp_path, capsys):
    # setenv first so monkeypatch records the original state and removes what main() sets
    monkeypatch.setenv("LOCAL_RANK", "unset")
    monkeypatch.delenv("LOCAL_RANK")
    missing = tmp_path / "missing.yaml"
    code = cli.main(["--local_rank=1", "train", "--config", str(missing)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert os.environ["LOCAL_RANK"] == "1"
    assert "missing.yaml" in err and "\n" not in err and "unrecognized arguments" not in err
