"""Home settings are validated once, where they are built: a bad settings.json is an error naming the file
and the key, before any reader sees a value it cannot use."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pydantic
import pytest

from app.home_folder import Home, HomeSettings
from dmad_core.errors import Invalid
from tests.loop_fixtures import run_cli


def _home_with(tmp_path: Path, text: str) -> Home:
    home = Home.at(tmp_path / "home")
    home.root.mkdir()
    home.settings_path.write_text(text)
    return home


def test_a_saved_home_reads_back_the_same(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "home")
    settings = HomeSettings(preset="paper", webhook_port=9001, defect_labels=("crack", "dent"), train_epochs=4,
                            feature_cache_max_bytes=None)
    home.save_settings(settings)
    assert home.load_settings() == settings
    assert Home.at(tmp_path / "nothing-there").load_settings() == HomeSettings()


@pytest.mark.parametrize(("text", "named"), [
    ('{"webhook_port": 70000}', "webhook_port: Input should be less than or equal to 65535 (got 70000)"),
    ('{"flase_alarm_rate": 0.05}', "flase_alarm_rate: unknown setting"),
    ('{"false_alarm_rate": 1.5}', "false_alarm_rate: Input should be less than 1"),
    ('{"preset": "fast"}', "preset: Value error, unknown preset 'fast'"),
    ('{"defect_labels": []}', "defect_labels: Tuple should have at least 1 item"),
    ('{"rerank_chunk_images": 0}', "rerank_chunk_images: Input should be greater than or equal to 1"),
    ('{"streamlit_port": "web"}', "streamlit_port: Input should be a valid integer"),
    ('["offline"]', "must hold a JSON object of settings, not list"),
    ('{"preset": "offline",', "is not valid JSON"),
])
def test_a_bad_settings_file_names_the_file_and_the_key(tmp_path: Path, text: str, named: str) -> None:
    home = _home_with(tmp_path, text)
    with pytest.raises(Invalid) as caught:
        home.load_settings()
    assert str(home.settings_path) in str(caught.value) and named in str(caught.value)


def test_every_bad_key_is_named_at_once(tmp_path: Path) -> None:
    home = _home_with(tmp_path, json.dumps({"train_epochs": 0, "webhook_port": -1, "preset": "paper"}))
    with pytest.raises(Invalid, match=r"train_epochs: .*; webhook_port: |webhook_port: .*; train_epochs: "):
        home.load_settings()


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(pydantic.ValidationError, match="label_studio_port"):
        replace(HomeSettings(), label_studio_port=0)
    assert replace(HomeSettings(), defect_labels=["a", "b"]).defect_labels == ("a", "b")  # JSON lists: tuples


def test_commands_refuse_a_bad_home_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = _home_with(tmp_path, '{"pool_score_versions_kept": 0}')
    assert run_cli("status", "--home", home.root) != 0
    err = capsys.readouterr().err
    assert "pool_score_versions_kept" in err and str(home.settings_path) in err


def test_init_names_bad_flags_by_the_settings_own_ranges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert run_cli("init", "--home", home, "--false-alarm-rate", "0", "--validation-fraction", "1.5") != 0
    err = capsys.readouterr().err
    assert "--false-alarm-rate: " in err and "(got 0.0)" in err and "--validation-fraction: " in err
    assert not home.exists()  # nothing written for a refused init
