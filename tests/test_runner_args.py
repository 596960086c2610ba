"""The example runners refuse counts that train nothing (a usage error, before any training)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--seeds", "0"], ["--steps", "-2"]])
def test_toy_runner_refuses_counts_below_one(argv, capsys):
    from examples.toy.run import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--timing-rounds", "0"], ["--steps", "0"], ["--eval-every", "0"], ["--seeds", "0"],
                                  ["--n-equiv", "0"], ["--batch", "0"], ["--data-seed", "-1"]])
def test_rotmnist_runner_refuses_counts_that_train_nothing(argv, capsys):
    pytest.importorskip("escnn")
    from examples.rotmnist.run import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "must be >=" in capsys.readouterr().err
