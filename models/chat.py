"""Rendering an episode through the chat template, token-in/token-out.

Owns `ChatRenderer` (the first prompt, and each observation as the *suffix* the
template puts after an assistant turn), `observation_content` (an observation as
chat content parts, an image part at each `<image>` marker) and
`DEFAULT_SYSTEM_PROMPT`. The agent loop (actors/) renders episodes with it, and
the learner's SFT (learner/sft.py) renders scripted-policy episodes the same way,
so both see exactly the same token ids.

Only the first prompt and each observation are rendered; the history is never
re-tokenised from text. A template that adds text around tool responses (Qwen's
`<|im_start|>user\n<tool_response>`) is honoured without rendering the history again.
"""

from __future__ import annotations

from typing import Any

from env.types import IMAGE_MARKER, Observation

DEFAULT_SYSTEM_PROMPT = (
    "You answer questions about a long video. You see a coarse overview first. Think inside <think></think>, "
    "call tools to look closer (several calls in one turn run in parallel), and give the final answer inside "
    "<answer></answer>.")


def observation_content(obs: Observation) -> list[dict]:
    """The observation as chat content parts: text with an image part at each marker."""
    parts: list[dict] = []
    pieces = obs.text.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(obs.frames):
        raise ValueError(f"observation has {len(pieces) - 1} image markers for {len(obs.frames)} frames")
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(obs.frames):
            parts.append({"type": "image"})
    return parts


class ChatRenderer:
    """Renders the first prompt and each observation suffix with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, tools: list[dict], system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 end_of_turn: str = "<|im_end|>"):
        self.tok, self.tools, self.system_prompt = tokenizer, tools, system_prompt
        self.end_of_turn = end_of_turn
        self.eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def prompt_ids(self, obs: Observation) -> list[int]:
        messages = [{"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": observation_content(obs)}]
        return self._encode(self._render(messages, True))

    def observation_ids(self, obs: Observation, turn_closed: bool) -> list[int]:
        """Tokens that follow an assistant turn: the tool response and the next generation prompt.

        Found as the text the template renders after `<assistant turn><end_of_turn>`,
        so whatever the template puts between turns is included. If the turn was cut
        (no end-of-turn token generated), the end-of-turn token is added first.
        """
        marker = "\x00WEFT_TURN\x00"
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker},
                    {"role": "tool", "content": observation_content(obs)}]
        text = self._render(messages, True)
        cut = text.index(marker + self.end_of_turn) + len(marker) + len(self.end_of_turn)
        ids = self._encode(text[cut:])
        return ids if turn_closed else [self.eot_id] + ids
