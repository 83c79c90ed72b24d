"""Settings: defaults, RNNSERVE_* variables and flags, in that order of precedence, checked on entry."""

import dataclasses
from pathlib import Path

import pytest

from rnnserve.server.model.runtime import session_options
from rnnserve.server.settings import Settings, build_parser, parse_settings


def test_defaults_need_no_flags_and_no_environment():
    assert parse_settings([], {}) == Settings()


def test_environment_sets_and_flags_override():
    environ = {"RNNSERVE_MAX_SESSIONS": "12", "RNNSERVE_LISTEN": "0.0.0.0:9000", "RNNSERVE_BUNDLE": "/models/x"}
    settings = parse_settings(["--max-sessions", "7"], environ)
    assert settings.max_sessions == 7
    assert settings.listen == "0.0.0.0:9000"
    assert settings.bundle == Path("/models/x")
    assert settings.max_sessions_per_identity == 0  # no cap unless asked for
    assert parse_settings([], {"RNNSERVE_MAX_SESSIONS_PER_IDENTITY": "3"}).max_sessions_per_identity == 3


def test_every_field_has_a_flag_an_environment_twin_and_help():
    help_text = build_parser().format_help()
    for settings_field in dataclasses.fields(Settings):
        assert "--" + settings_field.name.replace("_", "-") in help_text
        assert len(settings_field.metadata["help"]) > 20
    assert "RNNSERVE_" in help_text


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--max-batch-size", "0"], {}, "max_batch_size must be at least 1"),
    (["--max-sessions-per-identity", "-1"], {}, "max_sessions_per_identity must be at least 0"),
    (["--default-ttl-seconds", "100", "--max-ttl-seconds", "10"], {}, "exceeds max_ttl_seconds"),
    ([], {"RNNSERVE_MAX_SESSIONS": "many"}, "RNNSERVE_MAX_SESSIONS"),
    ([], {"RNNSERVE_WHEN_FULL": "panic"}, "when_full must be one of"),
    (["--ort-spinning", "sometimes"], {}, "--ort-spinning: invalid choice"),
    ([], {"RNNSERVE_TLS_CERT": "server.pem"}, "tls_cert and tls_key go together"),
    (["--tls-client-ca", "ca.pem"], {}, "tls_client_ca (mutual TLS) needs tls_cert"),
])
def test_bad_values_exit_with_a_message_naming_them(argv, environ, message, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, environ)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("value", "spins"), [("on", "1"), ("off", "0")])
def test_ort_spinning_reaches_onnxruntime(value, spins):
    settings = parse_settings([], {"RNNSERVE_ORT_SPINNING": value})
    options = session_options(settings.ort_threads, settings.ort_spins)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spins
