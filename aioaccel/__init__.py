"""aioaccel: async-native inference on edge accelerators (asyncio, uvloop, trio)."""

import typing as _typing

from . import _legacy_paths  # noqa: F401 - old core module paths (aioaccel.pipeline, ...)
from .api import open as open
from .backends import Model as Model
from .backends import available_backends as available_backends
from .core.healing import Health as Health
from .core.healing import Restart as Restart
from .devices import Device as Device
from .devices import devices as devices
from .errors import AccelError as AccelError
from .errors import BackendUnavailable as BackendUnavailable
from .errors import BatchingUnsupported as BatchingUnsupported
from .errors import DeployError as DeployError
from .errors import DeviceError as DeviceError
from .errors import DeviceTimeout as DeviceTimeout
from .errors import InferenceError as InferenceError
from .errors import InferTimeout as InferTimeout
from .errors import InputError as InputError
from .errors import MemberLost as MemberLost
from .errors import ModelLoadError as ModelLoadError
from .errors import ModelNotFound as ModelNotFound
from .errors import NotAcceptable as NotAcceptable
from .errors import NotEnoughResources as NotEnoughResources
from .errors import OpenError as OpenError
from .errors import OpenTimeout as OpenTimeout
from .errors import RemoteError as RemoteError
from .errors import RunnerClosed as RunnerClosed
from .errors import StreamClosed as StreamClosed
from .errors import StreamRefused as StreamRefused
from .errors import WouldBlock as WouldBlock
from .pool import MemberStats as MemberStats
from .pool import Pool as Pool
from .pool import pool as pool
from .runner import Result as Result
from .runner import Runner as Runner
from .runner import State as State
from .stages import BlockingStage as BlockingStage
from .stages import DeviceStage as DeviceStage
from .stages import StageSpec as StageSpec
from .stats import BatchStats as BatchStats
from .stats import RunnerStats as RunnerStats
from .stats import StageStats as StageStats
from .streams import Stream as Stream
from .streams import StreamStats as StreamStats
from .tensors import TensorSpec as TensorSpec

if not _typing.TYPE_CHECKING:
    # ``aioaccel.pool`` / ``aioaccel.devices`` are the modules, callable as their functions
    # (see aioaccel._callable_module): ``import aioaccel.pool`` gives the module and
    # ``aioaccel.pool(...)`` still works, whatever was imported first. Type checkers see the
    # functions (the imports above). Being modules, they are not in ``__all__`` (which lists
    # the package's public non-module names): ``from aioaccel import pool`` is the way.
    import sys as _sys

    pool = _sys.modules[f"{__name__}.pool"]
    devices = _sys.modules[f"{__name__}.devices"]
    del _sys
del _typing

__version__ = "0.1.0"

__all__ = [
    "AccelError",
    "BackendUnavailable",
    "BatchStats",
    "BatchingUnsupported",
    "BlockingStage",
    "DeployError",
    "Device",
    "DeviceError",
    "DeviceStage",
    "DeviceTimeout",
    "Health",
    "InferTimeout",
    "InferenceError",
    "InputError",
    "MemberLost",
    "MemberStats",
    "Model",
    "ModelLoadError",
    "ModelNotFound",
    "NotAcceptable",
    "NotEnoughResources",
    "OpenError",
    "OpenTimeout",
    "Pool",
    "RemoteError",
    "Restart",
    "Result",
    "Runner",
    "RunnerClosed",
    "RunnerStats",
    "StageSpec",
    "StageStats",
    "State",
    "Stream",
    "StreamClosed",
    "StreamRefused",
    "StreamStats",
    "TensorSpec",
    "WouldBlock",
    "available_backends",
    "open",
]
