"""What this machine can run on: ``aioaccel.devices()`` and ``aioaccel devices [--json]``.

One :class:`Device` per device each installed runtime reports -- Edge TPUs through pycoral's
``list_edge_tpus``, OpenVINO's ``Core().available_devices``, MemryX chip groups, the CPU
runtimes -- and, for each runtime that is missing or finds no device, one entry with
``available=False`` saying what to install. Probing never raises: a runtime that fails to
answer is reported with its error.
"""

from __future__ import annotations

import glob
import importlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ._callable_module import make_callable
from .backends import BACKENDS
from .errors import BackendUnavailable

__all__ = ["Device", "devices"]


@dataclass(frozen=True)
class Device:
    backend: str                 #: the ``backend=`` that drives it
    device: str | None           #: the ``device=`` (or ``group_id=``) to pass; None: n/a
    description: str
    available: bool = True
    install: str | None = None   #: what to install, when not available
    options: dict[str, Any] = field(default_factory=dict)  #: open() options that select it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return "?"
    return str(getattr(mod, "__version__", "?"))


def _missing(backend: str, what: str) -> Device:
    return Device(backend, None, what, available=False, install=BACKENDS[backend].install)


def _litert() -> list[Device]:
    from .backends.litert import interpreter_module, interpreter_name

    # ai_edge_litert, else tflite_runtime (what pycoral builds its interpreters with)
    name = interpreter_name(interpreter_module())
    return [Device("litert", "cpu", f"LiteRT ({name} interpreter) on the CPU "
                   f"({os.cpu_count()} cores)", options={"backend": "litert"})]


#: ONNX Runtime providers that run somewhere else, not on a device of this machine
_REMOTE_PROVIDERS = frozenset({"AzureExecutionProvider"})


def _onnx() -> list[Device]:
    ort = importlib.import_module("onnxruntime")
    return [Device("onnx", provider, f"ONNX Runtime {ort.__version__}: {provider}",
                   options={"backend": "onnx", "providers": [provider]})
            for provider in ort.get_available_providers() if provider not in _REMOTE_PROVIDERS]


def _openvino() -> list[Device]:
    ov = importlib.import_module("openvino")
    core = ov.Core()
    found = []
    for name in core.available_devices:
        try:
            full = core.get_property(name, "FULL_DEVICE_NAME")
        except Exception:
            full = name
        found.append(Device("openvino", name, f"OpenVINO {ov.__version__}: {full}",
                            options={"backend": "openvino", "device": name}))
    return found


def _coral() -> list[Device]:
    edgetpu = importlib.import_module("pycoral.utils.edgetpu")
    tpus = edgetpu.list_edge_tpus()
    if not tpus:
        return [Device("coral", None, "pycoral is installed but no Edge TPU was found "
                       "(USB: plugged in? PCIe: gasket/apex driver loaded?)", available=False,
                       install="https://coral.ai/docs/m2/get-started/ (driver and runtime)")]
    return [Device("coral", f":{n}", f"Edge TPU ({tpu.get('type')}) at {tpu.get('path')}",
                   options={"backend": "coral", "device": f":{n}"})
            for n, tpu in enumerate(tpus)]


def _memryx() -> list[Device]:
    importlib.import_module("memryx")
    # The SDK's Python API has no discovery call; the MX3 driver creates one device node per
    # chip group.
    nodes = sorted(glob.glob("/dev/memx*"))
    if not nodes:
        return [Device("memryx", None, "the MemryX SDK is installed but no MX3 device node "
                       "(/dev/memx*) was found", available=False,
                       install="the MemryX driver: https://developer.memryx.com")]
    return [Device("memryx", str(n), f"MemryX MX3 chip group {n} ({node})",
                   options={"backend": "memryx", "group_id": n})
            for n, node in enumerate(nodes)]


def _openvino_legacy() -> list[Device]:
    from .backends.openvino_legacy import ie_api

    ie = ie_api()
    core = ie.IECore()
    return [Device("openvino-legacy", name, f"OpenVINO {ie.get_version()} (legacy Inference "
                   f"Engine API): {core.get_metric(name, 'FULL_DEVICE_NAME')}",
                   options={"backend": "openvino-legacy", "device": name})
            for name in core.available_devices]


_PROBES: dict[str, Callable[[], list[Device]]] = {
    "litert": _litert, "onnx": _onnx, "openvino": _openvino, "coral": _coral,
    "memryx": _memryx, "openvino-legacy": _openvino_legacy,
}
#: listed only when installed: a missing legacy API is no news on current OpenVINO
_ONLY_IF_INSTALLED = {"openvino-legacy"}


def devices() -> list[Device]:
    """Every device the installed runtimes report, then what is missing and how to get it."""
    found: list[Device] = []
    for backend, probe in _PROBES.items():
        try:
            found += probe()
        except (ImportError, BackendUnavailable):
            if backend not in _ONLY_IF_INSTALLED:
                found.append(_missing(backend, f"{backend}: runtime not installed"))
        except Exception as exc:
            found.append(Device(backend, None, f"{backend}: the runtime failed to list its "
                                f"devices: {exc!r}", available=False,
                                install=BACKENDS[backend].install))
    return found


# ``aioaccel.devices`` is this module, and calling it calls devices() (aioaccel._callable_module)
make_callable(__name__, devices)
