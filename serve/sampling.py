"""How one row chooses its next token: the settings a request gives (SamplingParams) and the logits processors
they make, one list per row (rows of one batch differ), so a row samples the same tokens alone or batched.

    processors(SamplingParams(temperature=0.7, frequency_penalty=1.0), start=len(prompt))

transformers' processors do the repetition penalty, temperature, top-k and top-p; OpenAI's presence and
frequency penalties are not among them, so PresenceFrequencyPenalty below does those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lite_sft.errors import ServeError

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (as vLLM does)
PENALTY_LIMIT = 2.0  # OpenAI's range for presence and frequency penalties: -2 to 2


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    """Most tokens to generate (the stop token included)."""
    temperature: float = 0.0
    """0 for greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 for all."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches p."""
    repetition_penalty: float = 1.0
    """Above 1 makes tokens already in the prompt or output less likely (CTRL's penalty)."""
    seed: int | None = None
    """Seeds this request's sampling alone: the same seed gives the same tokens, batched or not."""
    stop: list[str] = field(default_factory=list)
    """Text that ends generation; it is not part of the output."""
    stop_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (end of sequence, end of turn)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's; -2 to 2, above 0 for new topics)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (OpenAI's; -2 to 2, above 0 for fewer
    repeats)."""

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens {self.max_new_tokens}: at least 1")
        if self.temperature < 0:
            problems.append(f"temperature {self.temperature}: 0 (greedy) or more")
        if self.top_k < 0:
            problems.append(f"top_k {self.top_k}: 0 (off) or more")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p {self.top_p}: above 0, at most 1")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty {self.repetition_penalty}: above 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_LIMIT <= getattr(self, name) <= PENALTY_LIMIT:
                problems.append(f"{name} {getattr(self, name)}: from -{PENALTY_LIMIT:g} to {PENALTY_LIMIT:g}")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise ServeError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW  # dividing by a tiny temperature overflows to inf


class PresenceFrequencyPenalty:
    """OpenAI's penalties: logits[t] -= presence * (count[t] > 0) + frequency * count[t], where count[t] is how
    often this row has generated t so far (its prompt does not count: input_ids[:, :start] is left out).

    >>> p = PresenceFrequencyPenalty(presence=0.5, frequency=1.0, start=1)
    >>> p(torch.tensor([[3, 1, 1]]), torch.zeros(1, 4)).tolist()
    [[0.0, -2.5, 0.0, 0.0]]
    """

    def __init__(self, presence: float, frequency: float, start: int):
        self.presence, self.frequency, self.start = presence, frequency, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.start:]  # (rows, generated)
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


def processors(params: SamplingParams, start: int):
    """The processors (a transformers LogitsProcessorList) a row's logits go through before its token is picked
    (an argmax when greedy, so only the penalties apply then); `start` is where its generated tokens begin in
    the ids they are given."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    chain = []
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        chain.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, start))
    if not params.greedy:
        if params.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            chain.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            chain.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList(chain)
