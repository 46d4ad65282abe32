"""Device discovery: what the installed runtimes report, and what to install for the rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import aioaccel
from aioaccel.testing.coral import simulate_coral
from aioaccel.testing.memryx import simulate_memryx, write_dfp
from aioaccel.testing.models import dense_chain

pytestmark = pytest.mark.anyio
devices_module = sys.modules["aioaccel.devices"]  # aioaccel.devices is the function


def by_backend(found: list[aioaccel.Device]) -> dict[str, list[aioaccel.Device]]:
    out: dict[str, list[aioaccel.Device]] = {}
    for d in found:
        out.setdefault(d.backend, []).append(d)
    return out


def test_cpu_runtimes_are_listed_and_missing_ones_say_what_to_install() -> None:
    found = by_backend(aioaccel.devices())
    assert found["litert"][0].available and found["litert"][0].device == "cpu"
    assert any(d.device == "CPUExecutionProvider" for d in found["onnx"])
    assert any(d.device == "CPU" and d.available for d in found["openvino"])
    for backend, hint in (("coral", "coral.ai"), ("memryx", "memryx.com")):
        if backend in aioaccel.available_backends():
            continue
        (entry,) = found[backend]
        assert not entry.available and hint in (entry.install or "")


async def test_edge_tpus_come_from_list_edge_tpus_and_open_as_listed(tmp_path: Path) -> None:
    chain = dense_chain(8, 2)
    with simulate_coral(tpus=["usb", "pci"]):
        tpus = by_backend(aioaccel.devices())["coral"]
        assert [d.device for d in tpus] == [":0", ":1"]
        assert "usb" in tpus[0].description and "/dev/apex_1" in tpus[1].description
        path = chain.write_tflite(tmp_path / "m.tflite")
        async with aioaccel.open(path, **tpus[1].options) as runner:
            x = chain.random_input()
            out = await runner.infer(x)
        assert out["output"].shape == chain.output_shape
    with simulate_coral(tpus=[]):
        (none,) = by_backend(aioaccel.devices())["coral"]
        assert not none.available and "no Edge TPU" in none.description


async def test_memryx_groups_from_device_nodes(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices_module.glob, "glob", lambda pattern: ["/dev/memx0"])
    chain = dense_chain(8, 2)
    with simulate_memryx():
        (group,) = by_backend(aioaccel.devices())["memryx"]
        assert group.available and group.options == {"backend": "memryx", "group_id": 0}
        async with aioaccel.open(write_dfp(tmp_path / "m.dfp", chain), **group.options) as r:
            assert (await r.infer(chain.random_input()))["output"].shape == chain.output_shape
    monkeypatch.setattr(devices_module.glob, "glob", lambda pattern: [])
    with simulate_memryx():
        (none,) = by_backend(aioaccel.devices())["memryx"]
        assert not none.available and "/dev/memx" in none.description


def test_a_runtime_that_fails_to_answer_is_reported_not_raised(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[aioaccel.Device]:
        raise RuntimeError("plugin crashed")

    monkeypatch.setitem(devices_module._PROBES, "openvino", broken)
    (entry,) = by_backend(aioaccel.devices())["openvino"]
    assert not entry.available and "plugin crashed" in entry.description


def test_cli_devices_for_people_and_programs() -> None:
    run = [sys.executable, "-W", "error", "-m", "aioaccel.cli", "devices"]
    human = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert human.returncode == 0, human.stderr
    assert "litert" in human.stdout and "ready" in human.stdout
    machine = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=120)
    assert machine.returncode == 0, machine.stderr
    listed = json.loads(machine.stdout)
    assert {"backend", "device", "description", "available", "install", "options"} <= set(
        listed[0])
    assert any(d["backend"] == "litert" and d["available"] for d in listed)
