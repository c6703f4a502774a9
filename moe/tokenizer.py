"""Tokenizer from the checkpoint's tokenizer.json (the `tokenizers` library), chat template,
and incremental detokenization for streaming."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        self.model_dir = d
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}: pass prompts as token ids "
                                    "({'prompt_token_ids': [...]}) or add the tokenizer file")
        self.tok = HFTokenizer.from_file(str(path))
        cfg_path = d / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        tmpl = d / "chat_template.jinja"
        if self.chat_template is None and tmpl.is_file():
            self.chat_template = tmpl.read_text()
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.eos_token_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> str:
        """Render a conversation with ``chat_template`` (Jinja text), else the checkpoint's own."""
        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise ValueError(f"the checkpoint {self.model_dir} has no chat template (no 'chat_template' in "
                             "tokenizer_config.json, no chat_template.jinja); pass --chat-template FILE "
                             "(LLM.chat(..., chat_template=TEXT)) or generate without --chat")
        if not isinstance(messages, list) or any(not isinstance(m, dict) or "role" not in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(msg: str):
            raise ValueError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        try:
            compiled = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def detokenize_incrementally(tok: Tokenizer, ids: list[int], prefix_offset: int, read_offset: int,
                             skip_special_tokens: bool = True) -> tuple[str, int, int]:
    """New text produced by the last tokens of ``ids``; holds back an incomplete UTF-8 tail.

    Decodes a short window before ``read_offset`` too, so that tokenizers which drop a
    leading space when decoding a lone token still produce the right text.
    """
    prefix = tok.decode(ids[prefix_offset:read_offset], skip_special_tokens)
    full = tok.decode(ids[prefix_offset:], skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        return full[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset
