"""Bad input ends in one readable message and exit status 2, never a traceback."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import PACS_MINI
from helpers import PACS_MINI_ARGS, read_summary, run_cli
from fedclip_lightning.cli import main


def _fails(capsys, args: list[str], *needles: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert "Fix:" in err
    return err


@pytest.fixture
def mini_copy(tmp_path):
    root = tmp_path / "mini"
    shutil.copytree(PACS_MINI, root)
    return root


def _args(root, *more):
    return ["experiment=pacs_mini_debug", f"data.root={root}", "progress=false", "plots=false", "logger=none",
            "output_dir=" + str(root.parent / "outputs"), *more]


def test_missing_root(capsys, tmp_path):
    _fails(capsys, _args(tmp_path / "absent"), "data.root=", "does not exist")


def test_missing_domain(capsys, mini_copy):
    _fails(capsys, _args(mini_copy, "data.domains=[art_painting,cartoon,mars]"), "mars", "data.domains")


def test_empty_domain(capsys, mini_copy):
    (mini_copy / "void" / "dog").mkdir(parents=True)
    _fails(capsys, _args(mini_copy, "data.domains=[art_painting,cartoon,void]", "data.unseen=[cartoon]"),
           "void", "no images")


def test_unseen_not_among_domains(capsys, mini_copy):
    _fails(capsys, _args(mini_copy, "data.unseen=[mars]"), "mars", "data.unseen")


def test_no_class_in_common(capsys, tmp_path):
    root = tmp_path / "disjoint"
    for domain, cls in (("a", "dog"), ("b", "horse"), ("c", "house")):
        (root / domain / cls).mkdir(parents=True)
        src = next((PACS_MINI / "photo" / "dog").iterdir())
        for i in range(5):
            shutil.copy(src, root / domain / cls / f"{i}.jpg")
    _fails(capsys, _args(root, "data.domains=null", "data.unseen=[c]"), "no class is common", "data.domains")


def test_corrupt_image_named(capsys, mini_copy):
    bad = mini_copy / "photo" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    _fails(capsys, _args(mini_copy), "broken.jpg", "data.on_corrupt=skip")


def test_corrupt_image_skipped_and_counted(mini_copy):
    bad = mini_copy / "photo" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    assert main(_args(mini_copy, "data.on_corrupt=skip", "run_name=s", "federation.rounds=1")) == 0
    s = read_summary(mini_copy.parent / "outputs" / "s")
    assert s["skipped_images"] == [str(bad)]


def test_unknown_backbone(capsys, mini_copy):
    _fails(capsys, _args(mini_copy, "backbone.name=ViT-B-99"), "ViT-B-99", "backbone.name", "ViT-B-32")


def test_absent_weights(capsys, mini_copy, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    err = _fails(capsys, _args(mini_copy, "backbone=vit_b32_openai", "backbone.download=false",
                               f"backbone.cache_dir={tmp_path / 'clip'}"),
                 "ViT-B-32", "openai", "backbone.pretrained=/path/to/checkpoint")
    assert str(tmp_path / "clip") in err  # says where it looked


@pytest.mark.parametrize("override,needle", [
    ("federation.rounds=0", "federation.rounds=0"),
    ("algorithm.lr=0", "algorithm.lr=0.0"),
    ("data.split.ratios=[0.7,0.2,0.2]", "sum to 1.1"),
])
def test_invalid_values(capsys, mini_copy, override, needle):
    _fails(capsys, _args(mini_copy, override), needle)


def test_unknown_flag_and_help(capsys):
    assert main(["--frobnicate"]) == 2
    assert "--frobnicate" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "experiment=" in out and "pacs_paper" in out


def test_print_config(capsys):
    assert main(["--print-config", "federation.rounds=7"]) == 0
    assert "rounds: 7" in capsys.readouterr().out


def test_subprocess_error_has_no_traceback(tmp_path):
    """The real entry point, as a shell sees it."""
    proc = run_cli([*PACS_MINI_ARGS, "data.root=/definitely/not/here", "federation.rounds=0"], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "federation.rounds=0" in proc.stderr


def test_logs_a_cluster_file_can_read(tmp_path):
    """Not on a terminal (a SLURM output file): no progress bars, a line per evaluated round; the SLURM job,
    its nodes and resources in the header; log records with a timestamp and the rank."""
    from helpers import cli_env, run_main

    env = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", SLURM_NTASKS="1", SLURM_CPUS_PER_TASK="8")
    args = [a for a in PACS_MINI_ARGS if a != "progress=false"]
    proc = run_main([*args, "run_name=r", "logger=none", "progress=true"], tmp_path, env)  # output: not a tty
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert [line.split(":")[0].strip() for line in proc.stdout.splitlines() if line.startswith("  round ")] == \
        ["round 1/3", "round 2/3", "round 3/3"]
    assert "SLURM job 4242 on node1: 1 task(s), 8 CPUs per task" in proc.stdout
    code = ("import logging; from fedclip_lightning.cli import _log_format; _log_format(); "
            "logging.getLogger('fedclip_lightning.t').warning('hello')")
    for rank, level, shown in (("0", "", True), ("1", "", False), ("1", "DEBUG", True)):
        out = subprocess.run([sys.executable, "-c", code],
                             env=dict(cli_env(tmp_path), **env, RANK=rank, FEDCLIP_LOG_LEVEL=level),
                             capture_output=True, text=True).stderr
        assert (f"[rank {rank}] WARNING fedclip_lightning.t: hello" in out) == shown, (rank, level, out)
        if shown:
            assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank", out)


@pytest.mark.parametrize("module", ["fedclip_lightning", "fedclip_lightning.sweep", "fedclip_lightning.pretrain"])
def test_help_into_a_closed_pipe_ends_quietly(module):
    """`fedclip-lightning --help | head`: the reader goes away; the command stops without a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", module, "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # no reader left before the command writes a byte
    err = proc.stderr.read()
    assert proc.wait(timeout=120) in (0, 1), err  # 1: ours; argparse (sweep, pretrain) drops the error itself
    assert "Traceback" not in err and "BrokenPipe" not in err, err
