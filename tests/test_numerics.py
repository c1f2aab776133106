"""FEDCLIP_NUMERICS: the portable profile is set before torch starts, or refused with a message."""

from __future__ import annotations

import os

import pytest

from fedclip_lightning import numerics
from fedclip_lightning.cli import main


def _clean_env(monkeypatch):
    for var in (*numerics.PORTABLE, numerics.SWITCH):
        monkeypatch.delenv(var, raising=False)


def test_native_is_the_default_and_changes_nothing(monkeypatch):
    _clean_env(monkeypatch)
    numerics.apply_switch()
    assert not any(v in os.environ for v in numerics.PORTABLE)


def test_unknown_value_is_refused_with_the_fix(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv(numerics.SWITCH, "avx2")
    with pytest.raises(numerics.NumericsError, match=r"FEDCLIP_NUMERICS='avx2': unknown value\. Fix: use"):
        numerics.apply_switch()


def test_a_clashing_variable_is_refused_not_overridden(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv(numerics.SWITCH, "portable")
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    with pytest.raises(numerics.NumericsError, match=r"the environment sets MKL_CBWR='AVX2'\. Fix: unset"):
        numerics.apply_switch()


def test_too_late_once_torch_runs_with_other_kernels(monkeypatch):
    """This test process imported torch long ago: the profile cannot take effect any more, and says so."""
    _clean_env(monkeypatch)
    monkeypatch.setenv(numerics.SWITCH, "portable")
    with pytest.raises(numerics.NumericsError, match="must be set before torch is imported"):
        numerics.apply_switch()


def test_command_line_refuses_a_bad_switch_without_traceback(monkeypatch, capsys):
    _clean_env(monkeypatch)
    monkeypatch.setenv(numerics.SWITCH, "fast")
    assert main(["federation.rounds=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedclip-lightning: FEDCLIP_NUMERICS='fast': unknown value") and "Traceback" not in err


def test_describe_names_kernels_and_threads():
    import torch

    info = numerics.describe()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads()
    assert numerics.header_line(info).startswith("numerics: ")
