"""Conversations -> token ids with a loss mask, and chat prompts, in one of two templates.

"llama2" (Llama-2 chat, as run.c's chat mode): each user turn is BOS + "[INST] {user} [/INST]", the first
one carrying the system prompt as "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]"; the assistant's
answer follows as its own tokens and ends with EOS. The loss mask is True exactly on the assistant tokens
and their EOS. User and assistant text are tokenized separately, so the mask boundary is exact and a
chat prompt is a prefix of the training sequence.

"qa" (InnerArianna's fine-tuning text): "Q: {user}\\nA: {assistant}" per turn, turns joined by a newline,
the system prompt (if any) as a first line; BOS ... EOS around the conversation; mask all True (the seed
trained on prompts too).

`loss_mask[i]` says whether ids[i] is a target to learn (predicted from ids[:i]).
"""

from __future__ import annotations

TEMPLATES = ("llama2", "qa")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _check(messages: list[dict], template: str) -> tuple[str, list[dict]]:
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}")
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i + 1}: expected a {want} turn after the optional system message "
                             f"(user and assistant alternate), got {m['role']!r}")
    return system, messages


def _user_text(user: str, system: str, first: bool) -> str:
    if first and system:
        return f"{B_INST} {B_SYS}{system.strip()}{E_SYS}{user.strip()} {E_INST}"
    return f"{B_INST} {user.strip()} {E_INST}"


def _require(tok, *names: str) -> None:
    for name in names:
        if getattr(tok, name, None) is None:
            raise ValueError(f"the chat template needs a tokenizer with {name}")


def encode_conversation(tok, messages: list[dict], template: str) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) for one conversation: [{role, content}], roles system (first, optional), then user and
    assistant alternating."""
    system, turns = _check(messages, template)
    _require(tok, "bos_id", "eos_id")
    if template == "qa":
        ids = [tok.bos_id] + tok.encode(_qa_text(system, turns)) + [tok.eos_id]
        return ids, [True] * len(ids)
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            part = [tok.bos_id] + tok.encode(_user_text(m["content"], system, i == 0))
            ids += part
            mask += [False] * len(part)
        else:
            part = tok.encode(m["content"].strip()) + [tok.eos_id]
            ids += part
            mask += [True] * len(part)
    return ids, mask


def _qa_text(system: str, turns: list[dict]) -> str:
    lines = [system.strip()] if system.strip() else []
    for m in turns:
        lines.append(("Q: " if m["role"] == "user" else "A: ") + m["content"].strip())
    return "\n".join(lines)


def encode_prompt(tok, messages: list[dict], template: str) -> list[int]:
    """The ids a chat model continues from: the history (which ends with a user turn) and the opening of the
    assistant's answer. A prefix of encode_conversation's ids for the same history plus an answer."""
    system, turns = _check(messages, template)
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a chat prompt must end with a user message")
    _require(tok, "bos_id")
    if template == "qa":
        return [tok.bos_id] + tok.encode(_qa_text(system, turns) + "\nA:")
    ids, _ = encode_conversation(tok, [{"role": "system", "content": system}] * bool(system) + turns, template)
    return ids


def stop_text(template: str) -> str | None:
    """Text that ends an answer besides EOS: in "qa" mode the model may go on with the next question."""
    return "\nQ:" if template == "qa" else None
