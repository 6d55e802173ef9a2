"""The command line (attnpatch/cli/): bad input is one line on stderr and exit code 2, found before
anything slow is loaded."""

import pytest

from attnpatch.cli import build_parser, main


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model fails the test: validation must come first."""
    import attnpatch.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(attnpatch.models, "load_model", refuse)


@pytest.mark.parametrize("argv,message", [
    (["eval", "--metrics", "perplexity"], "unknown metric(s) ['perplexity']; known metrics: ppl, decode_ppl"),
    (["eval", "--methods", "nope"], "unknown method 'nope'; known methods: a_shape"),
    (["patch", "--method", "linear", "--param", "feature_map", "--out", "x"], "--param expects key=value"),
    (["patch", "--method", "linear", "--param", "chunk_size=0", "--out", "x"], "out of range"),
])
def test_bad_input_is_one_line_before_any_model_loads(argv, message, capsys, no_model_loads):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnpatch: error: ") and message in err and err.count("\n") == 1, err


def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    assert main(["patch", "--model", str(tmp_path / "typo"), "--method", "linear", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnpatch: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_every_subcommand_is_its_own_module():
    from attnpatch import cli

    commands = {action.dest: action for action in build_parser()._subparsers._group_actions}["command"].choices
    assert set(commands) == {"list", "patch", "compare", "eval"}
    assert {c.__name__.rsplit(".", 1)[-1] for c in cli.SUBCOMMANDS} == {"list_methods", "patch", "compare", "evaluate"}
