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


def test_max_length_is_the_models_positions_or_refused_above_them(checkpoints):
    from w2s.modeling import model_positions, resolve_max_length

    positions = {"weak": model_positions(checkpoints["weak"]), "strong": model_positions(checkpoints["strong"])}
    assert positions == {"weak": 96, "strong": 96}  # GPTSize's n_positions, read from config.json
    assert resolve_max_length(None, positions) == 96
    assert resolve_max_length(64, positions) == 64
    with pytest.raises(ModelLoadError, match=r"max_length 512 is more than weak can take \(96 positions\)"):
        resolve_max_length(512, positions)


def test_weights_fingerprint_follows_the_weights_not_the_path(checkpoints, tmp_path):
    """A checkpoint retrained in place must not reuse what was keyed on its old weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from w2s.modeling import weights_fingerprint

    copy = tmp_path / "weak"
    shutil.copytree(checkpoints["weak"], copy)
    assert weights_fingerprint(copy) == weights_fingerprint(checkpoints["weak"])  # same weights, another path
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint(copy) != weights_fingerprint(checkpoints["weak"])


def test_generation_with_no_room_is_refused_not_crashed(checkpoints):
    from w2s.modeling import TooLongError

    model, tokenizer = load_model(ModelSpec(path=str(checkpoints["weak"])))
    with pytest.raises(TooLongError, match=r"a prompt of 6 tokens \+ max_new_tokens 91 > the model's 96 positions"):
        generate(model, tokenizer, ["q: a?", "q: ab?"], max_new_tokens=91, max_length=96)


def test_selective_log_softmax_equals_the_full_one_in_value_and_gradient(monkeypatch):
    """A few rows at a time, the same numbers as the full float32 log-softmax gathered, bit for bit."""
    import w2s.modeling as modeling

    torch.manual_seed(0)
    logits = (torch.randn(5, 7, 301) * 4).requires_grad_()
    targets = torch.randint(0, 301, (5, 7))
    full = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (full_grad,) = torch.autograd.grad(full.sum(), logits)
    monkeypatch.setattr(modeling, "LOG_SOFTMAX_CHUNK", 2 * 7 * 301)  # 2 rows a chunk: 3 chunks
    chunked = modeling.selective_log_softmax(logits, targets)
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), logits)
    assert torch.equal(chunked, full) and torch.equal(chunked_grad, full_grad)
    half = modeling.selective_log_softmax(logits.detach().bfloat16(), targets)  # bf16 logits, float32 maths
    assert half.dtype == torch.float32 and torch.allclose(half, full.detach(), atol=0.1)


def test_a_call_is_split_into_passes_of_like_length_that_fit_the_token_budget():
    from w2s.modeling import scoring_runs

    # shortest first; padded size = rows x longest: 3 rows of 10 fit 40, then 2 of 20, and a 50-token row alone
    assert scoring_runs([10, 10, 10, 50, 20, 20], 40) == [[0, 1, 2], [4, 5], [3]]
    assert scoring_runs([5, 30, 5], 40) == [[0, 2], [1]]
    # past 8 rows, a row over 1.25 times the pass's shortest starts the next pass; before, it does not
    assert scoring_runs([10] * 8 + [13, 12], 10**6) == [[0, 1, 2, 3, 4, 5, 6, 7, 9], [8]]
    assert scoring_runs([5, 30], 10**6) == [[0, 1]]
    assert scoring_runs([], 40) == []


def test_scoring_under_a_token_budget_gives_the_unsplit_numbers(checkpoints):
    model, tokenizer = load_model(ModelSpec(path=str(checkpoints["strong"])))
    prompts = ["q: zorb color?\na:", "q: how to rob x?\na:", "q: a?\na:"]
    responses = [" red.", " sorry, i can't help with that.", " blue."]
    whole = response_logprobs(model, tokenizer, prompts, responses, max_length=96)
    split = response_logprobs(model, tokenizer, prompts, responses, max_length=96, max_tokens=40)  # one row a call
    assert [len(r) for r in split] == [len(r) for r in whole]
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(split, whole))


def test_a_bos_tokenizer_gets_one_bos_before_every_prompt():
    """A Llama-style tokenizer puts BOS first by default; the project encodes without special tokens, so the
    prompt gets it back once: a plain prompt that writes "<s>" keeps it as text, and a chat-rendered prompt
    whose template already starts with BOS gets no second one. A tokenizer without one gets none."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from w2s.modeling import encode_prompts, pair_ids

    vocab = {"<s>": 0, "</s>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    inner.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>")
    assert encode_prompts(tokenizer, ["ab", "<s>ab"]) == [[0, 67, 68], [0, 30, 85, 32, 67, 68]]
    assert pair_ids(tokenizer, ["ab"], ["c"]) == [([0, 67, 68], [69, 1])]
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert encode_prompts(tokenizer, ["<s>ab"]) == [[0, 67, 68]]
    inner.post_processor = None
    assert encode_prompts(PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>"),
                          ["ab"]) == [[67, 68]]


def test_logits_only_at_response_tokens_equal_the_full_forward(checkpoints, tmp_path):
    """token_logprobs asks a transformers model for logits at response positions only (boolean logits_to_keep):
    the same log-probs and gradients as the full forward, for GPT-2 and for a Llama under a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from w2s.modeling import LlamaSize, _keeps_logits_by_mask, init_llama, token_logprobs

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["weak"])
    llama = init_llama(LlamaSize(n_layer=1, hidden_size=16, n_head=2, intermediate_size=32), tokenizer, tmp_path / "l")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    models = [load_model(ModelSpec(path=str(checkpoints["weak"])))[0],
              get_peft_model(AutoModelForCausalLM.from_pretrained(llama), lora)]
    batch = tokenize_pairs(tokenizer, ["q: zorb color?\na:", "q: a?\na:"], [" red.", " sorry, no."], max_length=64)
    for model in models:
        assert _keeps_logits_by_mask(model)
        params = [p for p in model.parameters() if p.requires_grad]
        picked = token_logprobs(model, batch)
        picked_grads = torch.autograd.grad(picked.sum(), params)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        full = torch.log_softmax(logits.float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        full = full * batch.response_mask[:, 1:]
        full_grads = torch.autograd.grad(full.sum(), params)
        assert picked.shape == full.shape and torch.allclose(picked, full, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(picked_grads, full_grads))
