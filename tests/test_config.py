"""Config composition and validation: every preset, every value check."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedclip_lightning.config import Config
from fedclip_lightning.configure import check, conf_dir, load_config, to_config
from fedclip_lightning.errors import ConfigError

CONF = conf_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def _options(group: str) -> list[str]:
    return sorted(f.stem for f in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_preset_composes_and_validates(group, option, tmp_path):
    cfg = load_config([f"{group}={option}", f"data.root={tmp_path}"])
    assert isinstance(cfg, Config)
    if group == "experiment" and option == "pacs_paper":
        assert cfg.backbone.name == "ViT-B-32" and cfg.backbone.pretrained == "openai"
        assert cfg.federation.rounds == 200 and cfg.algorithm.lr == 5e-5
        assert cfg.data.domains == ["art_painting", "cartoon", "photo", "sketch"]


def test_default_is_the_demo():
    cfg = load_config([])
    assert cfg.data.dataset == "synthetic" and cfg.data.unseen == ["photo"]
    # The small CLIP that ships in the package, named by the fedclip_weights resolver: a real file path.
    assert cfg.backbone.name == "fedclip-mini" and Path(cfg.backbone.pretrained).is_file()
    assert Path(cfg.backbone.pretrained).name == "fedclip-mini-synthetic.pt"
    assert cfg.algorithm.name == "fedclip" and cfg.algorithm.lr == 5e-5  # the reference hyperparameters
    assert cfg.federation.rounds == 200 and cfg.federation.zero_shot_baseline
    assert cfg.fabric.accelerator == "cpu"


def test_reference_hyperparameters():
    a = load_config([]).algorithm
    assert (a.lr, list(a.betas), a.eps, a.weight_decay) == (5e-5, [0.9, 0.98], 1e-6, 0.2)
    assert a.loss == "contrastive" and a.optimizer_state == "reset" and a.local_epochs == 1
    assert load_config([]).federation.aggregation == "uniform"
    assert load_config([]).data.prompt == "a picture of a {}" and load_config([]).data.batch_size == 32


def test_dataset_presets_name_their_domains(tmp_path):
    expected = {
        "pacs": ["art_painting", "cartoon", "photo", "sketch"],
        "vlcs": ["Caltech101", "LabelMe", "SUN09", "VOC2007"],
        "office_home": ["Art", "Clipart", "Product", "Real_World"],
        "domainnet": ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
    }
    for name, domains in expected.items():
        cfg = load_config([f"data={name}", f"data.root={tmp_path}"])
        assert cfg.data.domains == domains and cfg.data.unseen[0] in domains


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(["federation.rounds=0", "algorithm.lr=0", "data.split.ratios=[0.5,0.2,0.2]",
                     "backbone.name=ViT-B-99", "algorithm.loss=hinge"])
    msg = str(err.value)
    assert "5 problems" in msg
    for key in ("federation.rounds=0", "algorithm.lr=0.0", "data.split.ratios=[0.5, 0.2, 0.2]",
                "backbone.name='ViT-B-99'", "algorithm.loss='hinge'"):
        assert key in msg
    assert msg.count("Fix:") == 5


@pytest.mark.parametrize("override,needle", [
    ("algorithm.lr=-1", "algorithm.lr=-1"),
    ("federation.rounds=-3", "federation.rounds=-3"),
    ("data.split.ratios=[0.6,0.2]", "data.split.ratios"),
    ("data.batch_size=1", "data.batch_size=1"),
    ("data.unseen=[nowhere]", "data.unseen"),
    ("fabric.devices=0", "fabric.devices=0"),
    ("data.prompt=hello", "data.prompt"),
    ("features.encoder_batch_size=0", "features.encoder_batch_size=0"),
])
def test_invalid_values(override, needle):
    with pytest.raises(ConfigError, match="Fix:") as err:
        load_config([override])
    assert needle in str(err.value)


def test_type_errors_and_unknown_keys_name_the_key():
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(["federation.rounds=abc"])
    with pytest.raises(ConfigError, match="federation.roundz"):
        load_config(["federation.roundz=3"])
    with pytest.raises(ConfigError, match="pacs_mini"):  # lists the options that exist
        load_config(["data=nope"])
    with pytest.raises(ConfigError, match="data.root"):
        load_config(["data=pacs"])


def test_to_config_round_trip():
    cfg = check(to_config({"federation": {"rounds": 4}}))
    assert cfg.federation.rounds == 4 and cfg.algorithm.name == "fedclip"


def test_every_config_file_ships_in_the_package():
    """conf/ lives in the package (the top-level conf is a link to it) and pyproject's package data takes
    every file of it, so an installed wheel composes configs without the source tree."""
    import fnmatch
    import tomllib

    from conftest import REPO

    root = REPO / "src" / "fedclip_lightning"
    assert conf_dir() == root / "conf" and (REPO / "conf").resolve() == root / "conf"
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [str(p.relative_to(root)) for p in (root / "conf").rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs["fedclip_lightning"])
                         for f in files)


def test_algorithm_yamls_state_only_what_differs_from_their_class():
    """Each algorithm's config class is its YAML's schema (Hydra's ConfigStore: algorithm/<name>_schema)."""
    import dataclasses

    import yaml

    from fedclip_lightning.algorithms import registry

    for f in sorted((conf_dir() / "algorithm").glob("*.yaml")):
        data = yaml.safe_load(f.read_text())
        name = f.stem
        assert data["defaults"] == [f"{name}_schema", "_self_"], f.name
        default = dataclasses.asdict(registry.get(name).config_class(name=name))
        same = [k for k, v in data.items() if k != "defaults" and default[k] == v]
        assert not same, f"{f.name} restates the defaults of {same}"
        assert dataclasses.asdict(load_config([f"algorithm={name}"]).algorithm) == {**default, **{
            k: v for k, v in data.items() if k != "defaults"}}


def test_the_flat_federation_keys_of_earlier_releases_are_refused_with_their_new_name():
    with pytest.raises(ConfigError) as err:
        load_config(["federation.dp=server", "+federation.dp_clip=0.5", "federation.server_optimizer=adam",
                     "federation.local_epochs_range=[1,3]"])
    msg = str(err.value)
    assert "4 problems" in msg
    for fix in ("federation.privacy.mode=server", "federation.privacy.clip=0.5", "federation.server_optimizer.name=adam",
                "federation.unreliable.local_epochs_range=[1,3]"):
        assert f"Fix: {fix}" in msg
    # A whole group in Hydra's dict syntax is the new form, and so is every grouped key.
    cfg = load_config(["federation.server_optimizer={name:adam,lr:0.05}", "federation.attack.name=scaled",
                       "federation.attack.fraction=0.34"])
    assert (cfg.federation.server_optimizer.name, cfg.federation.server_optimizer.lr) == ("adam", 0.05)
    # A saved config (a YAML file, a checkpoint's config) with the old keys says the same.
    with pytest.raises(ConfigError, match=r"(?s)federation.dp_secure: .* Fix: write federation.privacy.secure instead"
                                          r".*federation.attack: .* Fix: write federation.attack.name: scaled instead"):
        to_config({"federation": {"dp_secure": True, "attack": "scaled"}})


def test_a_config_folder_from_the_environment_is_used_or_refused_never_replaced(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("FEDCLIP_CONF_DIR", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"FEDCLIP_CONF_DIR=.*nope' has no config.yaml\. Fix:"):
        conf_dir()
    own = tmp_path / "conf"
    shutil.copytree(CONF, own)
    (own / "config.yaml").write_text((own / "config.yaml").read_text().replace("\nseed: 0\n", "\nseed: 5\n"))
    monkeypatch.setenv("FEDCLIP_CONF_DIR", str(own))
    assert conf_dir() == own and load_config([]).seed == 5
