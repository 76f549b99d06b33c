"""`quantlab gate` proven both ways on the tiny model: pass, tolerance failure, regression, user errors."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from quantlab.cli import main


@pytest.fixture
def gate_config(tiny_run: tuple[Path, Path]) -> Path:
    return tiny_run[1]


def _gate(config: Path, *extra: str) -> int:
    return main(["gate", "--config", str(config), *extra])


def test_passing_gate_writes_json_and_junit(gate_config: Path, capsys: pytest.CaptureFixture) -> None:
    assert _gate(gate_config) == 0
    out = capsys.readouterr().out
    assert "quantlab gate PASS" in out
    run = gate_config.parent / "reports" / "tiny"
    data = json.loads((run / "gate.json").read_text())
    assert data["ok"] is True and data["engines"] and all(c["ok"] for c in data["checks"])
    suite = ET.parse(run / "gate.junit.xml").getroot()
    assert suite.tag == "testsuites" and suite.get("failures") == "0" and int(suite.get("tests")) >= 1
    assert len(suite.findall(".//testcase")) == int(suite.get("tests"))


def test_impossible_tolerance_fails_with_an_explanation(gate_config: Path, capsys: pytest.CaptureFixture) -> None:
    gate_config.write_text(gate_config.read_text().replace("top1_agreement = 0.5", "top1_agreement = { min = 1.01 }"))
    assert _gate(gate_config) == 1
    out = capsys.readouterr().out
    assert "quantlab gate FAIL" in out and "below the floor 1.01" in out
    assert "most sensitive layers" in out  # which layers hurt
    run = gate_config.parent / "reports" / "tiny"
    suite = ET.parse(run / "gate.junit.xml").getroot()
    assert suite.get("failures") == "1" and suite.find(".//failure") is not None


def test_regression_against_the_baseline_fails(gate_config: Path, capsys: pytest.CaptureFixture) -> None:
    assert _gate(gate_config, "--update-baseline") == 0
    baseline = gate_config.parent / "baseline.json"
    stored = json.loads(baseline.read_text())
    run = str(gate_config.parent / "reports" / "tiny")
    assert _gate(gate_config, "--run", run) == 0  # unchanged results: no regression
    engine = next(iter(stored["engines"]))
    stored["engines"][engine]["top1_agreement"] += 0.1  # the baseline was better than today
    baseline.write_text(json.dumps(stored))
    capsys.readouterr()
    assert _gate(gate_config, "--run", run) == 1
    out = capsys.readouterr().out
    assert "regression top1_agreement" in out and "0.1000 worse" in out


def test_broken_config_and_foreign_baseline_are_user_errors(gate_config: Path, capsys: pytest.CaptureFixture) -> None:
    broken = gate_config.parent / "broken.toml"
    broken.write_text(gate_config.read_text().replace("regression = 0.0", "regression = -1"))
    assert _gate(broken) == 2
    assert "gate.regression must be >= 0" in capsys.readouterr().err
    baseline = gate_config.parent / "baseline.json"
    baseline.write_text(json.dumps({"format": 1, "model": "other", "model_sha256": "0" * 64, "engines": {}}))
    assert _gate(gate_config) == 2
    err = capsys.readouterr().err
    assert "recorded for another model" in err and err.count("\n") == 1
    unknown = gate_config.parent / "unknown.toml"
    unknown.write_text(gate_config.read_text().replace("top1_agreement = 0.5", "bleu = 0.5"))
    assert _gate(unknown) == 2
    assert "tolerance on bleu" in capsys.readouterr().err
