"""moe: fast inference for Mixture-of-Experts language models.

    from moe import LLM, SamplingParams
    llm = LLM()                                   # the embedded default model
    print(llm.generate("Once upon a time", SamplingParams(max_tokens=32))[0].outputs[0].text)
"""
from .config import EngineConfig, ModelConfig
from .engine import LLMEngine
from .llm import LLM, default_model_path
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "LLMEngine",
           "EngineConfig", "ModelConfig", "default_model_path"]
__version__ = "0.1.0"
