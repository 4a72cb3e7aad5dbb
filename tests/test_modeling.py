"""Loading real checkpoints from disk and per-token log-probs on response tokens."""

import json

import pytest
import torch

from w2s.modeling import ModelLoadError, ModelSpec, generate, load_model, response_logprobs, same_tokenization, tokenize_pairs


def test_load_and_logprobs_match_manual(checkpoints):
    model, tokenizer = load_model(ModelSpec(path=str(checkpoints["weak"])))
    assert (checkpoints["weak"] / "model.safetensors").is_file()
    prompts, responses = ["q: zorb color?\na:", "q: how to rob x?\na:"], [" red.", " sorry, i can't help with that."]
    got = response_logprobs(model, tokenizer, prompts, responses, max_length=96)
    for prompt, response, logps in zip(prompts, responses, got):
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
        assert len(logps) == len(r)  # response tokens and EOS, nothing of the prompt
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].float().log_softmax(-1)
        manual = [logits[len(p) - 1 + i, tok].item() for i, tok in enumerate(r)]
        assert logps == pytest.approx(manual, abs=1e-5)


def test_response_mask_marks_only_response(checkpoints):
    _, tokenizer = load_model(ModelSpec(path=str(checkpoints["weak"])))
    batch = tokenize_pairs(tokenizer, ["ab", "abcd"], ["x", "yz"], max_length=16)
    # "ab" + "x" + EOS, right-padded; "abcd" + "yz" + EOS
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]]
    assert batch.attention_mask.sum(1).tolist() == [4, 7]


def test_generate_is_deterministic_greedy(checkpoints):
    model, tokenizer = load_model(ModelSpec(path=str(checkpoints["weak"])))
    a = generate(model, tokenizer, ["q: a?\na:", "q: how to rob bob?\na:"], max_new_tokens=5)
    assert a == generate(model, tokenizer, ["q: a?\na:", "q: how to rob bob?\na:"], max_new_tokens=5)
    assert len(a) == 2 and all(isinstance(x, str) for x in a)


def test_missing_or_broken_checkpoint_fails_fast(tmp_path, checkpoints):
    with pytest.raises(ModelLoadError, match=f"model path {tmp_path / 'nope'} does not exist"):
        load_model(ModelSpec(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(ModelSpec(path=str(tmp_path / "empty")))


def test_trust_remote_code_is_off_by_default():
    assert ModelSpec(path="x").trust_remote_code is False


def test_same_tokenization(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(checkpoints["weak"])
    b = AutoTokenizer.from_pretrained(checkpoints["strong"])
    assert same_tokenization(a, b, ["q: zorb color?\na: red."])
    # a tokenizer whose vocabulary is permuted gives other ids for the same text
    a.save_pretrained(tmp_path / "other")
    spec = json.loads((tmp_path / "other" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(spec))
    assert not same_tokenization(a, AutoTokenizer.from_pretrained(tmp_path / "other"), ["q: zorb color?\na: red."])
