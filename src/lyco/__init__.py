"""lyco: LyCORIS-family parameter-efficient adapters (LoRA/LoCon, LoHa, LoKr) for PyTorch."""

from .errors import (
    AdapterNameError,
    ArgumentError,
    ConfigError,
    FormatError,
    LycoError,
    MergeError,
    ShapeMismatchError,
    StateError,
    TargetError,
    UnsupportedLayerError,
)
from .functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from .layer import AdaptedLayer
from .lycoris_files import load_lycoris, load_lycoris_into, save_lycoris
from .methods import (
    Adapter,
    AdapterConfig,
    FullConfig,
    LoHaConfig,
    LoKrConfig,
    LoRAConfig,
    MixedConfig,
    register_method,
)
from .model import LycoModel, get_model
from .modules_to_save import ModulesToSaveWrapper
from .network import LycorisNetwork, create_lycoris, create_lycoris_from_weights, lycoris_model
from .ops.factorize import factorization
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__version__ = "0.1.0"

__all__ = [
    "AdaptedLayer",
    "Adapter",
    "AdapterConfig",
    "AdapterNameError",
    "ArgumentError",
    "ConfigError",
    "FormatError",
    "FullConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoRAConfig",
    "LycoError",
    "LycoModel",
    "LycorisNetwork",
    "MergeError",
    "MixedConfig",
    "ModulesToSaveWrapper",
    "ShapeMismatchError",
    "StateError",
    "TargetError",
    "TunerLayerStatus",
    "TunerModelStatus",
    "UnsupportedLayerError",
    "__version__",
    "create_lycoris",
    "create_lycoris_from_weights",
    "factorization",
    "get_layer_status",
    "get_model",
    "get_model_status",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_lycoris",
    "load_lycoris_into",
    "lycoris_model",
    "register_method",
    "save_lycoris",
    "set_peft_model_state_dict",
]  # fmt: skip
