"""Model definitions: one shared decoder stack, configured per family from config.json."""
from .decoder import KVCacheSpec, MoECausalLM, weight_bytes
from .families import PARSERS, mtp_config, parse_config
from .layers import ForwardContext
from .mtp import MTPModel
from .weights import rules_for

SUPPORTED_ARCHITECTURES = tuple(PARSERS)

__all__ = ["MoECausalLM", "MTPModel", "KVCacheSpec", "ForwardContext", "parse_config", "mtp_config", "rules_for",
           "SUPPORTED_ARCHITECTURES", "weight_bytes"]
