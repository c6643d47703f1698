from pathlib import Path

import pytest

from shared.config import SERVICES, Config, describe
from shared.errors import InvalidArgument


def test_defaults_run_on_one_machine(monkeypatch):
    config = Config.from_env({})
    assert config.host == "127.0.0.1"
    assert [config.port(s) for s in SERVICES] == [50051, 50052, 50053, 50054]
    assert config.home == Path("~/.fastserve").expanduser()
    assert config.redis_url == ""


def test_environment_overrides_with_types():
    config = Config.from_env({"FASTSERVE_TRAINING_PORT": "6000", "FASTSERVE_GRACE_SECONDS": "2.5",
                              "FASTSERVE_HOME": "~/x", "FASTSERVE_AUTH_TOKEN": "t"})
    assert config.port("training") == 6000 and isinstance(config.port("training"), int)
    assert config.grace_seconds == 2.5
    assert config.home == Path("~/x").expanduser()
    assert config.auth_token == "t"


def test_bad_value_names_the_variable():
    with pytest.raises(InvalidArgument) as info:
        Config.from_env({"FASTSERVE_INFERENCE_PORT": "fifty"})
    assert info.value.violations[0].field == "FASTSERVE_INFERENCE_PORT"


def test_every_setting_is_documented_and_round_trips():
    rows = describe()
    assert all(env.startswith("FASTSERVE_") and doc for env, _, doc in rows)
    config = Config.from_env({"FASTSERVE_OPTIMIZATION_PORT": "7000"})
    assert Config.from_env(config.env()) == config


def test_unknown_service_refused():
    with pytest.raises(InvalidArgument):
        Config().port("nosuch")
