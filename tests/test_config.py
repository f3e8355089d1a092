"""config.py: the mode table is the one source of the routing each train.mode means (issue 12). A YAML key that
contradicts the mode is one ConfigError naming it (before, adapter_config silently overwrote router.kind and
router.task_experts); a key equal to what the mode implies is accepted; a key the YAML leaves out is filled in, so
the saved config says what is built. Aux-loss weights have one place, train.aux_weights."""
import glob
import os
from dataclasses import asdict

import pytest
import yaml

import config
from config import ConfigError, MODE_TABLE, adapter_config, config_from_dict, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_of(**sections):
    return config_from_dict(sections, "cfg.yaml")


def test_router_kind_task_with_mode_joint_moe_is_one_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: router\.kind 'task' contradicts train\.mode 'joint_moe', "
                                          r"which routes with 'learned' or 'retriever'"):
        cfg_of(train={"mode": "joint_moe"}, router={"kind": "task"})


@pytest.mark.parametrize("mode", ["emb_only", "rank_only", "joint_single", "hard_switch", "hard_switch_shared"])
def test_a_learned_router_with_a_task_routed_mode_is_one_error_naming_the_key(mode):
    with pytest.raises(ConfigError, match=rf"router\.kind 'learned' contradicts train\.mode '{mode}'"):
        cfg_of(train={"mode": mode}, router={"kind": "learned"})


def test_router_task_experts_contradicting_a_task_routed_mode_is_one_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"router\.task_experts .* contradicts train\.mode 'emb_only'"):
        cfg_of(train={"mode": "emb_only"}, router={"task_experts": {"embed": ["embed"], "rerank": ["rerank"]}})


def test_keys_equal_to_what_the_mode_implies_are_accepted():
    cfg = cfg_of(train={"mode": "hard_switch"},
                 router={"kind": "task", "task_experts": {"embed": ["embed"], "rerank": ["rerank"]}})
    assert cfg.router.kind == "task"
    assert cfg_of(train={"mode": "no_shared"}, router={"kind": "retriever"}).router.kind == "retriever"


@pytest.mark.parametrize("mode", config.MODES)
def test_the_routing_a_yaml_leaves_out_is_filled_from_the_mode_and_is_what_is_built(mode):
    cfg = cfg_of(train={"mode": mode})
    row = MODE_TABLE[mode]
    assert cfg.router.kind == row.router_kinds[0]
    if row.task_experts is not None:
        assert cfg.router.task_experts == row.task_experts
    built = adapter_config(cfg)
    assert built.router.kind == cfg.router.kind and built.router.task_experts == cfg.router.task_experts
    assert [e.name for e in built.experts][:len(row.experts)] == list(row.experts)


def test_single_expert_modes_give_every_task_their_one_expert():
    cfg = cfg_of(train={"mode": "emb_only"})
    assert cfg.router.task_experts == {"embed": ["embed"], "rerank": ["embed"]}
    assert [e.name for e in adapter_config(cfg).experts] == ["embed"] and adapter_config(cfg).shared is None


def test_router_aux_losses_is_not_a_second_knob_beside_train_aux_weights():
    with pytest.raises(ConfigError, match=r"router\.aux_losses \['load_balance'\] is not a setting: .*"
                                          r"weigh them with train\.aux_weights"):
        cfg_of(router={"aux_losses": ["load_balance"]})


def test_a_saved_config_loads_back_to_the_same_config(tmp_path):
    """What save_config writes (the resolved routing) is accepted as it stands: a run directory reloads."""
    cfg = cfg_of(train={"mode": "rank_only"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_every_shipped_config_loads(path, tmp_path):
    if os.path.basename(path).startswith("grid_"):  # a grid file (grid.py), not a training config
        import grid
        assert grid.load_grid(path).seeds
        return
    overrides = []
    if "extend" in config.read_yaml(path):
        # An extension reads its run's config.yaml, which a fresh clone does not have yet: give it the config.yaml
        # that its own from_run (`python train.py configs/tiny.yaml` -> ckpt/tiny) would write.
        run = tmp_path / "run"
        run.mkdir()
        tiny = asdict(load_config(os.path.join(REPO, "configs", "tiny.yaml")))
        (run / "config.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
        overrides = [f"--extend.from_run={run}"]
    cfg = load_config(path, overrides)
    assert cfg.router.kind in MODE_TABLE[cfg.train.mode].router_kinds


def _pre_mode_table_run_config(tmp_path, mode):
    """config.yaml as runs saved before the mode table wrote it: the router section's defaults (kind learned, the
    default task_experts), which that code ignored in the task-routed modes."""
    d = asdict(load_config(os.path.join(REPO, "configs", f"tiny_{mode}.yaml")))
    d["router"]["kind"] = "learned"
    d["router"]["task_experts"] = asdict(config.RouterConfig())["task_experts"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("mode", ["emb_only", "rank_only", "joint_single", "hard_switch", "hard_switch_shared"])
def test_a_run_saved_before_the_mode_table_loads_with_its_mode_routing(tmp_path, mode):
    cfg = config.load_run_config(_pre_mode_table_run_config(tmp_path, mode))
    assert cfg.router.kind == "task"
    assert cfg.router.task_experts == {t: list(v) for t, v in MODE_TABLE[mode].task_experts.items()}


def test_the_same_keys_in_a_users_yaml_stay_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"router\.kind 'learned' contradicts train\.mode 'rank_only'"):
        load_config(_pre_mode_table_run_config(tmp_path, "rank_only"))
