"""What a run of LLM calls will cost, said before the first call, and a stop for large runs until confirmed.

Token counts are estimates: input at about 4 characters a token (OpenAI's rule of thumb for English; the
prompts are short metadata lines, so a tokenizer would move it by some percent, not a factor), output at most
`describe.max_tokens` a call (an upper bound: answers stop earlier). Prices are USD per million tokens: the
`describe.price_input_per_m` / `price_output_per_m` settings, else the list price of a known OpenAI model
(`LIST_PRICES`, as published when this was written; a provider's bill is what counts), else unknown. Cached
answers cost nothing and are not counted. Only a remote endpoint (`openai`, which includes any
OpenAI-compatible server) is gated: the local backend costs time, which its progress bar shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from recpipe.errors import ConfigError

if TYPE_CHECKING:
    from recpipe.config import DescribeConfig

CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD_TOKENS = 4  # chat format tokens around each message
# USD per 1M (input, output) tokens, standard tier; matched on the model name's prefix, longest first
LIST_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}


@dataclass
class Estimate:
    calls: int
    input_tokens: int
    output_tokens: int  # at most
    usd: float | None  # None: no price known for this model
    price: str  # where the price came from

    def line(self, what: str, model: str) -> str:
        usd = "" if self.usd is None else f"{self.usd:,.2f}" if self.usd >= 0.01 else f"{self.usd:.4f}"
        cost = f"at most about ${usd} ({self.price})" if self.usd is not None else (
            f"price unknown for {model!r} (set describe.price_input_per_m and price_output_per_m)")
        return (f"{what}: {self.calls:,} calls to send, about {self.input_tokens:,} input and at most "
                f"{self.output_tokens:,} output tokens: {cost}")


def prices(model: str, dcfg: DescribeConfig) -> tuple[float, float, str] | None:
    if dcfg.price_input_per_m is not None or dcfg.price_output_per_m is not None:
        return dcfg.price_input_per_m or 0.0, dcfg.price_output_per_m or 0.0, "describe.price_*_per_m"
    name = model.lower().split("/")[-1]
    for prefix in sorted(LIST_PRICES, key=len, reverse=True):
        if name.startswith(prefix):
            pin, pout = LIST_PRICES[prefix]
            return pin, pout, f"{prefix} list price ${pin}/${pout} per 1M tokens"
    return None


def estimate(messages: list[list[dict[str, str]]], model: str, dcfg: DescribeConfig) -> Estimate:
    """The cost of sending each message list once (a call each)."""
    tokens_in = sum(sum(len(m.get("content") or "") / CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS for m in msgs)
                    for msgs in messages)
    tokens_out = len(messages) * dcfg.max_tokens
    p = prices(model, dcfg)
    usd = None if p is None else (tokens_in * p[0] + tokens_out * p[1]) / 1e6
    return Estimate(len(messages), int(round(tokens_in)), tokens_out, usd, p[2] if p else "")


def check(est: Estimate, dcfg: DescribeConfig, what: str, model: str) -> None:
    """Stop a large run before its first call unless describe.yes (`--yes`)."""
    if dcfg.yes:
        return
    too_costly = est.usd is not None and est.usd > dcfg.confirm_usd
    too_many = est.calls > dcfg.confirm_calls
    if too_costly or too_many:
        why = (f"more than describe.confirm_usd = ${dcfg.confirm_usd:g}" if too_costly
               else f"more than describe.confirm_calls = {dcfg.confirm_calls:,} calls")
        raise ConfigError(f"{est.line(what, model)}; that is {why}, so nothing was sent: run again with --yes "
                          "(describe.yes=true) to go on, or --limit N to try N items first")


__all__ = ["Estimate", "LIST_PRICES", "estimate", "check", "prices"]
