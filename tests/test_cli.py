"""The top-level command line: the deepspeed launcher's --local_rank is accepted before the
subcommand and exported as LOCAL_RANK; user errors are one line with exit code 2; ``models``
lists the registered presets x sizes."""

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


def test_models_command_lists_presets_x_sizes(capsys):
    from test_model_config import REGISTERED_PARAMS, SIZES

    from miras_pretrain.cli import main
    from miras_pretrain.model import ModelConfig

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for preset, counts in REGISTERED_PARAMS.items():
        for size, n in zip(SIZES, counts):
            line = next(l for l in out.splitlines() if l.startswith(f"{preset}_{size} "))
            assert f"{n / 1e6:.1f}M" in line, line
    assert main(["models", "--preset", "yaad", "--size", "340m"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("yaad")]
    assert [r.split()[0] for r in rows] == ["yaad_340m"]
    assert main(["models", "--show", "memora_hybrid_tiny"]) == 0
    import yaml

    shown = yaml.safe_load(capsys.readouterr().out)
    assert ModelConfig.from_dict(shown) == ModelConfig.from_ref("memora_hybrid_tiny")
    assert main(["models", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--preset 'nope'" in err
