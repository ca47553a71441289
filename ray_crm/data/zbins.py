"""Z values and bin ids of responses, with the extractors and bins recorded in a prepare manifest.

The one code path for measuring Z: prepare uses it for every split, and PPO reward actors load it from the
manifest to bin their rollouts exactly as the reward model's training data was binned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ray_crm.config import SpuriousConfig
from ray_crm.data.binning import Binning
from ray_crm.data.spurious import CountTokens, extract


class ResponseBinner:
    def __init__(
        self, specs: Sequence[SpuriousConfig], binning: Binning | None = None, count_tokens: CountTokens | None = None
    ) -> None:
        self.specs = list(specs)
        self.binning = binning
        self.count_tokens = count_tokens

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ResponseBinner:
        """Extractors, fitted bins and (for length in tokens) the tokenizer of a prepared dataset."""
        specs = [SpuriousConfig.model_validate(s) for s in manifest["spurious"]]
        count_tokens = None
        if any(s.kind == "length" and s.unit == "tokens" for s in specs):
            from ray_crm.data.encode import load_encoder

            tok = manifest["tokenizer"]
            count_tokens = load_encoder(tok["path"], tok["max_length"], tok["mode"]).count_tokens
        return cls(specs, Binning.from_dict(manifest["binning"]), count_tokens)

    def values(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        side: Literal["chosen", "rejected"] = "chosen",
        columns: Mapping[str, Sequence[str | None]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Z of each response, per spurious variable."""
        return {s.name: extract(s, prompts, responses, side, columns, self.count_tokens) for s in self.specs}

    def bins(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        columns: Mapping[str, Sequence[str | None]] | None = None,
    ) -> np.ndarray:
        """Joint bin id of each response, in [0, num_bins)."""
        if self.binning is None:
            raise ValueError("no bins fitted yet: build the binner from a prepare manifest")
        return self.binning.apply(self.values(prompts, responses, "chosen", columns))
