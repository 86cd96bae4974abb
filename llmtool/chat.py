"""A chat with an export: the conversation and the KV cache of the turns already processed.

:class:`ChatSession` is the library side of ``llmtool chat``. Each turn renders the whole
conversation with the chat template and its generation prompt, compares the ids with those the
cache already holds and feeds only the new ones (:meth:`Decoder.extend`); where the re-rendered
history differs from what was cached (an answer that tokenizes differently as text) the cache is
cut back to the common prefix first. The answer's tokens then come from the same token-step and
streaming layers as :func:`llmtool.generate.generate`, so a turn equals a from-scratch
generation of the whole conversation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.chat_template import render_ids, require_template
from llmtool.errors import UsageError
from llmtool.generate import TextCallback, stop_token_ids, stream_tokens, token_steps
from llmtool.runtime.decoders import Decoder, Step, cache_length
from llmtool.runtime.model import OnnxCausalLM
from llmtool.runtime.stopping import RowStops, StopConditions
from llmtool.sampling import Sampler, SamplingConfig

CHAT_CONTEXT = 4096  # cache length asked for when the model gives no context size


@dataclass
class TurnResult:
    """One answer of :meth:`ChatSession.send`.

    Attributes:
        text: The answer (stop string cut, special tokens removed).
        token_ids: Its token ids (the end-of-turn token included when produced).
        finish_reason: ``eos``, ``stop``, ``length``, ``time`` or ``interrupted``.
        prefill_tokens: Tokens this turn fed before answering (only the turn's own when the
            cache held the rest).
        prompt_tokens: Tokens of the whole rendered conversation.
        seconds: Wall time of the turn; ``tokens_per_s``: answer tokens per second of decoding.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prefill_tokens: int
    prompt_tokens: int
    seconds: float
    tokens_per_s: float


@dataclass
class ChatSession:
    """A conversation with one export, its KV cache kept from turn to turn.

    Args:
        model: The export (its tokenizer must carry a chat template).
        sampling: Token choice; greedy by default.
        max_new_tokens: Longest answer.
        stop: Stop strings and time limit per answer.
        system: System message leading the conversation.
    """

    model: OnnxCausalLM
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    stop: StopConditions = field(default_factory=StopConditions)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_template(self.model.tokenizer)
        self.stop.validate()
        self.sampler = Sampler(self.sampling)
        self.eos = stop_token_ids(self.model, chat=True, eos=self.stop.eos)
        self.cached: list[int] = []  # token ids the decoder's cache holds, in order
        self.decoder: Decoder | None = None

    def reset(self, system: str | None = None, keep_system: bool = True) -> None:
        """Forget the conversation (and the cache); ``system`` replaces the system message."""
        if not keep_system or system is not None:
            self.system = system
        self.messages = []
        self.cached, self.decoder = [], None

    def conversation(self) -> list[dict[str, str]]:
        """The messages rendered for the next turn: the system message, then the turns."""
        lead = [{"role": "system", "content": self.system}] if self.system else []
        return lead + self.messages

    def _prefill(self, ids: list[int]) -> tuple[Step, int]:
        """Feed what the cache lacks of ``ids``; returns the last step and how many tokens that was."""
        common = 0
        for a, b in zip(self.cached, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last prompt token always runs: its logits
        cut_back = self.decoder is not None and common < len(self.cached)
        if cut_back and not self.decoder.truncate(common):  # type: ignore[union-attr]
            self.decoder = None
        if self.decoder is None or common == 0:
            length = self.model.max_positions or CHAT_CONTEXT
            self.decoder = self.model.decoder(1, cache_length(self.model, length))
            self.cached = list(ids)
            return self.decoder.prefill([ids]), len(ids)
        self.cached = list(ids)
        return self.decoder.extend(ids[common:]), len(ids) - common

    def send(self, text: str, on_text: TextCallback | None = None) -> TurnResult:
        """Add a user turn, answer it (streaming through ``on_text(0, text)``), keep the answer.

        A ``KeyboardInterrupt`` while answering keeps the partial answer (``interrupted``) and
        drops the cache, so the next turn prefills the conversation again.
        """
        if not text.strip():
            raise UsageError("A chat message is empty", "type some text.")
        self.messages.append({"role": "user", "content": text})
        ids = render_ids(self.model.tokenizer, self.conversation())
        if self.model.max_positions and len(ids) + self.max_new_tokens > self.model.max_positions:
            self.messages.pop()
            raise UsageError(
                f"The conversation ({len(ids)} tokens) leaves no room for an answer in the model's "
                f"context of {self.model.max_positions}",
                "type /reset to start over.",
            )
        start = time.perf_counter()
        stops = RowStops(1, self.eos, self.stop)
        fed: list[int] = []

        def prefill() -> Step:
            step, n = self._prefill(ids)
            fed.append(n)
            return step

        pad = self.model.tokenizer.pad_token_id or 0
        steps = token_steps(
            self.decoder_or_new(), self.sampler, prefill, self.max_new_tokens, stops, pad
        )
        reason = None
        generated: list[int] = []
        try:
            streamed = stream_tokens(
                _recording(steps, generated), self.model.tokenizer, stops, on_text
            )
            answer_ids, detok = streamed.generated[0], streamed.detokenizers[0]
            cut = detok.cut
            decode_s, decode_tokens = streamed.decode_s, streamed.decode_tokens
        except KeyboardInterrupt:
            reason, answer_ids, cut = "interrupted", generated, None
            decode_s, decode_tokens = time.perf_counter() - start, len(generated)
            self.cached, self.decoder = [], None
        answer = (
            cut
            if cut is not None
            else self.model.tokenizer.decode(answer_ids, skip_special_tokens=True)
        )
        if on_text is not None and reason is None and (rest := detok.flush(answer)):
            on_text(0, rest)
        if reason is None:
            # The cache holds the prompt and every answer token but the last (never fed back).
            self.cached = ids + answer_ids[:-1]
        self.messages.append({"role": "assistant", "content": answer})
        return TurnResult(
            text=answer,
            token_ids=answer_ids,
            finish_reason=reason or stops.reasons[0],
            prefill_tokens=fed[0] if fed else 0,
            prompt_tokens=len(ids),
            seconds=time.perf_counter() - start,
            tokens_per_s=decode_tokens / decode_s if decode_tokens and decode_s > 0 else 0.0,
        )

    def decoder_or_new(self) -> Decoder:
        """A proxy decoder: :func:`token_steps` steps whichever decoder the prefill settled on."""
        return _CurrentDecoder(self)


class _CurrentDecoder(Decoder):
    """Forwards ``step`` to the session's decoder of the moment (the prefill may replace it)."""

    def __init__(self, session: ChatSession) -> None:
        self.session = session

    def step(self, tokens: np.ndarray) -> Step:
        assert self.session.decoder is not None
        return self.session.decoder.step(tokens)


def _recording(steps: Any, generated: list[int]) -> Any:
    """Pass token steps through, noting row 0's tokens (kept when the answer is interrupted)."""
    for tokens, live in steps:
        if live[0]:
            generated.append(int(tokens[0]))
        yield tokens, live
