"""Chat: the embedded model's role-prefixed template, LLM.chat, and `moe generate --chat`."""
import shutil

import pytest
from typer.testing import CliRunner

from moe import LLM, SamplingParams
from moe.cli import app
from moe.llm import default_model_path
from moe.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"}]
runner = CliRunner()


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def no_template(tmp_path_factory):
    """The default model with its chat template removed."""
    import json
    from pathlib import Path

    d = tmp_path_factory.mktemp("no_template")
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        shutil.copy(f"{default_model_path()}/{f}", d / f)
    cfg = json.loads((Path(default_model_path()) / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_default_template_is_role_prefixed_lines():
    tok = Tokenizer(default_model_path())
    assert tok.apply_chat_template(MESSAGES) == "system: You answer briefly.\nuser: What is a list?\nassistant:"
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == (
        "system: You answer briefly.\nuser: What is a list?\n")
    assert tok.apply_chat_template(MESSAGES, chat_template="{{ messages[-1]['content'] }}!") == "What is a list?!"


def test_llm_chat_equals_generate_on_the_rendered_prompt(llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    text = llm.get_tokenizer().apply_chat_template(MESSAGES)
    want = llm.generate(text, params)[0]
    got = llm.chat(MESSAGES, params)
    assert len(got) == 1 and got[0].prompt == text and got[0].outputs[0].token_ids == want.outputs[0].token_ids
    both = llm.chat([MESSAGES, MESSAGES[1:]], params)
    assert [o.prompt for o in both] == [text, "user: What is a list?\nassistant:"]
    assert both[0].outputs[0].token_ids == want.outputs[0].token_ids
    custom = llm.chat(MESSAGES, params, chat_template="Q: {{ messages[-1]['content'] }}\nA:")
    assert custom[0].prompt == "Q: What is a list?\nA:"


def test_a_checkpoint_without_a_template_names_the_fix(no_template):
    tok = Tokenizer(no_template)
    with pytest.raises(ValueError, match=r"has no chat template .*pass --chat-template FILE"):
        tok.apply_chat_template(MESSAGES)
    llm = LLM(str(no_template), dtype="float32")
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat(MESSAGES)
    out = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=3), chat_template="{{ messages[0]['content'] }}")
    assert out[0].prompt == "You answer briefly." and len(out[0].outputs[0].token_ids) == 3


def test_bad_messages_and_templates_are_clear_errors():
    tok = Tokenizer(default_model_path())
    with pytest.raises(ValueError, match="messages must be a list"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="not valid Jinja"):
        tok.apply_chat_template(MESSAGES, chat_template="{% for m in messages %}")


def test_cli_generate_chat_uses_the_default_template_or_a_file(no_template, tmp_path):
    res = runner.invoke(app, ["generate", "What is a list?", "--chat", "--max-tokens", "4", "--temperature", "0",
                              "--no-stream"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("user: What is a list?\nassistant:")
    template = tmp_path / "t.jinja"
    template.write_text("Question: {{ messages[-1]['content'] }}\nAnswer:")
    res = runner.invoke(app, ["generate", "Why?", "--chat", "--chat-template", str(template), "--max-tokens", "4",
                              "--model", str(no_template), "--no-stream"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Question: Why?\nAnswer:")
    res = runner.invoke(app, ["generate", "Why?", "--chat", "--max-tokens", "4", "--model", str(no_template)])
    assert res.exit_code == 2 and "--chat-template FILE" in res.stderr
    res = runner.invoke(app, ["generate", "Why?", "--chat", "--chat-template", str(tmp_path / "missing.jinja")])
    assert res.exit_code == 2 and "cannot read it" in res.stderr
