"""Model definitions: one shared decoder stack, configured per family from config.json."""
from .decoder import KVCacheSpec, MoECausalLM
from .families import PARSERS, parse_config
from .layers import ForwardContext
from .weights import rules_for

SUPPORTED_ARCHITECTURES = tuple(PARSERS)

__all__ = ["MoECausalLM", "KVCacheSpec", "ForwardContext", "parse_config", "rules_for", "SUPPORTED_ARCHITECTURES"]
