from pathlib import Path

import pytest

from fastserve.runtime.config import SERVICES, Config, describe
from fastserve.runtime.errors import InvalidArgument


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


def test_client_settings_read_the_same_variables_as_the_stack():
    from fastserve.client.settings import DEFAULT_PORTS, ClientSettings, SettingError

    env = {"FASTSERVE_HOST": "0.0.0.0", "FASTSERVE_TRAINING_PORT": "6001", "FASTSERVE_AUTH_TOKEN": "t",
           "FASTSERVE_TLS_CERT": "/c.pem", "FASTSERVE_MAX_MESSAGE_MB": "8"}
    settings, config = ClientSettings.from_env(env), Config.from_env(env)
    assert settings == config.client_settings() and settings.host == "127.0.0.1"  # a wildcard bind: loopback
    assert settings.ports["training"] == 6001 and settings.ports["inference"] == DEFAULT_PORTS["inference"]
    assert {s: Config().port(s) for s in SERVICES} == dict(DEFAULT_PORTS)  # one set of defaults
    with pytest.raises(SettingError) as info:
        ClientSettings.from_env({"FASTSERVE_INFERENCE_PORT": "abc"})
    assert info.value.name == "FASTSERVE_INFERENCE_PORT"
