"""CLI smoke tests: --help, argument errors, and distill/eval/align wired on the toy models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optical_kernels.distill import cli

ROOT = Path(__file__).parents[2]


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cmd", [None, "data", "distill", "eval", "align", "bench"])
def test_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        cli.main(([cmd] if cmd else []) + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: optical-kernels" in out
    if cmd == "distill":
        for opt in ("--loss", "--student", "--eps", "--cost", "--rho", "--objective", "--grad",
                    "--max-iter", "--tol", "--backend", "--resume", "--grad-accum"):
            assert opt in out


def test_no_command_prints_help(capsys):
    code, out, _ = _run(capsys)
    assert code == 2 and "COMMAND" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["distill", "--out", "x", "--eps", "0"], "expected a number > 0"),
        (["distill", "--out", "x", "--loss", "l2"], "invalid choice: 'l2'"),
        (["distill", "--out", "x", "--steps", "0"], "expected an integer >= 1"),
        (["distill"], "the following arguments are required: --out"),
        (["eval", "--pool-size", "-3"], "expected an integer >= 1"),
        (["align", "--cost", "l1"], "invalid choice"),
        (["distill", "--out", "x", "--tol", "nan?"], "expected a number >= 0"),
    ],
)
def test_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_errors_say_what_to_do(capsys, tmp_path, monkeypatch):
    code, _, err = _run(capsys, "eval", "--checkpoint", str(tmp_path / "nope.pt"))
    assert code == 1 and "does not exist" in err and "checkpoint.pt" in err
    code, _, err = _run(capsys, "data", "--check", "--cache-dir", str(tmp_path))
    assert code == 1 and "run `optical-kernels data`" in err
    code, _, err = _run(capsys, "align", "--foreign", "moni")
    assert code == 1 and "give both --foreign and --english" in err
    code, _, err = _run(capsys, "distill", "--out", str(tmp_path), "--train-english", "e.txt")
    assert code == 1 and "--train-english needs --train" in err
    # bench runs from any directory (tests/test_dropin.py); without a source checkout next to
    # the package or in the current directory it says where the benchmarks are
    import optical_kernels

    monkeypatch.setattr(optical_kernels, "__file__", str(tmp_path / "site" / "ok" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "bench")
    assert code == 1 and "source repository" in err and "pip install -e" in err


@pytest.fixture
def toy_cli(monkeypatch, toy_mod):
    """The CLI on the tiny random encoders and the toy bitext (no model wheels needed)."""
    monkeypatch.setattr(cli, "load_encoders", lambda *a, **k: toy_mod.toy_encoders())
    monkeypatch.setattr(cli, "student_encoder", lambda *a, **k: toy_mod.toy_encoders()[0])
    test = toy_mod.toy_pairs(12, seed=3)
    monkeypatch.setattr(cli, "eval_sets", lambda *a, **k: {
        "toy test": ([p[0] for p in test], [p[1] for p in test])})
    return toy_mod


def test_distill_eval_align_end_to_end(capsys, tmp_path, toy_cli):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("".join(f"{f}\t{e}\n" for f, e in toy_cli.toy_pairs(16)))
    out = tmp_path / "run"
    common = ["--out", str(out), "--train", str(tsv), "--steps", "2", "--batch-size", "4",
              "--no-progress", "--max-iter", "20"]
    code, stdout, err = _run(capsys, "distill", *common)
    assert code == 0, err
    assert "done: 2 steps" in stdout and (out / "checkpoint.pt").is_file()
    assert (out / "history.json").is_file()
    # resuming a finished run is a no-op; other options are refused with advice
    code, _, err = _run(capsys, "distill", *common, "--lr", "1e-3")
    assert code == 1 and "options differ" in err and "new --out" in err

    js = tmp_path / "res.json"
    code, stdout, err = _run(capsys, "eval", "--checkpoint", str(out / "checkpoint.pt"),
                             "--baselines", "--json", str(js))
    assert code == 0, err
    assert "P@1" in stdout and "teacher on foreign text" in stdout and js.is_file()

    png = tmp_path / "align.png"
    code, stdout, err = _run(capsys, "align", "--checkpoint", str(out / "checkpoint.pt"),
                             "--foreign", "dog ni eht", "--english", "god in the",
                             "--out", str(png))
    assert code == 0, err
    assert png.stat().st_size > 1000 and "3×3 tokens" in stdout


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "optical_kernels.distill", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "distill" in proc.stdout


def test_demo_budget_and_arguments():
    from optical_kernels.distill import demo

    # 0.3 s/step, 1,500 eval pairs: plenty of time -> the cap; a slow machine -> the floor
    assert demo.choose_steps(0.3, 20, 1500, 16, 10) == 600
    assert demo.choose_steps(10.0, 20, 1500, 16, 10) == 20
    mid = demo.choose_steps(1.0, 20, 1500, 16, 10)
    assert 20 < mid < 600 and 20 + 1500 / 16 + 30 + 2 * mid <= 600
    assert demo.parse_args([]).steps == "auto"
    assert demo.parse_args(["--steps", "7"]).steps == 7
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])
