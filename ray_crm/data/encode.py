"""(prompt, response) -> token ids, the one way every stage tokenizes a pair for a reward model.

BERT-style tokenizers (no chat template) get the pair as a text pair, `[CLS] prompt [SEP] response [SEP]`
with token type ids; decoder tokenizers get the user/assistant chat template. Pairs longer than
`max_length` are cut: text pairs with 'longest_first' (the longer text loses tokens first), chat texts
from the left, since a decoder reward model reads its score at the last token. The full length is
reported so truncation is counted, never silent.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ray_crm.config import Config

# Encoding untruncated first (to measure) makes transformers warn about every long pair; the count is reported.
logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    lengths: list[int]  # before truncation
    response_starts: list[int] | None = None  # chat: index of the response's first token in input_ids


class PairEncoder:
    def __init__(self, path: str, max_length: int, template: Literal["auto", "text_pair", "chat"] = "auto") -> None:
        from transformers import AutoTokenizer  # imported here: parse-only Ray workers never pay for it

        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        self.max_length = max_length
        has_chat = getattr(self.tokenizer, "chat_template", None) is not None
        if template == "chat" and not has_chat:
            raise ValueError(f"data.template=chat but the tokenizer at {path} has no chat template")
        self.mode = "chat" if template == "chat" or (template == "auto" and has_chat) else "text_pair"
        self.type_ids = self.mode == "text_pair" and "token_type_ids" in self.tokenizer.model_input_names
        self._response_tokens: dict[str, int] = {}

    def forget(self) -> None:
        """Drop the response lengths remembered from earlier batches (call once per block)."""
        self._response_tokens.clear()

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text alone, without special tokens: the length Z. Texts just encoded as the
        response of a text pair are not tokenized again: the pair's sequence ids already counted them."""
        if all(t in self._response_tokens for t in texts):
            return [self._response_tokens[t] for t in texts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> Encoded:
        if self.mode == "chat":
            return self._encode_chat(prompts, responses)
        enc = self.tokenizer(list(prompts), list(responses))
        if enc.encodings is not None:  # fast tokenizers: tokens with sequence id 1 are the response's
            self._response_tokens.update((r, e.sequence_ids.count(1)) for r, e in zip(responses, enc.encodings))
        ids = enc["input_ids"]
        types = enc["token_type_ids"] if self.type_ids else None
        lengths = [len(x) for x in ids]
        over = [i for i, n in enumerate(lengths) if n > self.max_length]
        if over:
            cut = self.tokenizer([prompts[i] for i in over], [responses[i] for i in over],
                                 truncation="longest_first", max_length=self.max_length)
            for j, i in enumerate(over):
                ids[i] = cut["input_ids"][j]
                if types is not None:
                    types[i] = cut["token_type_ids"][j]
        return Encoded(ids, types, lengths)

    def chat_text(self, prompt: str, response: str) -> str:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def _encode_chat(self, prompts: Sequence[str], responses: Sequence[str]) -> Encoded:
        texts = [self.chat_text(p, r) for p, r in zip(prompts, responses)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        heads = self.tokenizer([self.prompt_text(p) for p in prompts], add_special_tokens=False)["input_ids"]
        kept = [x[-self.max_length:] for x in ids]
        # The prompt's tokens are those it shares with the whole text (a merge across the boundary stays with
        # the response); left truncation moves the start back by what it cut, down to 0.
        starts = [max(0, _shared_prefix(h, x) - (len(x) - len(k))) for h, x, k in zip(heads, ids, kept)]
        return Encoded(kept, None, [len(x) for x in ids], starts)

    def prompt_text(self, prompt: str) -> str:
        """The chat text up to where the assistant's answer begins."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@functools.lru_cache(maxsize=4)
def load_encoder(path: str, max_length: int, template: str = "auto") -> PairEncoder:
    """One encoder per process: Ray reuses worker processes, so each loads the tokenizer once."""
    return PairEncoder(path, max_length, template)  # type: ignore[arg-type]


def encode_twins(cfg: Config) -> dict[str, Any] | None:
    """`data.twins` tokenized exactly as `prepare` tokenizes a response, or None."""
    if cfg.data.twins is None:
        return None
    import pandas as pd

    from ray_crm.assets import resolve_model

    frame = pd.read_parquet(cfg.data.twins, columns=["prompt", "response", "twin"])
    frame = frame[frame.twin.astype(str) != ""]
    enc = load_encoder(str(resolve_model(cfg.model.name)), cfg.model.max_length, cfg.data.template)
    encoded = enc.encode(frame.prompt.tolist(), frame.response.tolist())
    starts = None if encoded.response_starts is None else np.asarray(encoded.response_starts)
    return {"input_ids": encoded.input_ids, "token_type_ids": encoded.token_type_ids, "response_start": starts,
            "twin": frame.twin.to_numpy()}
