"""The tensor names an OpenVINO IR (``.xml``) declares for its inputs and outputs.

A port in an IR carries a comma-separated list of tensor names (``names="a,b"``), and
OpenVINO's API hands them back as an unordered set: ``get_any_name()`` may pick an alias the
frontend or the compiler added (an ONNX ``If`` inlined by the frontend names its output after
the branch). The file's own order says which one the model means, so both OpenVINO backends
read it from here: the same file then gives the same names on the current API, the legacy
Inference Engine API (which keys outputs by the producing layer's name) and ONNX Runtime.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["IRPorts", "declared_ports"]


@dataclass(frozen=True)
class IRPorts:
    """Per model input (``Parameter`` layers, in file order) and output (``Result`` layers):
    the key the legacy API uses for it, and the tensor names its port declares, in order."""

    inputs: list[tuple[str, list[str]]] = field(default_factory=list)
    outputs: list[tuple[str, list[str]]] = field(default_factory=list)

    def input_names(self) -> list[str]:
        """The first declared name of each input (the layer's name where the port has none)."""
        return [names[0] if names else key for key, names in self.inputs]

    def output_names(self) -> list[str]:
        return [names[0] if names else key for key, names in self.outputs]

    def legacy_names(self) -> dict[str, str]:
        """Legacy API key -> declared name, for the ports whose names differ."""
        return {key: names[0] for key, names in (*self.inputs, *self.outputs)
                if names and names[0] != key}


def _names(port: ET.Element) -> list[str]:
    # Names are comma-separated; a comma inside a name is written as "\,".
    raw = port.get("names")
    if not raw:
        return []
    parts = raw.replace("\\,", "\0").split(",")
    return [p.replace("\0", ",").strip() for p in parts if p.strip()]


def declared_ports(xml: str | os.PathLike[str]) -> IRPorts:
    """What ``xml`` declares; empty where it cannot be parsed (OpenVINO then reports why)."""
    try:
        root = ET.parse(Path(xml)).getroot()
    except (ET.ParseError, OSError):
        return IRPorts()
    layers = {layer.get("id"): layer for layer in root.iter("layer")}
    # (layer id, port id) -> the producer feeding it: Result layers have one input port.
    producers = {(e.get("to-layer"), e.get("to-port")): (e.get("from-layer"), e.get("from-port"))
                 for e in root.iter("edge")}
    ports = IRPorts()
    for layer_id, layer in layers.items():
        kind, name = layer.get("type"), layer.get("name") or ""
        if kind == "Parameter":
            port = layer.find("output/port")
            ports.inputs.append((name, _names(port) if port is not None else []))
        elif kind == "Result":
            into = layer.find("input/port")
            source = producers.get((layer_id, into.get("id") if into is not None else None))
            producer = layers.get(source[0]) if source else None
            if producer is None:
                continue
            outs = producer.findall("output/port")
            port = next((p for p in outs if p.get("id") == source[1]), None)  # type: ignore[index]
            key = producer.get("name") or ""
            if len(outs) > 1 and port is not None:  # the legacy API suffixes the port's index
                key = f"{key}.{outs.index(port)}"
            ports.outputs.append((key, _names(port) if port is not None else []))
    return ports
