from pathlib import Path

import pytest

from fastserve.runtime.config import SERVICES, Config, describe
from fastserve.runtime.errors import InvalidArgument
from tests.support.rpc import field_of


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
    assert field_of(info.value) == "FASTSERVE_INFERENCE_PORT"


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


@pytest.mark.parametrize("env, value", [
    ("FASTSERVE_GRACE_SECONDS", "nan"),
    ("FASTSERVE_GRACE_SECONDS", "inf"),
    ("FASTSERVE_MAX_MESSAGE_MB", "-1"),
    ("FASTSERVE_MAX_MESSAGE_MB", "4096"),  # over gRPC's 2 GiB limit
    ("FASTSERVE_JOB_LEASE_SECONDS", "0"),
    ("FASTSERVE_GRPC_THREADS", "0"),
    ("FASTSERVE_INFERENCE_PORT", "70000"),
    ("FASTSERVE_WORKER_MEMORY_GB", "-inf"),
    ("FASTSERVE_INFERENCE_MAX_MODELS", "0"),
    ("FASTSERVE_INFERENCE_MAX_MODELS", "1025"),
    ("FASTSERVE_INFERENCE_KV_CACHE_GB", "0"),
    ("FASTSERVE_INFERENCE_KV_CACHE_GB", "nan"),
    ("FASTSERVE_IMPORT_MAX_GB", "0"),
    ("FASTSERVE_IMPORT_MAX_GB", "5000"),
    ("FASTSERVE_IMPORT_MAX_GB", "inf"),
])
def test_out_of_range_setting_names_the_variable(env, value):
    with pytest.raises(InvalidArgument) as info:
        Config.from_env({env: value})
    assert field_of(info.value) == env and env in info.value.message


def test_every_numeric_setting_has_a_range_its_default_is_in():
    import dataclasses

    for f in dataclasses.fields(Config):
        if f.type in ("int", "float"):
            low, high = f.metadata["bounds"]
            assert low <= f.default <= high, f.name
    assert Config.from_env({}).inference_max_models == 16
    assert Config.from_env({"FASTSERVE_INFERENCE_MAX_MODELS": "1024", "FASTSERVE_TRAINING_METRICS_PORT": "0",
                            "FASTSERVE_GRACE_SECONDS": "0"}).inference_max_models == 1024


@pytest.mark.parametrize("env, named", [
    ({"FASTSERVE_TLS_KEY": "/k.pem"}, "FASTSERVE_TLS_KEY"),
    ({"FASTSERVE_TLS_CLIENT_CA": "/ca.pem"}, "FASTSERVE_TLS_CLIENT_CA"),
    ({"FASTSERVE_TLS_KEY": "/k.pem", "FASTSERVE_TLS_CLIENT_CA": "/ca.pem"}, "FASTSERVE_TLS_KEY"),
])
def test_tls_key_or_client_ca_without_certificate_is_refused(env, named):
    with pytest.raises(InvalidArgument) as info:
        Config.from_env(env)
    assert field_of(info.value) == named
    assert named in info.value.message and "FASTSERVE_TLS_CERT" in info.value.message


def test_server_tls_is_all_or_nothing(tmp_path):
    assert Config.from_env({}).server_tls() is None
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"CERT")
    key.write_bytes(b"KEY")
    # A certificate alone is what a client trusts, so it loads; a server refuses it.
    client_side = Config.from_env({"FASTSERVE_TLS_CERT": str(cert)})
    with pytest.raises(InvalidArgument) as info:
        client_side.server_tls()
    assert field_of(info.value) == "FASTSERVE_TLS_KEY" and "FASTSERVE_TLS_CERT" in info.value.message
    missing = Config.from_env({"FASTSERVE_TLS_CERT": str(cert), "FASTSERVE_TLS_KEY": str(key),
                               "FASTSERVE_TLS_CLIENT_CA": str(tmp_path / "none.pem")})
    with pytest.raises(InvalidArgument) as info:
        missing.server_tls()
    assert field_of(info.value) == "FASTSERVE_TLS_CLIENT_CA"
    both = Config.from_env({"FASTSERVE_TLS_CERT": str(cert), "FASTSERVE_TLS_KEY": str(key)})
    assert both.server_tls() == (b"KEY", b"CERT", None)


def test_import_settings_parse():
    config = Config.from_env({"FASTSERVE_IMPORT_ROOTS": "/srv/models:/data/hf", "FASTSERVE_IMPORT_MAX_GB": "0.5"})
    assert (config.import_roots, config.import_max_gb) == ("/srv/models:/data/hf", 0.5)
    assert Config.from_env({}).import_roots == "" and Config.from_env({}).import_max_gb == 64.0
