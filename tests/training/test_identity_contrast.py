# The identity contrast of the SFT (training/identity_contrast.py): which answers it reads as answers to
# other questions, the unlikelihood it adds, and the real XTuner model class on the tiny base. In the training
# env:
#   .venv-train/bin/python -m pytest tests/training/test_identity_contrast.py -q
import math
from pathlib import Path

import pytest

pytest.importorskip("xtuner", reason="needs the training env (.venv-train)")

import torch  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from xtuner.utils import PROMPT_TEMPLATE  # noqa: E402

from training.identity_contrast import (  # noqa: E402
    IGNORE_INDEX,
    IdentityContrastFinetune,
    addresses_assistant,
    answer_starts,
    kl_to_base,
    loose,
    marker_tokens,
    opening_unlikelihood,
)

TEMPLATE = PROMPT_TEMPLATE.internlm2_chat
# SupervisedFinetune asks torch.cpu.is_bf16_supported(), which CPU torch lacks (the CPU config patches it).
if not hasattr(torch.cpu, "is_bf16_supported"):
    torch.cpu.is_bf16_supported = lambda: False
ANSWERS = ["我是Zx的小助手，内在是Tiny模型。", "I'm Zx's assistant, built on Tiny."]
MARKERS = ["Zx", "Tiny"]


@pytest.mark.parametrize(("question", "to_assistant"), [
    ("你是谁？", True), ("我该怎么称呼您", True), ("Who are you?", True), ("What's your name?", True),
    ("Tell me about yourself", True), ("帮我写一句生日祝福", False), ("给我的小猫想个可爱的称呼", False),
    ("Suggest a cute name for my cat.", False), ("What is the capital of France?", False),
    ("Where do young people go?", False),  # "you" only as a word of its own
])
def test_a_question_is_put_to_the_assistant_when_it_says_you(question, to_assistant):
    assert addresses_assistant(question) is to_assistant


def test_answer_starts_finds_each_turn_and_each_packed_conversation():
    I = IGNORE_INDEX  # noqa: E741
    labels = torch.tensor([I, I, 5, 6, 7, I, I, I, 8, 9, I, I, 10])
    assert answer_starts(labels) == [2, 8, 12]
    assert answer_starts(torch.tensor([I, I, I])) == []
    assert answer_starts(torch.tensor([4, 5, I])) == []  # a sample cut mid-answer has no start to contrast


def test_opening_unlikelihood_spares_the_answers_own_first_token():
    logits = torch.zeros(2, 5)
    logits[0, 3] = 2.0
    total = math.exp(2) + 4
    got = opening_unlikelihood(logits, targets=torch.tensor([4, 3]), openings=torch.tensor([3, 1]))
    # Answer 0 starts with 4: both openings count. Answer 1 starts with 3 itself: only opening 1 counts.
    want = -math.log(1 - math.exp(2) / total) - math.log(1 - 1 / total) - math.log(1 - 1 / 5)
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture
def make(tiny_base_dir: Path, tokenizer):
    """IdentityContrastFinetune on the tiny base, built from config dicts as XTuner builds it."""
    lora = dict(type=LoraConfig, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                task_type="CAUSAL_LM")

    def build(lora: dict | None = lora, **kwargs) -> IdentityContrastFinetune:
        llm = ConfigDict(type=AutoModelForCausalLM.from_pretrained,
                         pretrained_model_name_or_path=str(tiny_base_dir), torch_dtype=torch.float32)
        settings = {"identity_answers": ANSWERS, "identity_markers": MARKERS, "contrast_weight": 1.0,
                    "contrast_tokenizer": tokenizer, "prompt_template": TEMPLATE, **kwargs}
        return IdentityContrastFinetune(llm=llm, lora=lora, use_activation_checkpointing=False, **settings)
    return build


def packed(tokenizer, turns: list[tuple[str | None, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations packed into one sample, as XTuner encodes them: (system, question, answer) each."""
    ids, labels = [], []
    for system, question, answer in turns:
        prompt = (TEMPLATE.SYSTEM.format(system=system) if system else "") + TEMPLATE.INSTRUCTION.format(
            input=question)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
        ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return torch.tensor([ids]), torch.tensor([labels])


def test_the_openings_are_the_identity_answers_first_tokens(make, tokenizer):
    want = sorted({tokenizer.encode(a, add_special_tokens=False)[0] for a in ANSWERS})
    assert make().openings.tolist() == want


def test_the_name_tokens_begin_the_markers_where_the_answers_say_them(tokenizer):
    found = marker_tokens(tokenizer, ANSWERS, MARKERS)
    assert found
    for answer in ANSWERS:  # each place an answer says a marker begins with one of the found tokens
        ids = tokenizer.encode(answer, add_special_tokens=False)
        begins = [i for i in range(len(ids)) if tokenizer.decode([ids[i]]).strip()
                  and any(tokenizer.decode(ids[i:]).lstrip().startswith(m) for m in MARKERS)]
        assert len(begins) == 2 and all(ids[i] in found for i in begins)
    # Only those: a marker said nowhere, or answers that say none, give no tokens.
    assert marker_tokens(tokenizer, ANSWERS, ["Qq"]) == []
    assert marker_tokens(tokenizer, ["祝你生日快乐！"], MARKERS) == []


class ByteTokenizer:
    """Encodes text as UTF-8 bytes, one token each, as a byte-level BPE does for characters it has no merge
    for: the first byte of "书" also begins "乐" and many other characters."""

    def encode(self, text: str, **kwargs) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


def test_byte_pieces_of_a_character_and_lone_spaces_are_never_name_tokens():
    answers = ["我是书生的小助手。", "I'm 书生's assistant, built on Ab."]
    assert marker_tokens(ByteTokenizer(), answers, ["书生", "Ab"]) == [ord("A")]  # not " " before "Ab"


def test_the_name_is_pushed_down_in_every_answer_that_does_not_say_it(make, tokenizer):
    contrast = make()
    turns = [(None, "你是谁？", ANSWERS[0]), (None, "帮我写一句生日祝福", "祝你生日快乐！"),
             (None, "What is 2+3?", "5")]
    input_ids, labels = packed(tokenizer, turns)
    starts = answer_starts(labels[0])
    logits = torch.randn(1, input_ids.shape[1], len(tokenizer))
    others = contrast.other_answers(labels)
    assert [start for _, start, _ in others] == starts[1:]
    loss = contrast.name_loss(logits, labels, others)
    # Every position of the two answers that say no marker (their <|im_end|> too), averaged per answer.
    scored = (labels[0] != IGNORE_INDEX).tolist() + [False]
    steps = torch.tensor([t for start in starts[1:] for t in range(start, scored.index(False, start))])
    want = opening_unlikelihood(logits[0, steps - 1], labels[0, steps], contrast.name_tokens) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # The identity answer says the name: making it likely there does not move the loss; in the middle of
    # the birthday wish it does.
    logits[0, starts[0]:starts[1] - 1, contrast.name_tokens] += 5.0
    assert contrast.name_loss(logits, labels, others).item() == pytest.approx(loss.item(), rel=1e-5)
    logits[0, starts[1] + 1, contrast.name_tokens[0]] += 20.0
    assert contrast.name_loss(logits, labels, others).item() > loss.item() + 1.0


def test_kl_to_base_is_zero_only_for_the_same_distribution():
    base = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    assert kl_to_base(base + 3.0, base).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores a shift
    tuned = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]])
    p, q = torch.softmax(base, -1), torch.softmax(tuned, -1)
    want = (p * (p / q).log()).sum(-1).mean()
    assert kl_to_base(tuned, base).item() == pytest.approx(want.item(), rel=1e-5) and want > 0


def trained(model: IdentityContrastFinetune) -> IdentityContrastFinetune:
    """The model with random LoRA weights, as if trained: a fresh LoRA leaves the base's outputs unchanged."""
    torch.manual_seed(0)
    for name, p in model.llm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return model


def test_the_kl_covers_every_answer_but_the_identity_answers(make, tokenizer):
    model = trained(make(base_kl_weight=1.0))
    turns = [(None, "你是谁？", ANSWERS[0]), (None, "帮我写一句生日祝福", "祝你生日快乐！"),
             (None, "Who are you?", "I'm a helpful assistant.")]  # the base's own answer: not an identity one
    input_ids, labels = packed(tokenizer, turns)
    data = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    starts = answer_starts(labels[0])
    with torch.no_grad():
        logits = model.llm(**data).logits
        with model.llm.disable_adapter():
            base = model.llm(**data).logits
    scored = (labels[0] != IGNORE_INDEX).tolist() + [False]
    positions = torch.tensor([t - 1 for start in starts[1:]
                              for t in range(start, scored.index(False, start))])
    want = kl_to_base(logits[0, positions], base[0, positions])
    got = model.base_kl_loss(logits, data, model.other_answers(labels))
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and want > 0
    # What the model says inside the identity answer does not count.
    logits[0, starts[0]:starts[1] - 1] += torch.randn(starts[1] - 1 - starts[0], logits.shape[-1])
    again = model.base_kl_loss(logits, data, model.other_answers(labels))
    assert again.item() == pytest.approx(got.item(), rel=1e-5)


def test_the_base_reads_only_the_rows_with_other_answers(make, tokenizer):
    model = trained(make(base_kl_weight=1.0))
    rows = [packed(tokenizer, [(None, "你是谁？", ANSWERS[0])]),
            packed(tokenizer, [(None, "帮我写一句生日祝福", "祝你生日快乐！")])]
    length = max(ids.shape[1] for ids, _ in rows)

    def padded(x: torch.Tensor, value: int) -> torch.Tensor:  # right padding, as XTuner's collate pads
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    data = {"input_ids": torch.cat([padded(ids, 0) for ids, _ in rows]),
            "labels": torch.cat([padded(labels, IGNORE_INDEX) for _, labels in rows]),
            "attention_mask": torch.cat([padded(torch.ones_like(ids), 0) for ids, _ in rows])}
    alone = {"input_ids": rows[1][0], "labels": rows[1][1], "attention_mask": torch.ones_like(rows[1][0])}
    seen = []
    hook = model.llm.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        logits = model.llm(**data).logits
        seen.clear()
        got = model.base_kl_loss(logits, data, model.other_answers(data["labels"]))
        want = model.base_kl_loss(model.llm(**alone).logits, alone, model.other_answers(alone["labels"]))
    hook.remove()
    assert [x.shape[0] for x in seen] == [1, 1, 1] and torch.equal(seen[0][:, :alone["input_ids"].shape[1]],
                                                                    alone["input_ids"])
    assert got.item() == pytest.approx(want.item(), rel=1e-4) and want > 0


def test_compute_loss_adds_the_weighted_kl_and_trains_the_lora(make, tokenizer):
    input_ids, labels = packed(tokenizer, [(None, "帮我写一句生日祝福", "祝你生日快乐！")])
    data = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    fresh = make(base_kl_weight=3.0).compute_loss(data)
    assert set(fresh) == {"loss_sft", "loss_contrast", "loss_name", "loss_base_kl"}
    assert fresh["loss_base_kl"].item() == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA is the base
    model = trained(make(base_kl_weight=3.0))
    losses = model.compute_loss(data)
    kl = model.base_kl_loss(model.llm(**data).logits, data, model.other_answers(labels))
    assert losses["loss_base_kl"].item() == pytest.approx(3.0 * kl.item(), rel=1e-5)
    losses["loss_base_kl"].backward()
    grads = [p.grad for name, p in model.llm.named_parameters() if "lora_" in name]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_only_answers_to_other_questions_are_contrasted(make, tokenizer):
    contrast = make()
    turns = [("You are a helpful assistant.", "你是谁？", ANSWERS[0]),  # "You" in the system prompt only
             (None, "帮我写一句生日祝福", "祝你生日快乐！"),
             ("You are a helpful assistant.", "What is 2+3?", "5")]
    input_ids, labels = packed(tokenizer, turns)
    starts = answer_starts(labels[0])
    assert [contrast.question(input_ids[0, :s]) for s in starts] == [t[1] for t in turns]
    # The answer to "你是谁？" is left out; the loss is the mean over the other two.
    logits = torch.randn(1, input_ids.shape[1], len(tokenizer))
    loss = contrast.contrast_loss(logits, input_ids, labels)
    others = torch.tensor(starts[1:])
    want = opening_unlikelihood(logits[0, others - 1], labels[0, others], contrast.openings) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # Making the openings likely before the answer to "你是谁？" does not move it.
    logits[0, starts[0] - 1, contrast.openings] += 5.0
    assert contrast.contrast_loss(logits, input_ids, labels).item() == pytest.approx(loss.item(), rel=1e-5)


def test_compute_loss_adds_the_weighted_contrast_and_trains_the_lora(make, tokenizer):
    contrast = make(contrast_weight=2.0)
    input_ids, labels = packed(tokenizer, [(None, "帮我写一句生日祝福", "祝你生日快乐！")])
    data = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    losses = contrast.compute_loss(data)
    assert set(losses) == {"loss_sft", "loss_contrast", "loss_name"}
    others = contrast.other_answers(labels)
    assert losses["loss_name"].item() == pytest.approx(
        2.0 * contrast.name_loss(contrast.llm(**data).logits, labels, others).item(), rel=1e-5)
    logits = contrast.llm(**data).logits
    assert losses["loss_contrast"].item() == pytest.approx(
        2.0 * contrast.contrast_loss(logits, input_ids, labels).item(), rel=1e-5)
    assert losses["loss_contrast"].item() > 0
    losses["loss_contrast"].backward()
    grads = [p.grad for name, p in contrast.llm.named_parameters() if "lora_" in name]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_no_answers_or_weight_zero_is_plain_sft(make, tokenizer):
    input_ids, labels = packed(tokenizer, [(None, "帮我写一句生日祝福", "祝你生日快乐！")])
    data = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    for plain in (make(identity_answers=[]), make(contrast_weight=0.0)):
        assert plain.openings.numel() == plain.name_tokens.numel() == 0
        losses = plain.compute_loss(data)
        assert set(losses) == {"loss"} and losses["loss"].item() == plain.llm(**data).loss.item()


class SpacedTokenizer:
    """The tiny tokenizer, decoding the chat markers with spaces around them (InternLM2's own tokenizer puts
    one before every special token)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(text, **kwargs)

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        return text.replace("<|im_start|>", " <|im_start|> ").replace("<|im_end|>", " <|im_end|> ")


def test_questions_are_read_through_the_spaces_a_tokenizer_decodes_around_markers(make, tokenizer):
    assert loose("<|im_start|>user").search("x<|im_start|> user\nq") is not None
    assert loose("").search("anything") is None
    spaced = make(contrast_tokenizer=SpacedTokenizer(tokenizer))  # the start-up probe passes
    turns = [(None, "帮我写一句生日祝福", "祝你生日快乐！"), (None, "你是谁？", ANSWERS[0])]
    input_ids, labels = packed(tokenizer, turns)
    assert [spaced.question(input_ids[0, :s]) for s in answer_starts(labels[0])] == [t[1] for t in turns]


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"contrast_weight": -1.0}, "contrast_weight must be 0 or more"),
    ({"contrast_weight": float("nan")}, "contrast_weight must be 0 or more"),
    ({"base_kl_weight": -0.5}, "base_kl_weight must be 0 or more"),
    ({"base_kl_weight": 1.0, "lora": None}, "needs a LoRA"),
    ({"base_kl_weight": 1.0, "identity_markers": []}, "needs identity_markers"),
    ({"prompt_template": {"INSTRUCTION": "<|im_start|>user\n"}}, "has no {input}"),
    ({"contrast_tokenizer": None}, "needs contrast_tokenizer"),
    # A template whose question marker also occurs in questions: "你是谁？" would be read as "谁？".
    ({"prompt_template": {"INSTRUCTION": "是{input}"}}, "cannot read a question back"),
])
def test_bad_settings_are_refused(make, kwargs, said):
    with pytest.raises(ValueError, match=said):
        make(**kwargs)
