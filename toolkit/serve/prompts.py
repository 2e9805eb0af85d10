"""Requests -> prompt ids. Chat messages go through toolkit.chat.Session (the run's chat template, the oldest
turns dropped to fit the context); a base model (no template) reads them as plain text, one per line."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit import chat as chat_lib
from toolkit.data import chat_template as T
from toolkit.serve.errors import ApiError


@dataclass
class Prompt:
    ids: list[int]
    stop_texts: tuple[str, ...] = ()  # besides the request's own: the template's ("qa": "\nQ:")
    strip_lead: bool = False


class Prompter:
    def __init__(self, target: chat_lib.Target):
        self.target = target
        self.tok = target.tokenizer
        self.template = target.template
        self.max_len = target.model.config.max_seq_len

    def completion_ids(self, text: str, param: str = "prompt") -> Prompt:
        bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
        ids = bos + self.tok.encode(text)
        if len(ids) >= self.max_len:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; the model's context is {self.max_len} tokens, "
                           f"with room for at least one new token: {len(ids) - self.max_len + 1} tokens too many",
                           param, "context_length_exceeded")
        return Prompt(ids)

    def chat_ids(self, messages: list[dict], max_tokens: int | None) -> Prompt:
        if not self.template:
            return self.completion_ids("\n".join(m["content"] for m in messages), "messages")
        system = ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if not messages or messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must be a user message", "messages")
        session = chat_lib.Session(self.target, max_new_tokens=max_tokens or self.max_len, system=system,
                                   template=self.template, history=list(messages[:-1]))  # for its prompt only
        text = messages[-1]["content"]
        try:
            ids, _ = session.prompt_ids(text)
            alone = T.encode_prompt(self.tok, [{"role": "user", "content": text}], self.template)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        if len(ids) < len(alone):  # the Session had to cut the last message itself
            raise ApiError(400, f"the last message is {len(alone)} tokens with the chat template; the context of "
                           f"{self.max_len} tokens, less room for the answer, holds {len(ids)}: "
                           f"{len(alone) - len(ids)} tokens too many (lower max_tokens or shorten it)",
                           "messages", "context_length_exceeded")
        stop = T.stop_text(self.template)
        return Prompt(ids, (stop,) if stop else (), strip_lead=True)
