from __future__ import annotations

import pytest

from pipeline.config import config_from_dict, load_config
from pipeline.errors import ConfigError
from stages.cli import main


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("classifier: {epochs: 3}\nmaps: {scales: [1, 0.5]}\n")
    cfg = load_config(p, {"refine.threshold.fg": 0.4})
    assert cfg.classifier.epochs == 3 and cfg.maps.scales == [1.0, 0.5]
    assert cfg.refine.threshold.fg == 0.4
    assert cfg.section_hash("maps") != config_from_dict({}).section_hash("maps")
    assert cfg.section_hash("data") == config_from_dict({}).section_hash("data")


@pytest.mark.parametrize(("values", "message"), [
    ({"clasifier": {}}, "unknown config key 'clasifier'; did you mean 'classifier'?"),
    ({"maps": {"scale": [1.0]}}, "unknown config key 'maps.scale'; did you mean 'maps.scales'?"),
    ({"classifier": {"epochs": "ten"}}, "config key 'classifier.epochs': expected an integer, got 'ten'"),
    ({"data": {"kind": "cityscapes"}}, "config key 'data.kind': expected one of"),
    ({"maps": {"scales": [1, "x"]}}, "config key 'maps.scales[1]': expected a number"),
])
def test_invalid_config_errors(values, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(values)
    assert message in str(exc.value)


def test_cli_bad_config_is_one_line_error(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: " + str(tmp_path / "run") + "\nclassifier: {epoch: 3}\n")
    assert main(["train_classifier", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'classifier.epochs'" in err and "Traceback" not in err
