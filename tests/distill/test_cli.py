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
                    "--max-iter", "--tol", "--backend", "--resume", "--grad-accum",
                    "--eps-schedule"):
            assert opt in out
        # defaults come from the dataclasses and are shown
        assert "optimizer steps (default: 1000)" in " ".join(out.split())
        assert "eps_t = max(eps, START * FACTOR^(t-1))" in " ".join(out.split())


def test_cli_defaults_are_the_dataclass_defaults():
    from optical_kernels.distill.losses import OTOptions
    from optical_kernels.distill.trainer import TrainOptions

    ns = cli.build_parser().parse_args(["distill", "--out", "x"])
    o = cli.options("distill", ns)
    assert o[TrainOptions] == TrainOptions() and o[OTOptions] == OTOptions()


def test_ot_choices_match_the_api():
    import typing

    from optical_kernels.api import GRADS, OBJECTIVES
    from optical_kernels.costs import COSTS
    from optical_kernels.distill.losses import OTOptions

    hints = typing.get_type_hints(OTOptions)
    assert typing.get_args(hints["cost"]) == COSTS
    assert typing.get_args(hints["objective"]) == OBJECTIVES
    assert set(typing.get_args(hints["grad"])) == set(GRADS)


def test_no_command_prints_help(capsys):
    code, out, _ = _run(capsys)
    assert code == 2 and "COMMAND" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["distill", "--out", "x", "--eps", "0"], "eps must be > 0"),
        (["distill", "--out", "x", "--loss", "l2"], "invalid choice: 'l2'"),
        (["distill", "--out", "x", "--steps", "0"], "steps must be an integer >= 1"),
        (["distill"], "the following arguments are required: --out"),
        (["eval", "--pool-size", "x"], "invalid int value"),
        (["align", "--cost", "l1"], "invalid choice"),
        (["distill", "--out", "x", "--tol", "-1"], "tol must be >= 0"),
        (["distill", "--out", "x", "--eps-schedule", "1"], "eps_schedule must be two numbers"),
    ],
)
def test_argument_errors(capsys, argv, message):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 3


def test_errors_say_what_to_do(capsys, tmp_path, monkeypatch):
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path / "nope"))
    assert code == 1 and "not a sentence-transformers model folder" in err and "<out>/model" in err
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
def toy_cli(monkeypatch, toy_mod, tmp_path):
    """The CLI on the tiny random models and the toy bitext (no model wheels needed)."""
    monkeypatch.setattr(cli, "load_models",
                        lambda *a, **k: toy_mod.toy_models(tmp_path / "models"))
    test = toy_mod.toy_pairs(12, seed=3)
    monkeypatch.setattr(cli, "eval_sets", lambda *a, **k: {
        "toy test": ([p[0] for p in test], [p[1] for p in test])})
    return toy_mod


def _distill_args(tmp_path, toy_cli, *extra):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("".join(f"{f}\t{e}\n" for f, e in toy_cli.toy_pairs(16)))
    return ["distill", "--out", str(tmp_path / "run"), "--train", str(tsv), "--steps", "2",
            "--batch-size", "4", "--no-progress", "--max-iter", "20", *extra]


def test_distill_eval_align_end_to_end(capsys, tmp_path, toy_cli):
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, *_distill_args(tmp_path, toy_cli))
    assert code == 0, err
    assert "done: 2 steps" in stdout and (out / "model" / "model.safetensors").is_file()
    assert (out / "history.json").is_file()
    assert (out / "checkpoints" / "checkpoint-2" / "sha256-manifest.json").is_file()

    js = tmp_path / "res.json"
    code, stdout, err = _run(capsys, "eval", "--model", str(out / "model"), "--baselines",
                             "--json", str(js), "--no-progress")
    assert code == 0, err
    assert "P@1" in stdout and "teacher on foreign text" in stdout and js.is_file()

    png = tmp_path / "align.png"
    code, stdout, err = _run(capsys, "align", "--model", str(out / "model"),
                             "--foreign", "dog ni eht", "--english", "god in the",
                             "--out", str(png))
    assert code == 0, err
    assert png.stat().st_size > 1000 and "3×3 words" in stdout

    # a corrupt exported model is refused, naming the file
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)
    code, _, err = _run(capsys, "eval", "--model", str(out / "model"))
    assert code == 1 and "model.safetensors is corrupt" in err


@pytest.mark.parametrize("content", ["", "# only a comment\n# another\n"])
def test_empty_training_file_is_named(capsys, tmp_path, toy_cli, content):
    tsv = tmp_path / "empty.tsv"
    tsv.write_text(content)
    code, _, err = _run(capsys, "distill", "--out", str(tmp_path / "r"), "--train", str(tsv))
    assert code == 1
    assert f"training file {tsv} holds no sentence pair" in err and "build the data" not in err


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(capsys, tmp_path, toy_cli,
                                                                 monkeypatch):

    import torch

    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint: the disk is full
                with open(f, "wb") as fh:
                    fh.write(b"partial")
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = _run(capsys, *_distill_args(tmp_path, toy_cli, "--ckpt-every", "1"))
    assert code == 1
    ours = [ln for ln in err.splitlines() if ln.startswith("optical-kernels")]
    assert len(ours) == 1 and "Traceback" not in err
    assert ours[0].startswith("optical-kernels distill: error: no space left on the device")
    assert "checkpoint-1 is intact" in ours[0]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1"]  # partial one removed
    from optical_kernels.distill.trainer import verify_manifest

    verify_manifest(ckpts / "checkpoint-1", must_exist=True)


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "optical_kernels.distill", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "distill" in proc.stdout


def test_demo_arguments():
    from optical_kernels.distill import demo

    args = demo.parse_args([])
    assert args.steps == demo.DEMO_STEPS and isinstance(args.steps, int)
    assert demo.parse_args(["--steps", "7"]).steps == 7
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "auto"])


def test_top_level_help_does_not_import_transformers():
    code = ("import sys; from optical_kernels.distill import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip().endswith("False"), out.stderr


def test_demo_smoke_pool_is_fixed_and_spread_over_the_split():
    from optical_kernels.distill import demo

    items = list(range(3230))
    pool = demo.smoke_pool(items, 1000)
    assert len(pool) == 1000 == len(set(pool)) and pool[0] == 0 and pool[-1] == 3229
    assert max(b - a for a, b in zip(pool, pool[1:])) <= 4  # no long stretch (one book) left out
    assert pool == demo.smoke_pool(items, 1000)
    assert demo.smoke_pool(items[:10], 1000) == items[:10]
