"""Tests of config.toml loading: defaults, paths, error messages and secrets."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ptdaemon.config import Secret, default_config, load_config, parse_listen
from ptdaemon.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = """
[[templates]]
name = "drop"
method = "FILE"
target = { directory = "./drop" }
"""


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> str:
    """Load text that must fail; return the message after the file name."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message

    return message.removeprefix(f"{path}: ")


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    config = default_config()

    assert config.config_path is None
    assert config.base_dir == tmp_path
    assert config.state_path == tmp_path / "ptdaemon-data"
    assert config.daemon.log_level == "info"
    assert config.daemon.log_format == "text"
    assert config.daemon.shutdown_grace_seconds == 30
    assert config.api.parse_listen() == ("127.0.0.1", 8425)
    assert config.api.max_body_bytes == 1048576
    assert config.api.rate_per_second == 50
    assert config.api.rate_burst == 100
    assert config.api.metrics_public is False
    assert config.dispatch.concurrency == 100
    assert config.dispatch.per_host_concurrency == 10
    assert config.dispatch.timeout_seconds == 30
    assert config.dispatch.heap_window == 10000
    assert config.file_root_paths == []
    assert config.limits.templates_per_user == 1000
    assert config.smtp.port == 25
    assert config.smtp.tls == "none"
    assert config.smtp.from_address == "ptdaemon@localhost"
    assert config.smtp_password is None
    assert config.smtp_ca_path is None
    assert config.security.networks() == []
    assert config.retention.finished_days == 30
    assert config.templates == []


def test_empty_file_gives_defaults_beside_it(tmp_path):
    config = load_config(write(tmp_path / "etc", ""))

    assert config.config_path == tmp_path / "etc" / "config.toml"
    assert config.base_dir == tmp_path / "etc"
    assert config.state_path == tmp_path / "etc" / "ptdaemon-data"
    assert config.limits.unfinished_per_user == 1000000


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, ""))

    with pytest.raises(AttributeError):
        config.api = config.api  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "ca.pem").write_text("pem")
    text = """
    [daemon]
    state_dir = "data"
    [api]
    listen = "unix:run/api.sock"
    [dispatch]
    file_roots = ["./drop", "/srv/abs"]
    [smtp]
    ca_file = "ca.pem"
    """

    write(etc, text)

    config = load_config(Path("..") / "etc" / "config.toml")

    assert config.base_dir == etc
    assert config.state_path == etc / "data"
    assert config.file_root_paths == [etc / "drop", Path("/srv/abs")]
    assert config.smtp_ca_path == etc / "ca.pem"
    assert config.api.parse_listen() == str(etc / "run" / "api.sock")
    assert config.resolve_path("./drop") == etc / "drop"


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.toml"

    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(path)


def test_bad_toml_names_file_and_position(tmp_path):
    message = load_error(tmp_path, "[api\nlisten = 1\n")

    assert "line 1" in message


def test_unknown_top_level_key(tmp_path):
    assert load_error(tmp_path, "nope = 1\n") == "unknown key nope"


def test_unknown_section(tmp_path):
    assert load_error(tmp_path, "[bogus]\n") == "unknown key bogus"


def test_unknown_key_in_section(tmp_path):
    assert load_error(tmp_path, "[api]\nfoo = 1\n") == "unknown key api.foo"


def test_derived_field_is_not_a_key(tmp_path):
    assert load_error(tmp_path, 'base_dir = "/"\n') == "unknown key base_dir"


def test_unknown_key_in_template(tmp_path):
    message = load_error(tmp_path, TEMPLATE + "colour = 1\n")

    assert message == "unknown key templates[0].colour"


def test_unknown_key_in_template_target(tmp_path):
    text = TEMPLATE.replace('"./drop"', '"./drop", colour = 1')

    assert load_error(tmp_path, text) == "unknown key templates[0].target.colour"


def test_missing_template_key(tmp_path):
    text = '[[templates]]\nmethod = "FILE"\ntarget = {directory = "d"}\n'

    assert load_error(tmp_path, text) == "templates[0].name: missing required key"


def test_missing_target_key(tmp_path):
    text = TEMPLATE.replace('directory = "./drop"', 'filename = "x"')

    message = load_error(tmp_path, text)

    assert message == "templates[0].target.directory: missing required key"


def test_bad_template_value_names_index(tmp_path):
    text = TEMPLATE + TEMPLATE.replace('"drop"', '"two"') + "max_retries = 500\n"

    assert load_error(tmp_path, text) == "templates[1].max_retries: expected int <= 100"


def test_duplicate_template_names(tmp_path):
    message = load_error(tmp_path, TEMPLATE + TEMPLATE)

    assert message == "templates[1].name: duplicate template name 'drop'"


def test_wrong_type_is_named(tmp_path):
    message = load_error(tmp_path, '[dispatch]\nconcurrency = "many"\n')

    assert message == "dispatch.concurrency: expected int, got str"


def test_wrong_type_for_a_table(tmp_path):
    assert load_error(tmp_path, "api = 3\n") == "api: expected table, got int"


def test_value_out_of_range_is_named(tmp_path):
    message = load_error(tmp_path, "[dispatch]\nheap_window = 10\n")

    assert message == "dispatch.heap_window: expected int >= 100"


def test_bad_choice_lists_the_choices(tmp_path):
    message = load_error(tmp_path, '[daemon]\nlog_level = "loud"\n')

    expected = "invalid value 'loud', expected one of debug, info, warning, error"
    assert message == f"daemon.log_level: {expected}"


def test_smtp_from_key(tmp_path):
    config = load_config(write(tmp_path, '[smtp]\nfrom = "forms@example.org"\n'))

    assert config.smtp.from_address == "forms@example.org"
    assert config.summary()["smtp"]["from"] == "forms@example.org"


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8425", ("127.0.0.1", 8425)),
        ("[::1]:8425", ("::1", 8425)),
        ("localhost:80", ("localhost", 80)),
        ("localhost:0", ("localhost", 0)),
        ("unix:/run/ptdaemon/api.sock", "/run/ptdaemon/api.sock"),
    ],
)
def test_good_listen(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen",
    [
        "localhost",
        "127.0.0.1:",
        ":8425",
        "127.0.0.1:99999",
        "127.0.0.1:http",
        "::1:8425",
        "[nope]:8425",
        "bad host:1",
        "unix:",
        "unix:/" + "x" * 200,
    ],
)
def test_bad_listen_is_named(tmp_path, listen):
    message = load_error(tmp_path, f"[api]\nlisten = {listen!r}\n")

    assert message.startswith("api.listen: ")


def test_networks_accept_host_bits(tmp_path):
    text = '[security]\nallow_networks = ["10.0.0.1/8", "::1"]\n'

    config = load_config(write(tmp_path, text))

    networks = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")]
    assert config.security.networks() == networks


def test_bad_network_is_named(tmp_path):
    text = '[security]\nallow_networks = ["10.0.0.0/8", "10.0.0.0/33"]\n'

    message = load_error(tmp_path, text)

    assert message == "security.allow_networks[1]: not an IP network: '10.0.0.0/33'"


def test_password_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PTD_TEST_SMTP", "hunter2-env")

    config = load_config(write(tmp_path, '[smtp]\npassword_env = "PTD_TEST_SMTP"\n'))

    assert config.smtp_password is not None
    assert config.smtp_password.reveal() == "hunter2-env"
    for text in (repr(config), str(config), repr(config.smtp), str(config.summary())):
        assert "hunter2" not in text
    assert repr(config.smtp_password) == "***"
    assert f"{config.smtp_password}" == "***"


def test_unset_password_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("PTD_TEST_SMTP", raising=False)

    message = load_error(tmp_path, '[smtp]\npassword_env = "PTD_TEST_SMTP"\n')

    assert message.startswith("smtp.password_env: ")
    assert "PTD_TEST_SMTP" in message


def test_password_from_file_strips_one_newline(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "smtp").write_text("hunter2-file\n\n")

    config = load_config(write(tmp_path, '[smtp]\npassword_file = "secrets/smtp"\n'))

    assert config.smtp_password == Secret("hunter2-file\n")
    assert "hunter2" not in repr(config)


def test_missing_password_file_is_named(tmp_path):
    message = load_error(tmp_path, '[smtp]\npassword_file = "nope"\n')

    assert message.startswith("smtp.password_file: cannot read")


def test_password_env_and_file_together_refused(tmp_path):
    text = '[smtp]\npassword_env = "A"\npassword_file = "b"\n'

    assert load_error(tmp_path, text).startswith("smtp.password_env: ")


def test_missing_ca_file_is_named(tmp_path):
    message = load_error(tmp_path, '[smtp]\nca_file = "ca.pem"\n')

    assert message.startswith("smtp.ca_file: ")


def test_template_secrets_stay_out_of_repr(tmp_path):
    text = """
    [[templates]]
    name = "api"
    method = "API"
    signing_secret = "sig-456"
    [templates.target]
    url = "https://example.org/"
    auth = { type = "bearer", token = "tok-123" }
    """

    config = load_config(write(tmp_path, text))

    assert config.template_names() == ["api"]
    assert config.templates[0]["signing_secret"] == "sig-456"
    for text in (repr(config), str(config.summary())):
        assert "tok-123" not in text
        assert "sig-456" not in text


def test_example_config_loads():
    config = load_config(REPO / "config.toml")

    assert config.state_path == REPO / "ptdaemon-data"
    assert config.api.parse_listen() == ("127.0.0.1", 8425)
    assert config.file_root_paths == [REPO / "drop"]
    assert config.template_names() == ["quickstart-drop"]
    template = config.templates[0]
    assert template["method"] == "FILE"
    assert config.resolve_path(template["target"]["directory"]) == REPO / "drop"
    assert template["field_map"] == {
        "applicant": "full_name",
        "zip": "address.postcode",
    }
    assert template["required_fields"] == ["full_name"]
