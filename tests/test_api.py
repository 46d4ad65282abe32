"""Public names, the backend registry and its errors."""

from __future__ import annotations

import types

import pytest

import aioaccel
from aioaccel import backends


def test_all_matches_the_public_names() -> None:
    public = {n for n, v in vars(aioaccel).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert set(aioaccel.__all__) == public
    for name in aioaccel.__all__:
        assert getattr(aioaccel, name) is not None


def test_error_tree() -> None:
    for err in (aioaccel.InferenceError, aioaccel.InputError, aioaccel.DeviceError,
                aioaccel.DeviceTimeout, aioaccel.RunnerClosed, aioaccel.WouldBlock,
                aioaccel.BackendUnavailable, aioaccel.InferTimeout):
        assert issubclass(err, aioaccel.AccelError)
    assert issubclass(aioaccel.InputError, ValueError)
    assert issubclass(aioaccel.DeviceTimeout, aioaccel.DeviceError)
    assert issubclass(aioaccel.InferTimeout, TimeoutError)


def test_callables_and_stages_open_with_the_function_backend() -> None:
    assert backends.resolve_backend(len) == "function"
    assert backends.resolve_backend([len, abs]) == "function"
    assert "function" in aioaccel.available_backends()


def test_unknown_file_type_names_what_is_known() -> None:
    with pytest.raises(ValueError, match=r"unknown file type '\.pt'"):
        aioaccel.open("model.pt")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.get_backend("nope")
    with pytest.raises(TypeError, match="cannot open int"):
        aioaccel.open(42)
    with pytest.raises(ValueError, match="non-empty"):
        aioaccel.open([])


def test_missing_runtime_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = backends.Backend("fakert", "no_such_module", (".fake",), ("no_such_runtime",),
                            "pip install 'aioaccel[fakert]'")
    monkeypatch.setitem(backends.BACKENDS, "fakert", fake)
    with pytest.raises(aioaccel.BackendUnavailable, match=r"pip install 'aioaccel\[fakert\]'"):
        backends.get_backend("fakert")
    assert "fakert" not in aioaccel.available_backends()
    assert backends.resolve_backend("m.fake") == "fakert"


def test_bad_arguments_are_rejected_at_open() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        aioaccel.open(len, maxsize=0)
    with pytest.raises(ValueError, match="replicas"):
        aioaccel.open(len, replicas=0)
    with pytest.raises(ValueError, match="call_timeout"):
        aioaccel.open(len, call_timeout=-1)


@pytest.mark.anyio
async def test_function_backend_rejects_options() -> None:
    with pytest.raises(TypeError, match="takes no options, got bogus"):
        async with aioaccel.open(len, bogus=1):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("module,suffix,extra", [
    ("onnxruntime", ".onnx", "onnx"),
    ("openvino", ".xml", "openvino"),
    ("ai_edge_litert.interpreter", ".tflite", "litert"),
])
async def test_a_missing_runtime_names_the_extra_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object, module: str, suffix: str,
        extra: str) -> None:
    from pathlib import Path

    monkeypatch.setitem(__import__("sys").modules, module, None)  # import now fails
    monkeypatch.setitem(__import__("sys").modules, "tflite_runtime.interpreter", None)
    path = Path(str(tmp_path)) / f"model{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(aioaccel.BackendUnavailable, match=rf"pip install 'aioaccel\[{extra}\]'"):
        async with aioaccel.open(path):
            pass
