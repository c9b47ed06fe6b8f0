"""The YAML config file (beluga/settings.py): the same fields as the flags, below the flags
and the environment, above the defaults; a bad file is a ConfigFileError naming the file and
the field or line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from beluga.settings import MAX_CONFIG_BYTES, ConfigFileError, Settings
from beluga_cli.cli import GATEWAY_FIELDS, build_parser, settings_from_args
from beluga_cli.up import settings_env


def write(folder: Path, text: str | bytes, name: str = "beluga.yaml") -> Path:
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, "gateway_port: 9001\nrouting_policy: least_loaded\n"
                   "enforce_eager: false\nmax_attempts: 5\nstate_dir: /srv/beluga\n")
    monkeypatch.setenv("BELUGA_GATEWAY_PORT", "9002")
    monkeypatch.setenv("BELUGA_ROUTING_POLICY", "round_robin")
    args = build_parser().parse_args(["gateway", "--config", str(config),
                                      "--gateway-port", "9003"])
    s = settings_from_args(args, GATEWAY_FIELDS)
    assert s.gateway_port == 9003                     # flag over environment and file
    assert s.routing_policy == "round_robin"          # environment over file
    assert s.max_attempts == 5 and s.enforce_eager is False  # file over defaults
    assert s.state_dir == Path("/srv/beluga")
    assert s.gateway_host == "0.0.0.0"                # default: set nowhere
    monkeypatch.delenv("BELUGA_GATEWAY_PORT")
    assert Settings(config=config).gateway_port == 9001


def test_the_environment_can_name_the_file(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELUGA_CONFIG", str(write(tmp_path, "served_model_name: from-file\n")))
    assert Settings().served_model_name == "from-file"
    other = write(tmp_path, "served_model_name: other\n", "other.yaml")
    assert Settings(config=other).served_model_name == "other"  # the flag's file wins


def test_an_empty_file_sets_nothing(tmp_path: Path) -> None:
    for text in ("", "# nothing yet\n"):
        path = write(tmp_path, text)
        assert Settings(config=path) == Settings().model_copy(update={"config": path})


def test_every_setting_of_the_file_reaches_the_processes_beluga_up_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(config=write(tmp_path, "gateway_port: 9300\nvllm_extra_args: --seed 3\n"
                                     "api_keys: k1:t1\n"))
    env = settings_env(original)
    assert "BELUGA_CONFIG" not in env  # every setting travels on its own
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == original.model_copy(update={"config": None})


@pytest.mark.parametrize(("text", "names"), [
    ("gateway_port: 70000\n", ["gateway_port", "less than or equal to 65535", "70000"]),
    ("gateway-port: 9000\n", ["'gateway-port' is not a setting", "did you mean gateway_port"]),
    ("no_such_thing: 1\n", ["'no_such_thing' is not a setting"]),
    ("routing_policy: fastest\n", ["routing_policy", "pool_aware", "fastest"]),
    ("enforce_eager: perhaps\n", ["enforce_eager", "boolean"]),
    ("served_model_name: [a, b]\n", ["served_model_name", "string"]),
    ("gateway_port: 9000\ngateway_port: 9001\n", ["line 2", "'gateway_port' is set twice"]),
    ("gateway_port: [9000\n", ["not valid YAML", "line 2"]),
    ("- gateway_port\n", ["must be a mapping", "not a list"]),
    ("just text\n", ["must be a mapping", "not a str"]),
    ("1: 2\n", ["1 is not a setting's name"]),
    ("config: other.yaml\n", ["config", "cannot name another"]),
    ("state_dir: !!python/object/apply:os.system ['true']\n", ["not valid YAML", "line 1"]),
    (b"served_model_name: \xff\xfe\n", ["not UTF-8"]),
])
def test_a_bad_file_is_one_error_naming_the_file_and_the_field(
        tmp_path: Path, text: str | bytes, names: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as err:
        Settings(config=path)
    message = str(err.value)
    assert message.startswith(f"config file {path}: ")
    for name in names:
        assert name in message, message


def test_a_missing_or_huge_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read it: No such file"):
        Settings(config=tmp_path / "absent.yaml")
    with pytest.raises(ConfigFileError, match="cannot read it"):
        Settings(config=tmp_path)  # a folder
    huge = write(tmp_path, "# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigFileError, match="larger than"):
        Settings(config=huge)


def test_a_deeply_nested_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="nested too deeply"):
        Settings(config=write(tmp_path, "served_model_name: " + "[" * 50_000 + "]" * 50_000))


def test_a_bad_secret_is_named_but_never_quoted(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError) as err:
        Settings(config=write(tmp_path, "server_secret: [hunter2-secret]\n"))
    assert "server_secret" in str(err.value) and "hunter2" not in str(err.value)


def test_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    # "billion laughs": 7 lines of nested aliases would expand to 10^7 strings (seconds and
    # gigabytes); refused at the first alias, and no structure is quoted in an error
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"{name}: &{name} [{','.join(['*' + prev] * 10)}]")
    levels.append("gateway_port: *g")
    started = time.monotonic()
    with pytest.raises(ConfigFileError, match="aliases"):
        Settings(config=write(tmp_path, "\n".join(levels) + "\n"))
    assert time.monotonic() - started < 1.0
    with pytest.raises(ConfigFileError) as err:
        Settings(config=write(tmp_path, "gateway_port: [" + ", ".join(["1"] * 1000) + "]\n"))
    assert "(got a list)" in str(err.value)
