"""D20: what a user or a damaged file hands the engine's CLI gets a clear error, never a traceback: invalid
UTF-8 in a prompt, a head file that is not safetensors, a model manifest of the wrong shape, a broken chat
template."""

from __future__ import annotations

import json

import pytest
from tiny_models import make_tiny_chat_target

from adaspec.core.config import Settings
from adaspec.core.drafters.registry import make_drafter
from adaspec.core.errors import ModelError, RequestError
from adaspec.core.models import MANIFEST, verify


@pytest.fixture(scope="module")
def chat_target():
    return make_tiny_chat_target()


def test_invalid_utf8_prompts_are_request_errors(chat_target):
    bad = b"caf\xff hi".decode("utf-8", "surrogateescape")  # what Python makes of such a shell argument
    with pytest.raises(RequestError, match="not valid UTF-8"):
        chat_target.encode(bad)
    with pytest.raises(RequestError, match="not valid UTF-8"):
        chat_target.encode(bad, chat=False)
    with pytest.raises(RequestError, match="not valid UTF-8"):
        chat_target.encode_chat([{"role": "user", "content": "hi \ud800"}])  # a JSON "\ud800" escape
    assert chat_target.encode("café hi")  # valid text still encodes


def test_a_broken_chat_template_is_a_model_error(chat_target):
    saved = chat_target.tokenizer.chat_template
    chat_target.tokenizer.chat_template = "{% for m in messages %}{{ m.content }"  # unclosed tag
    try:
        with pytest.raises(ModelError, match="chat template"):
            chat_target.encode("hi")
    finally:
        chat_target.tokenizer.chat_template = saved


def test_a_head_file_that_is_not_safetensors_is_a_model_error(chat_target, tmp_path):
    fake = tmp_path / "passwd"
    fake.write_text("root:x:0:0:root:/root:/bin/bash\n")
    s = Settings(cache_dir=tmp_path, adaptive_head_path=fake)
    with pytest.raises(ModelError, match="cannot load adaptive head"):
        make_drafter("adaptive", s, chat_target)


@pytest.mark.parametrize("manifest", [[], "x", {"files": []}, {"files": {"a.safetensors": 5}}, {"files": None}])
def test_a_model_manifest_of_the_wrong_shape_is_a_model_error(tmp_path, manifest):
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="manifest"):
        verify(tmp_path)
