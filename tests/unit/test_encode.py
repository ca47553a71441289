"""Pair tokenization: BERT text pairs, decoder chat templates, truncation that is counted."""

from __future__ import annotations

from transformers import AutoTokenizer

from ray_crm.data.encode import PairEncoder


def test_text_pair_matches_the_tokenizer_and_truncates_long_pairs(tiny_bert_dir):
    enc = PairEncoder(str(tiny_bert_dir), max_length=16)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    prompts, responses = ["the movie", "the film was"], ["great fun", " ".join(["very good"] * 20)]
    out = enc.encode(prompts, responses)
    assert enc.mode == "text_pair" and enc.type_ids
    assert out.input_ids[0] == tok("the movie", "great fun")["input_ids"]
    assert out.token_type_ids[0] == tok("the movie", "great fun")["token_type_ids"]
    assert out.lengths[1] > 16 and len(out.input_ids[1]) == 16 == len(out.token_type_ids[1])
    assert out.input_ids[1][-1] == tok.sep_token_id  # truncated as a pair: still ends with [SEP]
    alone = [len(ids) for ids in tok(responses, add_special_tokens=False)["input_ids"]]
    assert enc.count_tokens(responses) == alone  # remembered from the pair encoding
    enc.forget()
    assert enc.count_tokens(responses) == alone  # tokenized afresh


def test_chat_template_for_decoder_tokenizers_keeps_the_end(tiny_llama_dir):
    enc = PairEncoder(str(tiny_llama_dir), max_length=12)
    assert enc.mode == "chat" and not enc.type_ids
    out = enc.encode(["the movie"], ["great fun " * 10])
    full = AutoTokenizer.from_pretrained(tiny_llama_dir)(enc.chat_text("the movie", "great fun " * 10),
                                                          add_special_tokens=False)["input_ids"]
    assert out.lengths == [len(full)] and out.input_ids[0] == full[-12:]
    assert PairEncoder(str(tiny_llama_dir), 12, template="text_pair").mode == "text_pair"


def test_chat_response_start_marks_the_answer_also_after_left_truncation(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    enc = PairEncoder(str(tiny_llama_dir), max_length=64)
    out = enc.encode(["the movie was", "a film"], ["great fun", "bad"])
    for ids, start, response in zip(out.input_ids, out.response_starts, ["great fun", "bad"]):
        answer = tok.decode(ids[start:])
        assert answer.startswith(response) and "<|assistant|>" in tok.decode(ids[:start])
    short = PairEncoder(str(tiny_llama_dir), max_length=out.lengths[0] - 2).encode(["the movie was"], ["great fun"])
    assert short.response_starts[0] == out.response_starts[0] - 2  # the cut came off the prompt
    tiny = PairEncoder(str(tiny_llama_dir), max_length=3).encode(["the movie was"], ["great fun very good"])
    assert tiny.response_starts == [0]  # the prompt was cut away entirely
