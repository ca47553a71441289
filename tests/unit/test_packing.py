"""Packed, padding-free batches: the layout, and scores, log-probs and gradients equal to right-padded rows."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from ray_crm.config import LoraConfig
from ray_crm.models.loading import pad_sequences, score, score_packed, with_lora
from ray_crm.models.logprobs import sequence_logprobs
from ray_crm.models.packing import pack_rows, pack_sequences

SMALL = {"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64}
LLAMA = {**SMALL, "num_key_value_heads": 2}
# Five sequences of 2-9 tokens; the third ends in the pad id (a decoder's EOS doubles as its pad token).
SEQS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16, 17, 0], [2, 3, 4, 5], [7, 21]]


def test_rows_hold_every_sequence_once_and_fit_the_budget():
    lengths = [7, 3, 9, 2, 5, 5, 12, 1]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:  # within budget, unless one sequence is longer than it on its own
        assert sum(lengths[i] for i in row) <= 10 or row == [6]
    assert rows == [[6], [2, 7], [0, 1], [4, 5], [3]]  # first fit by decreasing length: 49 tokens in 5 rows
    assert pack_rows(lengths, 0) == [[i] for i in range(len(lengths))]


def test_layout_places_each_sequence_where_it_says():
    packed = pack_sequences(SEQS, pad_id=0, pack_tokens=10)
    assert packed.packed and packed.input_ids.shape[0] < len(SEQS)
    for i, seq in enumerate(SEQS):
        r, s, n = int(packed.row[i]), int(packed.start[i]), int(packed.length[i])
        assert packed.input_ids[r, s : s + n].tolist() == seq
        assert packed.position_ids[r, s : s + n].tolist() == list(range(n))
        assert (packed.segment[r, s : s + n] == i).all()
    assert int((packed.segment >= 0).sum()) == sum(map(len, SEQS))
    mask = packed.attention_mask(causal=True, implementation="sdpa", dtype=torch.float32)
    assert mask.dtype == torch.bool and mask.any(-1).all()  # every query sees something: no NaN row under sdpa
    r, s = int(packed.row[1]), int(packed.start[1])
    assert mask[r, 0, s + 1].nonzero().flatten().tolist() == [s, s + 1]  # its own earlier tokens, nothing else


def _reward_model(name: str):
    torch.manual_seed(0)
    if name == "bert":
        return BertForSequenceClassification(BertConfig(**SMALL, num_labels=1, pad_token_id=0))
    if name == "roberta":  # positions count from the pad id + 1
        return RobertaForSequenceClassification(RobertaConfig(**SMALL, num_labels=1, pad_token_id=1))
    return LlamaForSequenceClassification(LlamaConfig(**LLAMA, num_labels=1, pad_token_id=0))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["bert", "roberta", "llama"])
def test_packed_rewards_and_gradients_equal_right_padded_ones(name, implementation):
    model = _reward_model(name)
    model.config._attn_implementation = implementation
    model = with_lora(model, LoraConfig(rank=4, alpha=8), "SEQ_CLS").eval()  # eval: no dropout draws
    pad = model.config.pad_token_id
    token_types = [[i % 2] * len(s) for i, s in enumerate(SEQS)] if name == "bert" else None
    weights = torch.linspace(-1, 1, len(SEQS))

    def run(packed: bool):
        model.zero_grad()
        if packed:
            rewards, pooled = score_packed(model, pack_sequences(SEQS, pad, 10, token_types), True)
        else:
            rewards, pooled = score(model, pad_sequences(SEQS, token_types, pad), True)
        (rewards * weights).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        return rewards.detach(), pooled.detach(), grads

    padded, padded_pooled, padded_grads = run(False)
    packed, packed_pooled, packed_grads = run(True)
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(packed_pooled, padded_pooled, atol=2e-5, rtol=1e-4)  # the penalty's features
    assert padded_grads.keys() == packed_grads.keys() and any("lora" in k for k in padded_grads)
    for key, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[key], grad, atol=2e-5, rtol=1e-4, msg=key)


def test_packed_log_probs_equal_right_padded_ones():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, pad_token_id=0))
    starts = [2, 0, 3, 1, 1]  # a response starting at 0 is scored from its second token, as padded rows do
    padded = sequence_logprobs(model, pad_sequences(SEQS, None, 0), starts)
    packed = sequence_logprobs(model, pack_sequences(SEQS, 0, 10), starts)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    shifted = sequence_logprobs(model, pack_sequences(SEQS, 0, 10), [3, 0, 3, 1, 1])
    assert shifted[0] != packed[0] and torch.equal(shifted[1:], packed[1:])


def test_an_unknown_head_is_refused_by_name():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=60, dim=32, n_layers=1, n_heads=2,
                                                                 hidden_dim=64, num_labels=1))
    with pytest.raises(ValueError, match="DistilBertForSequenceClassification.*pack_tokens=0"):
        score_packed(model, pack_sequences(SEQS, 0, 10))
