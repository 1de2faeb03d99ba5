"""Settings: env prefix, TOML file, validation errors that name the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adaspec.core.config import Settings, load_settings, settings_table
from adaspec.core.errors import ConfigError


def test_env_prefix_and_overrides(monkeypatch):
    monkeypatch.setenv("ADASPEC_LOOKAHEAD", "9")
    monkeypatch.setenv("ADASPEC_TEMPERATURE", "0.7")
    s = load_settings()
    assert s.lookahead == 9 and s.temperature == 0.7
    assert load_settings(lookahead=3).lookahead == 3  # explicit beats env


def test_toml_file(tmp_path, monkeypatch):
    f = tmp_path / "a.toml"
    f.write_text('lookahead = 5\ndrafter = "none"\n')
    s = load_settings(f)
    assert s.lookahead == 5 and s.drafter == "none"
    monkeypatch.setenv("ADASPEC_LOOKAHEAD", "7")
    assert load_settings(f).lookahead == 7  # env beats file


@pytest.mark.parametrize(
    "field,value",
    [("lookahead", -1), ("temperature", -0.5), ("top_p", 0.0), ("batch_size", 0), ("device", "tpu"),
     ("compact_holes_ratio", 2.0)],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError) as exc:
        load_settings(**{field: value})
    assert field in str(exc.value) and f"ADASPEC_{field.upper()}" in str(exc.value)


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("ADASPEC_BATCH_SIZE", "many")
    with pytest.raises(ConfigError, match="batch_size"):
        load_settings()


def test_unknown_key_in_toml(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text("lookahed = 5\n")
    with pytest.raises(ConfigError, match="lookahed"):
        load_settings(f)


def test_ngram_order_validated():
    with pytest.raises(ConfigError, match="prompt_lookup_max_ngram"):
        load_settings(prompt_lookup_min_ngram=4, prompt_lookup_max_ngram=2)


def test_every_knob_documented():
    rows = settings_table()
    assert {r[0] for r in rows} == set(Settings.model_fields)
    assert all(r[2] for r in rows), "every setting needs a description"


def test_cli_bad_config_is_clean_error(tmp_path):
    env = {"ADASPEC_LOOKAHEAD": "-3", "PATH": "", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "adaspec.core.cli", "config"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    assert "lookahead" in proc.stderr and "Traceback" not in proc.stderr
