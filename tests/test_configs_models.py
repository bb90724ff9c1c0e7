"""Every shipped config loads and builds; the piano stack meets the paper's geometry."""
import pytest
import torch

from largewave.config import load_config
from largewave.models import ADALevel, Prior, WaveNetLevel, build_level, describe

torch.set_num_threads(1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["demo", "piano", "wavenet", "nsynth"])
def test_config_builds(name):
    cfg = load_config(name)
    for row in describe(cfg):
        lv = cfg.level(row["level"])
        assert row["params"] > 0
        assert row["receptive_field_tokens"] == lv.decoder.receptive_field()
        assert row["vocab"] == cfg.vocab(row["level"])


@pytest.mark.timeout(60)
def test_level_kinds():
    assert isinstance(build_level(load_config("wavenet"), "level1"), WaveNetLevel)
    nsynth = build_level(load_config("nsynth"), "level1")
    assert isinstance(nsynth, ADALevel) and not nsynth.discrete
    demo = load_config("demo")
    assert isinstance(build_level(demo, "prior"), Prior)
    l2 = build_level(demo, "level2")
    assert l2.vocab == demo.level("level1").quantiser.codes


@pytest.mark.timeout(60)
def test_piano_geometry():
    cfg = load_config("piano")
    assert cfg.level("level1").hop == 8 and cfg.level("level2").hop == 8
    assert cfg.input_rate("prior") == 16000 / 64
    prior_rf = cfg.level("prior").decoder.receptive_field()
    assert prior_rf >= 6144
    assert prior_rf / cfg.input_rate("prior") >= 24.0
    assert 1024 <= cfg.level("level1").quantiser.codes <= 4096


@pytest.mark.timeout(120)
def test_demo_levels_take_a_training_step():
    cfg = load_config("demo")
    for name in cfg.level_names():
        m = build_level(cfg, name).train()
        V = cfg.vocab(name)
        tokens = torch.randint(0, V, (2, cfg.level(name).train.crop))
        out = m.loss(tokens)
        out.loss.backward()
        assert torch.isfinite(out.loss)
