"""Config loading: typed sections, overrides, and errors that name the file and the key."""
import pytest

from largewave.config import ConfigError, load_config, resolve_config_path


@pytest.mark.parametrize("name", ["demo"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.stack == name
    assert cfg.level_names()[0] == "level1"


def test_overrides_apply_with_and_without_levels_prefix():
    cfg = load_config("demo", ["level1.optim.lr=3e-4", "levels.level2.train.steps=7", "data.demo_minutes=1.5"])
    assert cfg.level("level1").optim.lr == pytest.approx(3e-4)
    assert cfg.level(2).train.steps == 7
    assert cfg.data.demo_minutes == 1.5


@pytest.mark.parametrize(
    "override, key",
    [
        ("level1.train.crop=1001", "levels.level1.train.crop"),  # not a multiple of the hop
        ("level1.quantiser.codes=1", "levels.level1.quantiser.codes"),  # K < 2
        ("level1.decoder.dilations=[]", "levels.level1.decoder.dilations"),  # empty schedule
        ("level1.decoder.stacks=0", "levels.level1.decoder.stacks"),
        ("level1.decoder.bogus=3", "levels.level1.decoder.bogus"),  # unknown key
        ("data.workers=many", "data.workers"),  # wrong type
        ("level1.quantiser.kind=pq", "levels.level1.quantiser.kind"),  # not a choice
        ("level1.train.zero_stage=4", "levels.level1.train.zero_stage"),
        ("audio.sample_rate=1.5e4x", "audio.sample_rate"),
    ],
)
def test_bad_values_name_the_key_and_file(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    msg = str(e.value)
    assert key in msg, msg
    assert "demo.yaml" in msg, msg


def test_unknown_top_level_key_in_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("stack: mine\nlevels: {level1: {kind: ada}}\ntrainig: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: trainig: unknown key"):
        load_config(p)


def test_level_order_is_checked(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("levels: {level2: {kind: ada}}\n")
    with pytest.raises(ConfigError, match=r"levels.level2"):
        load_config(p)


def test_missing_config_lists_known_ones():
    with pytest.raises(ConfigError, match="demo"):
        resolve_config_path("no-such-stack")


def test_derived_quantities():
    cfg = load_config("demo", ["level1.decoder.dilations=[1,2,4,8]", "level1.decoder.kernel_size=2",
                               "level1.decoder.input_kernel_size=1", "level1.train.micro_batch=3",
                               "level1.train.grad_accum=2"])
    d = cfg.derived("level1", world_size=4)
    assert d["receptive_field_tokens"] == 16  # (2-1)·(1+2+4+8) + 1
    assert d["receptive_field_ms"] == pytest.approx(1.0)
    assert d["effective_batch"] == 24
    assert d["code_rate_hz"] == pytest.approx(2000.0)
    d2 = cfg.derived("level2")
    assert d2["input_rate_hz"] == pytest.approx(2000.0)
    assert d2["hop_in_samples"] == 64
    assert cfg.vocab("level2") == cfg.level("level1").quantiser.codes
