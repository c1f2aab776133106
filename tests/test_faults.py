"""Faults injected on purpose: each ends in a correct result or one clear message, never a silent wrong one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PACS_MINI
from helpers import cli_env, read_summary, run_main

BASE = ["experiment=pacs_mini_debug", "progress=false", "plots=false", "logger=none"]


@pytest.fixture()
def mini(tmp_path) -> Path:
    dst = tmp_path / "mini"
    shutil.copytree(PACS_MINI, dst)
    return dst


def _args(mini: Path, *more: str) -> list[str]:
    return [*BASE, f"data.root={mini}", *more]


def _flat(run_dir: Path, name: str = "adapter_final.pt") -> torch.Tensor:
    st = torch.load(run_dir / name, weights_only=True)["state"]
    return torch.cat([v.reshape(-1) for v in st.values()])


# 1. resume checks its data ------------------------------------------------------------------------------

def test_resume_refuses_changed_data(mini, tmp_path):
    assert run_main(_args(mini, "run_name=r", "federation.rounds=2"), tmp_path).returncode == 0
    extra = mini / "photo" / "dog" / "extra.jpg"
    shutil.copy(next((mini / "photo" / "dog").glob("*.jpg")), extra)  # one more image in a participating domain
    proc = run_main(_args(mini, "run_name=r", "federation.rounds=4", "resume=auto"), tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the images differ" in proc.stderr and f"added {extra.resolve()}" in proc.stderr
    assert "resume=never" in proc.stderr
    extra.unlink()
    victim = next((mini / "cartoon" / "dog").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes() + b"\0")  # the same file, changed
    proc = run_main(_args(mini, "run_name=r", "federation.rounds=4", "resume=auto"), tmp_path)
    assert proc.returncode == 2 and f"modified {victim.resolve()}" in proc.stderr


# 2. one writer per run directory -------------------------------------------------------------------------

def test_a_second_run_into_the_same_directory_is_refused_and_a_stale_lock_recovered(mini, tmp_path):
    slow = _args(mini, "run_name=dup", "features=reference", "federation.rounds=2000")
    first = subprocess.Popen([sys.executable, "-m", "fedclip_lightning", *slow], cwd=tmp_path, env=cli_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "outputs" / "dup" / ".lock"
    end = time.monotonic() + 120
    while not (tmp_path / "outputs" / "dup" / "metrics.csv").exists():
        assert first.poll() is None and time.monotonic() < end, first.stderr.read() if first.poll() is not None else ""
        time.sleep(0.05)
    assert json.loads(lock.read_text())["pid"] == first.pid
    second = run_main(_args(mini, "run_name=dup", "algorithm.lr=1e-3"), tmp_path)
    assert second.returncode == 2 and "is in use by another run" in second.stderr and str(first.pid) in second.stderr
    first.send_signal(signal.SIGKILL)  # leaves its lock behind
    first.wait()
    assert lock.exists()
    third = run_main([*slow[:-1], "federation.rounds=2"], tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "taking over the stale lock" in third.stdout and not lock.exists()


# 3. checkpoints that prove they are whole ----------------------------------------------------------------

def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(mini, tmp_path):
    args = _args(mini, "algorithm=local", "algorithm.optimizer_state=keep", "federation.checkpoint_min_seconds=0")
    assert run_main([*args, "run_name=ref", "federation.rounds=6"], tmp_path).returncode == 0
    assert run_main([*args, "run_name=r", "federation.rounds=5"], tmp_path).returncode == 0
    ckpts = tmp_path / "outputs" / "r" / "checkpoints"
    (ckpts / "round-000005" / "clients-rank0.pt").unlink()  # a missing shard
    proc = run_main([*args, "run_name=r", "federation.rounds=6", "resume=auto"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round-000005 is damaged (clients-rank0.pt is missing)" in proc.stdout
    s = read_summary(tmp_path / "outputs" / "r")
    assert s["resumed_from"] == 4
    assert s["final"] == read_summary(tmp_path / "outputs" / "ref")["final"]  # the same result as uninterrupted
    assert torch.equal(_flat(tmp_path / "outputs" / "r", "adapters_final.pt"),
                       _flat(tmp_path / "outputs" / "ref", "adapters_final.pt"))
    # A shard whose bytes changed after sealing never reaches torch.load: named and refused when asked for.
    shard = ckpts / "round-000006" / "clients-rank0.pt"
    shard.write_bytes(b"not a checkpoint")
    proc = run_main([*args, "run_name=r", "federation.rounds=7", f"resume={ckpts / 'round-000006'}"], tmp_path)
    assert proc.returncode == 2 and "is damaged" in proc.stderr and "Traceback" not in proc.stderr


# 4. a bad image found before training, and any failure recorded ---------------------------------------------

def test_a_truncated_jpeg_is_skipped_and_listed(mini, tmp_path):
    cut = mini / "photo" / "dog" / "cut.jpg"
    data = next((mini / "photo" / "dog").glob("*.jpg")).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    proc = run_main(_args(mini, "run_name=e", "federation.rounds=1"), tmp_path)
    assert proc.returncode == 2 and "cut.jpg" in proc.stderr and "data.on_corrupt=skip" in proc.stderr
    proc = run_main(_args(mini, "run_name=s", "federation.rounds=1", "data.on_corrupt=skip"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_summary(tmp_path / "outputs" / "s")["skipped_images"] == [str(cut.resolve())]


def test_a_failure_after_the_start_leaves_summary_failed(mini, tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_main(_args(mini, "run_name=f", "federation.rounds=1", f"features.dir={tmp_path / 'afile'}"), tmp_path)
    assert proc.returncode != 0
    s = read_summary(tmp_path / "outputs" / "f")
    assert s["status"] == "failed" and s["error"]


# 6. a full disk -----------------------------------------------------------------------------------------------

def test_disk_full_is_one_message_and_leaves_nothing_behind(mini, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not allowed here")
    try:
        free = shutil.disk_usage(mnt).free
        (mnt / "ballast").write_bytes(b"\0" * (free - 120 * 1024))
        proc = run_main(_args(mini, "run_name=d", f"output_dir={mnt / 'out'}", "federation.rounds=50",
                             "federation.checkpoint_min_seconds=0"), tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "no space left on the device" in proc.stderr and str(mnt / "out" / "d") in proc.stderr
        assert read_summary(mnt / "out" / "d")["status"] == "failed"
        assert not [p for p in mnt.rglob("*") if ".tmp" in p.name]
        # The run (here in this process, as a notebook would call it) left no file open on that disk.
        umount = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        assert umount.returncode == 0, f"a file of the failed run is still open: {umount.stderr}"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# 7. the feature cache proves its files ---------------------------------------------------------------------

def test_a_bit_flipped_cache_file_is_rebuilt(mini, tmp_path):
    args = _args(mini, "federation.rounds=1", f"features.dir={tmp_path / 'features'}")
    assert run_main([*args, "run_name=a"], tmp_path).returncode == 0
    files = sorted((tmp_path / "features").glob("*.pt"))
    blob = torch.load(files[0], weights_only=True)
    blob["features"][0, 0] += 1.0  # one value changed, the file otherwise valid
    torch.save(blob, files[0])
    proc = run_main([*args, "run_name=b"], tmp_path)
    assert proc.returncode == 0
    s = read_summary(tmp_path / "outputs" / "b")
    assert s["features"]["rebuilt_files"] == 1
    assert s["final"] == read_summary(tmp_path / "outputs" / "a")["final"]
    assert torch.equal(_flat(tmp_path / "outputs" / "a"), _flat(tmp_path / "outputs" / "b"))


# 8. folder scanning -------------------------------------------------------------------------------------------

def test_a_symlink_loop_and_look_alike_class_names(mini, caplog):
    from fedclip_lightning.data.domains import scan_domains

    before = scan_domains(mini)
    os.symlink(".", mini / "photo" / "loop")
    after = scan_domains(mini)
    assert after.classes == before.classes and len(after.samples["photo"]) == len(before.samples["photo"])
    assert "a symlink to" in caplog.text
    shutil.copytree(mini / "photo" / "dog", mini / "photo" / "Dog")
    for d in ("art_painting", "cartoon", "sketch"):
        shutil.copytree(mini / d / "dog", mini / d / "Dog")
    caplog.clear()
    scan_domains(mini)
    assert "differ only by case or whitespace" in caplog.text and "'Dog'" in caplog.text


# 9. smaller ones ------------------------------------------------------------------------------------------------

def test_an_unknown_added_key_is_refused(tmp_path):
    proc = run_main(["+federation.roundz=3", "--print-config"], tmp_path)
    assert proc.returncode == 2 and "federation.roundz: unknown key (did you mean federation.rounds?)" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["usr1", "term"])
def test_a_signal_during_start_up_is_kept(mini, tmp_path, sig):
    """A signal in the first instants (data checks, model loading): the run still checkpoints after its
    first round and exits with status 3. Under SLURM, SIGUSR1 (launch.sh's warning before the time limit)
    requeues the job; SIGTERM (scancel) does not, or a cancelled job would come back."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**cli_env(tmp_path), "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "fedclip_lightning", *_args(mini, "run_name=early", "federation.rounds=5")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Once the package is imported (the handlers go in before the data is scanned), deliver the signal.
    end = time.monotonic() + 60
    while not (tmp_path / "outputs" / "early").exists():
        assert proc.poll() is None and time.monotonic() < end
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    requeued = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    if sig == signal.SIGUSR1:
        assert requeued == "requeue 4242\n" and "requeued" in err
    else:
        assert requeued == "" and "stopped on SIGTERM, so the job is not requeued" in err
    s = read_summary(tmp_path / "outputs" / "early")
    assert s["status"] == "preempted" and s["rounds_run"] == 1
    assert (tmp_path / "outputs" / "early" / "checkpoints" / "round-000001" / "COMPLETE").exists()


def test_fp16_is_clip_loads_mixed_precision_and_pure_fp16_an_option():
    """backbone.precision=fp16 (the GPU default) is the reference's numerics: fp16 weights, LayerNorm in fp32
    (its output on an fp16 input is the float64 result rounded once); pure_fp16 casts LayerNorm too."""
    import torch.nn.functional as F

    from fedclip_lightning.config import BackboneConfig
    from fedclip_lightning.model.backbone import load_backbone

    def lns(bb):
        return [m for m in bb.clip.model.modules() if isinstance(m, torch.nn.LayerNorm)]

    mixed = load_backbone(BackboneConfig(name="fedclip-tiny-vit", precision="fp16", download=False), device="cpu", seed=0)
    pure = load_backbone(BackboneConfig(name="fedclip-tiny-vit", precision="pure_fp16", download=False), device="cpu", seed=0)
    fp32 = load_backbone(BackboneConfig(name="fedclip-tiny-vit", precision="fp32", download=False), device="cpu", seed=0)
    assert lns(mixed) and all(m.weight.dtype == torch.float32 for m in lns(mixed))
    assert all(m.weight.dtype == torch.float16 for m in lns(pure))
    assert mixed.clip.model.visual.conv1.weight.dtype == torch.float16
    ln = lns(mixed)[0]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 7, ln.normalized_shape[0], generator=g) * 3 + 1).half()
    ref = F.layer_norm(x.double(), ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)
    out = ln(x)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref.half())  # computed in fp32, rounded to fp16 once
    images = torch.rand(3, 3, 32, 32, generator=g)
    f32, f16 = fp32.image_features(images), mixed.image_features(images)
    assert f16.dtype == torch.float32 and torch.nn.functional.cosine_similarity(f16, f32).min() > 0.999


def test_unreadable_class_and_domain_folders_are_named(mini):
    """A class folder (or a domain folder) that cannot be read stops the scan with its name instead of
    silently losing its images. Root reads everything, so the scan runs without root's power to bypass
    permissions (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and util-linux's setpriv")
    code = ("import sys; from fedclip_lightning.data.domains import scan_domains\n"
            "from fedclip_lightning.errors import DataError\n"
            "try:\n    scan_domains(sys.argv[1]); print('OK')\n"
            "except DataError as e:\n    print('ERR', e)\n")

    def scan_without_override() -> str:
        return subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code,
                               str(mini)], capture_output=True, text=True).stdout

    assert scan_without_override().startswith("OK")
    try:
        os.chmod(mini / "photo" / "dog", 0o000)
        out = scan_without_override()
        assert out.startswith("ERR") and str((mini / "photo" / "dog").resolve()) in out and "Permission denied" in out
        os.chmod(mini / "photo" / "dog", 0o755)
        os.chmod(mini / "cartoon", 0o000)
        out = scan_without_override()
        assert out.startswith("ERR") and "cannot read the domain folder 'cartoon'" in out
    finally:
        os.chmod(mini / "photo" / "dog", 0o755)
        os.chmod(mini / "cartoon", 0o755)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_rank_killed_with_sigkill_stops_the_other_with_a_message_that_does_not_invent_one(mini, tmp_path):
    """kill -9 on rank 1 of a two-process run: rank 0 stops too, saying another process stopped, that its
    message is above unless it was killed without one, and how to go on; no traceback."""
    args = _args(mini, "run_name=k", "fabric.devices=2", "features=reference", "federation.rounds=50",
                 "federation.checkpoint_min_seconds=0")
    proc = subprocess.Popen([sys.executable, "-m", "fedclip_lightning", *args], cwd=tmp_path, env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 180
    while not (tmp_path / "outputs" / "k" / "checkpoints" / "round-000001" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < end, "the run ended before its first checkpoint"
        time.sleep(0.01)
    rank1 = [c for c in _children(proc.pid)
             if b"LOCAL_RANK=1\x00" in Path(f"/proc/{c}/environ").read_bytes()]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert ("another process of this run stopped (its message is above, unless it was killed without one" in err
            and "rerun with resume=auto" in err and "Traceback" not in err), err[-3000:]
