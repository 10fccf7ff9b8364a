"""Mistral-7B-Instruct-v0.2's tokenizer and chat format, through mistral-common.

The API uses this to validate and tokenize a conversation (a bad one is a 400 before anything is queued),
the workers use the same tokenizer to turn token ids back into text. Free of torch.

v0.2 uses the v1 SentencePiece tokenizer (32000 tokens, byte fallback) that ships inside mistral-common.
The model has no system role: mistral-common folds system prompts into a user turn, the Mistral way.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

SUPPORTED_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


class ConversationError(ValueError):
    """A conversation the model cannot take; `param` names the offending field, OpenAI style."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.message = message
        self.param = param


@lru_cache
def get_tokenizer() -> MistralTokenizer:
    return MistralTokenizer.v1()


def raw_tokenizer():
    """The SentencePiece tokenizer underneath: encode/decode of plain text, bos_id, eos_id, n_words."""
    return get_tokenizer().instruct_tokenizer.tokenizer


def is_valid_unicode(text: str) -> bool:
    """JSON can smuggle lone surrogates (\\ud800) into a str; they cannot be encoded, so refuse them."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@lru_cache
def max_chars_per_token() -> int:
    """The longest piece in the vocabulary: a text of n characters has at least n / this many tokens."""
    tokenizer = raw_tokenizer()
    return max(len(tokenizer.id_to_piece(i)) for i in range(tokenizer.n_words))


def min_tokens(messages: list[Message]) -> int:
    """A cheap lower bound on the prompt's token count, to refuse a huge prompt without tokenizing it."""
    return sum(len(m.content) for m in messages) // max_chars_per_token()


def validate_conversation(messages: list[Message]) -> None:
    """Mistral's rules, checked here so each failure names the message at fault.

    Outside system messages, turns must go user, assistant, user, ... and end with a user turn.
    """
    if not messages:
        raise ConversationError("'messages' must contain at least one message.")
    expected = "user"
    for index, message in enumerate(messages):
        if message.role not in SUPPORTED_ROLES:
            raise ConversationError(
                f"Unsupported role '{message.role}' in messages[{index}]; this model takes "
                f"{', '.join(SUPPORTED_ROLES)}.", f"messages[{index}].role")
        if message.content == "":
            raise ConversationError(f"messages[{index}].content must not be empty.", f"messages[{index}].content")
        if not is_valid_unicode(message.content):
            raise ConversationError(f"messages[{index}].content is not valid Unicode (it has a lone surrogate).",
                                    f"messages[{index}].content")
        if message.role == "system":
            continue
        if message.role != expected:
            raise ConversationError(
                f"Conversation roles must alternate user/assistant/user/... (after optional system messages); "
                f"messages[{index}] is '{message.role}' where '{expected}' was expected.", f"messages[{index}].role")
        expected = "assistant" if expected == "user" else "user"
    if expected != "assistant":  # the last non-system turn was not a user turn (or there was none)
        raise ConversationError("The last message (other than system messages) must have role 'user'.")


def encode_conversation(messages: list[Message]) -> list[int]:
    """Validate and tokenize a chat into the prompt token ids (starting with BOS)."""
    validate_conversation(messages)
    converted = []
    for message in messages:
        kind = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}[message.role]
        converted.append(kind(content=message.content))
    try:
        return get_tokenizer().encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens
    except MistralCommonException as exc:  # anything mistral-common still refuses
        raise ConversationError(str(exc)) from exc
