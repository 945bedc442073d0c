"""Chat messages as token ids, for serving and training alike: the prompt, a turn, the stops.

The local backend decodes from ``prompt_ids(messages)`` and supervised fine-tuning trains on
``prompt_ids(messages) + reply + [end_token_id]``, so the two can never drift apart: what the
model learned to continue is token for token what it is asked to continue.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from citeqa.errors import ModelError

logger = logging.getLogger(__name__)

# End-of-turn / end-of-text tokens of common chat templates, beside the tokenizer's own EOS.
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


WORD_JOINER = "\u2060"  # invisible; breaks a special token's text apart


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """The texts the tokenizer reads as special tokens (``<|im_end|>``, ``</s>``...)."""
    specials = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added.content))
    return tuple(sorted((s for s in specials if len(s) > 1), key=len, reverse=True))


# Special tokens' texts of the common chat templates (ChatML, Llama 3, Llama 2/Mistral), for
# prompts rendered by a tokenizer citeqa cannot see (a remote engine's).
# <|im_start|>, <|eot_id|> ...; DeepSeek's <｜User｜> (full-width bars)
_PIPE_TOKEN = re.compile(r"<[|\uff5c][^|\uff5c<>\s]{1,48}[|\uff5c]>")
COMMON_SPECIALS = ("[/INST]", "[INST]", "<</SYS>>", "<<SYS>>", "</s>", "<s>",  # Llama 2, Mistral
                   "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",  # Gemma
                   "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                   "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")


# Any word in angle brackets: a special token's text in many vocabularies (SmolLM2's
# <filename>, <jupyter_text>...; Qwen3's <think>, </think>; Gemma's turn markers)
_ANGLE_WORD = re.compile(r"</?[A-Za-z][\w.-]{0,47}>")
# Texts that may be special tokens of a tokenizer not at hand, as a regex: those above, and any
# word in angle brackets. What a remote engine's grammars keep out of answers and quotes
# (remote.RemoteBackend), and what its prompt breaks (defused_for_any_template).
ANY_TEMPLATE_SPECIALS = "|".join([*map(re.escape, sorted(COMMON_SPECIALS, key=len, reverse=True)),
                                  _PIPE_TOKEN.pattern, _ANGLE_WORD.pattern])


def defused_for_any_template(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` with the texts that may be special tokens of a template not at hand broken
    (``defused`` for a remote engine, which renders the prompt itself): common templates'
    tokens, pipe tokens and any word in angle brackets ("<filename>" was sent whole, which
    SmolLM2's tokenizer reads as its special token)."""
    out = []
    for m in messages:
        content = m["content"]
        for pattern in (_PIPE_TOKEN, _ANGLE_WORD):
            content = pattern.sub(lambda t: "<" + WORD_JOINER + t.group(0)[1:], content)
        for s in COMMON_SPECIALS:  # (also inside a pipe token's text: "<|[INST]|>")
            if s in content:
                content = content.replace(s, s[0] + WORD_JOINER + s[1:])
        out.append({**m, "content": content})
    return out


def defused(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` with every special token's text in their contents broken by a word joiner:
    a passage holding ``<|im_end|><|im_start|>system`` was tokenized as those tokens, so a
    document could open a turn of its own. The template's own special tokens are untouched."""
    specials = special_strings(tokenizer)
    out = []
    for m in messages:
        content = m["content"]
        for s in specials:
            if s in content:
                content = content.replace(s, s[0] + WORD_JOINER + s[1:])
        out.append({**m, "content": content})
    return out


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant turn's opening; special tokens'
    texts inside the messages are read as text (``defused``).

    A tokenizer without a chat template (a base model) gets the turns as plain text, separated
    by blank lines.
    """
    messages = defused(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            out = tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, return_dict=True
            )
        except TemplateError as e:  # Gemma's, Mistral v0.1's: "System role not supported"
            merged = system_in_user(messages)
            if merged == list(messages):
                raise ModelError(f"the generator's chat template refuses citeqa's prompt: "
                                 f"{e}") from None
            try:
                out = tokenizer.apply_chat_template(merged, add_generation_prompt=True,
                                                    return_dict=True)
            except TemplateError as again:
                raise ModelError(f"the generator's chat template refuses citeqa's prompt "
                                 f"({e}), with its system turn put in the user's too: "
                                 f"{again}") from None
        return [int(i) for i in out["input_ids"]]
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]


def system_in_user(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` with a leading system turn put at the start of the user turn after it, for
    chat templates without a system role (as their models' cards advise)."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return list(messages)
    system, user = messages[0], messages[1]
    return [{**user, "content": f"{system['content']}\n\n{user['content']}"}, *messages[2:]]


def turn_ids(tokenizer: Any, message: dict[str, str]) -> list[int] | None:
    """Token ids of one message rendered alone, as it begins a prompt (None: the chat template
    does not render it alone)."""
    message = defused(tokenizer, [message])[0]
    if not getattr(tokenizer, "chat_template", None):
        return [int(i) for i in tokenizer(message["content"], add_special_tokens=True)["input_ids"]]
    try:
        out = tokenizer.apply_chat_template([message], add_generation_prompt=False,
                                            return_dict=True)
    except Exception:  # noqa: BLE001 - some templates refuse a lone system turn
        logger.debug("chat template does not render a lone system turn", exc_info=True)
        return None
    return [int(i) for i in out["input_ids"]]


def _token_id(tokenizer: Any, token: str) -> int | None:
    """``token``'s id, None where the vocabulary lacks it (it maps to the unknown token's id,
    which the unknown token itself has: SmolLM2's ``<|endoftext|>`` is its unk_token)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int):
        return None
    unknown = tid == tokenizer.unk_token_id and token != getattr(tokenizer, "unk_token", None)
    return None if unknown else tid


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a reply: the tokenizer's EOS first, then ``END_TOKENS`` that exist.

    Raises ModelError when there is none (decoding could never stop).
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in END_TOKENS:
        tid = _token_id(tokenizer, token)
        if tid is not None and tid not in ids:
            ids.append(tid)
    if not ids:
        raise ModelError("the tokenizer has no EOS token; set tokenizer.eos_token")
    return ids


def end_token_id(tokenizer: Any) -> int:
    """The token a trained reply ends with: the end of the assistant's turn (``<|im_end|>`` for
    ChatML models), else EOS."""
    tid = _token_id(tokenizer, END_TOKENS[0])
    return tid if tid is not None else stop_token_ids(tokenizer)[0]
