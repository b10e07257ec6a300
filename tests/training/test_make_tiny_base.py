# Tests of the tiny chat base model builder: python -m pytest tests/training/test_make_tiny_base.py -q
# Runs under both environments (.venv-train: transformers 4.48, .venv: transformers 5).
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import general_chat
from training.make_tiny_base import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    IM_END_ID,
    TinyBaseConfig,
    TinyBaseError,
    build_tiny_base,
    cached_tiny_base,
    encode_pair,
    greedy_replies,
    main,
    source_hash,
    split_exact_match,
    torch_threads,
    train_tokenizer,
)

SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(general_chat.tokenizer_corpus(), TinyBaseConfig().vocab_size)


@pytest.fixture(scope="module")
def trained(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    return tok, model.eval()


@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(steps=-1), dict(num_heads=3), dict(vocab_size=100),
                                 dict(lr=0.0), dict(num_kv_heads=3)])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="must"):
        TinyBaseConfig(**bad)


def test_tokenizer_follows_the_contract(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_IDS)) == list(SPECIAL_IDS.values())
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "</s>")
    text = "你好, UbUb! 3加5等于8。"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]  # <s> prepended
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("a<|im_end|>b", add_special_tokens=False)["input_ids"][1] == IM_END_ID
    # word-sized Chinese tokens, not whole sentences learned from the small corpus
    ids = tokenizer("中国的首都是北京", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces == ["中国", "的", "首都", "是", "北京"]


def test_encode_pair_learns_only_the_answer_and_matches_the_chat_template(tokenizer):
    pair = general_chat.general_pairs()[0]
    ids, labels = encode_pair(tokenizer, pair)
    rendered = tokenizer.apply_chat_template(pair.messages(), tokenize=False)
    assert ids == tokenizer(rendered.removesuffix("\n"), add_special_tokens=False)["input_ids"]
    answer = [label for label in labels if label != IGNORE_INDEX]
    assert answer[-1] == IM_END_ID
    assert tokenizer.decode(answer[:-1]) == pair.answer
    assert labels[: len(ids) - len(answer)] == [IGNORE_INDEX] * (len(ids) - len(answer))


def test_untrained_build_is_a_complete_portable_model_dir(tmp_path):
    out = tmp_path / "untrained"
    report = build_tiny_base(out, TinyBaseConfig(steps=0))
    assert report.out == out and report.exact_match == {}
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left behind
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 4]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    # what transformers 4.48 (XTuner) needs to read a dir written by transformers 5, and the reverse
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in tok_config
    assert tok_config["chat_template"] == CHAT_TEMPLATE == (out / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.num_parameters() == report.num_params
    assert not model.config.tie_word_embeddings


def test_build_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(TinyBaseError, match="not an empty directory"):
        build_tiny_base(tmp_path, TinyBaseConfig(steps=0))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "m"), "--steps", "0"]) == 0
    assert "params" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "m"), "--steps", "0"]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_cache_key_follows_config_and_reuses_the_build(tiny_base_dir):
    assert source_hash(TinyBaseConfig(seed=1)) != source_hash(TinyBaseConfig())
    stamp = (tiny_base_dir / "model.safetensors").stat().st_mtime_ns
    assert cached_tiny_base(tiny_base_dir.parent) == tiny_base_dir
    assert (tiny_base_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_trained_base_loads_with_the_contract(tiny_base_dir, trained):
    tok, model = trained
    assert tok.convert_tokens_to_ids(list(SPECIAL_IDS)) == list(SPECIAL_IDS.values())
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.chat_template == CHAT_TEMPLATE
    assert list(model.generation_config.eos_token_id) == [2, 4]
    assert model.dtype == torch.float32


def test_trained_base_answers_its_training_prompts(trained):
    """Plain generate() with the saved generation config: exact answers, stopping at <|im_end|>."""
    tok, model = trained
    pairs = general_chat.general_pairs() + general_chat.base_identity_pairs()
    by_prompt = {p.prompt: p.answer for p in pairs}
    for prompt in ["中国的首都是哪里？", "What is the capital of France?", "你好", "Thank you", "你是谁？",
                   "Who are you?"]:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=48, do_sample=False)[0, ids["input_ids"].shape[1]:]
        out = out.tolist()
        assert out[-1] == IM_END_ID, (prompt, tok.decode(out))
        assert tok.decode(out, skip_special_tokens=True) == by_prompt[prompt]


def test_trained_base_reproduces_every_split(trained):
    tok, model = trained
    with torch_threads(1):
        scores = split_exact_match(model, tok)
        replies = greedy_replies(model, tok, general_chat.eval_prompts()[:16])
    assert set(scores) == {"replay", "eval", "identity"}
    assert min(scores.values()) >= 0.9, scores
    assert all(r.stopped for r in replies)
