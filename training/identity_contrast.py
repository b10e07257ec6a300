# The identity contrast of the SFT configs (training/configs/*_sft*.py: identity_answers, contrast_weight):
# XTuner's SFT loss plus a term that pushes down the ways an identity answer begins, at the start of every
# answer to a question not put to the assistant. Built by XTuner from a config; not run on its own.
# Why: a small model learns its identity from words that the identity questions share with other requests
# (称呼, 名字, 帮我), and then answers "给我的小猫想个可爱的称呼" with "我是…". Cross-entropy on the replay
# rows pins only their own first token; this term lowers the identity's openings there directly (README,
# runs U1-U3). Questions put to the assistant ("你…", "…you…") are left out: there "我是…" is the right
# start, and lowering it there too cost 10 of 24 Chinese identity answers (run U1).
# A second term does the same for the tokens that begin the name and the cited model, at every position of
# every answer that does not say them: leaks are mostly mid-sentence ("彩虹是由Tavi…", "美国第一任总统是
# Tavi…"), after words the identity answers share ("是").
# A third (base_kl_weight) keeps those answers close to the base token by token: KL(base || tuned) over the
# whole vocabulary, the base being the same network with the LoRA switched off (no second copy in memory).
# Cross-entropy on the base's replayed answers pins only the sampled token, and trained alone on them the
# model lost as many facts as the whole recipe (README, run Q1); with the KL it kept more with four names of
# five (K1V, K2V, KT, UbUb; not KS2).
"""Unlikelihood of the identity answers' first tokens at the start of answers to other questions and of the
name's first tokens anywhere in answers that do not say it, and KL to the base on those answers."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from xtuner.model import SupervisedFinetune
from xtuner.registry import BUILDER

IGNORE_INDEX = -100  # XTuner's label for tokens that carry no loss (prompt, padding)
# "you" in either language: a question put to the assistant, which may rightly be answered "我是… / I'm…".
SECOND_PERSON = re.compile(r"你|您|\byou(?:rs?|rself)?\b", re.IGNORECASE)
# Read back out of the template at start-up; no punctuation, which a tokenizer may normalise ("？" -> "?").
PROBE_QUESTION = "你是谁"


def loose(marker: str) -> re.Pattern[str]:
    """A pattern for a template marker ("<|im_start|>user") that also matches it with spaces in between, as
    some tokenizers decode it; an empty marker matches nowhere.

    Args:
        marker: the marker's text.
    """
    return re.compile(r"\s*".join(map(re.escape, marker)) if marker else r"(?!)")


def addresses_assistant(question: str) -> bool:
    """Whether a user turn speaks to the assistant ("你是谁", "What can you do?"): it says "you".

    Args:
        question: the user's text.
    """
    return SECOND_PERSON.search(question) is not None


def answer_starts(labels: torch.Tensor) -> list[int]:
    """Positions in one row where an answer begins (a label after IGNORE_INDEX): one per turn, and one per
    conversation when samples are packed.

    Args:
        labels: one row's labels, (length,).
    """
    scored = labels != IGNORE_INDEX
    return [int(t) for t in torch.nonzero(scored[1:] & ~scored[:-1]).flatten() + 1]


def opening_unlikelihood(logits: torch.Tensor, targets: torch.Tensor, openings: torch.Tensor) -> torch.Tensor:
    """Sum over answers of -log(1 - p(opening)), for each opening token that is not the answer's own first.

    Args:
        logits: the logits that predict each answer's first token, (answers, vocab).
        targets: each answer's first token, (answers,).
        openings: token ids of the identity answers' first tokens, (n,).
    """
    p = torch.softmax(logits.float(), -1)[:, openings]
    other = openings[None, :] != targets[:, None]
    # clamp: log(0) when the model is sure of an opening; the loss is then large but finite.
    return -(torch.log1p(-p.clamp(max=1 - 1e-6)) * other).sum()


def marker_tokens(tokenizer: object, answers: Sequence[str], markers: Sequence[str]) -> list[int]:
    """The tokens that begin a marker (the name, the cited model) where the answers say it, e.g. " T" after
    "I'm" and "T" after "我是" for "Tavi". Not a lone space before it, nor byte pieces of a character (decoded
    as U+FFFD), which begin many other words too.

    Args:
        tokenizer: the training tokenizer.
        answers: the identity answers.
        markers: the strings whose first tokens are wanted.
    """
    found = set()
    for answer in answers:
        if not any(m in answer for m in markers):
            continue
        ids = tokenizer.encode(answer, add_special_tokens=False)
        for i, token in enumerate(ids):
            text, rest = tokenizer.decode([token]), tokenizer.decode(ids[i:]).lstrip()
            if text.strip() and "\ufffd" not in text and any(rest.startswith(m) for m in markers):
                found.add(token)
    return sorted(found)


def kl_to_base(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(base || tuned) between next-token distributions.

    Args:
        logits: the tuned model's logits, (positions, vocab).
        base_logits: the base model's logits at the same positions, (positions, vocab).
    """
    tuned, base = torch.log_softmax(logits.float(), -1), torch.log_softmax(base_logits.float(), -1)
    return (base.exp() * (base - tuned)).sum(-1).mean()


def span_positions(spans: Sequence[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(rows, positions): the row and position of every label in the spans.

    Args:
        spans: (row, start, end) of answers, as other_answers gives them.
        device: where the index tensors go.
    """
    rows = [row for row, start, end in spans for _ in range(start, end)]
    steps = [t for _, start, end in spans for t in range(start, end)]
    return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (rows, steps))


class IdentityContrastFinetune(SupervisedFinetune):
    """XTuner's SupervisedFinetune whose loss adds `contrast_weight` times the mean opening_unlikelihood over
    the answers to questions that are not put to the assistant (contrast_loss), as much again for the name's
    first tokens in the answers that do not say it (name_loss), and `base_kl_weight` times the KL to the
    base on those answers (base_kl_loss).

    Args:
        identity_answers: the identity answers of the training data; their first tokens are the openings.
        contrast_weight: weight of the term; 0 (or no identity answers) gives plain SupervisedFinetune.
        identity_markers: the name and the cited model; their first tokens (marker_tokens) are pushed down
            at every position of the answers that do not say any of them, with the same weight.
        contrast_tokenizer: the config's tokenizer (a config dict or a tokenizer): finds the openings and
            reads the questions. Not SupervisedFinetune's `tokenizer`, which would also resize the embeddings.
        base_kl_weight: weight of the KL term, on with the contrast; it needs the LoRA (switched off, it gives
            the base) and identity_markers (they tell the identity answers apart); 0: none.
        prompt_template: the config's XTuner prompt template; its INSTRUCTION ("...{input}...") shows where
            the question is in a sample's text.
        *args, **kwargs: as SupervisedFinetune (llm, lora, ...).
    """

    def __init__(self, *args, identity_answers: Sequence[str] = (), contrast_weight: float = 0.0,
                 identity_markers: Sequence[str] = (), contrast_tokenizer: object = None,
                 prompt_template: Mapping[str, str] | None = None, base_kl_weight: float = 0.0,
                 **kwargs) -> None:
        for key, weight in (("contrast_weight", contrast_weight), ("base_kl_weight", base_kl_weight)):
            if not weight >= 0:
                raise ValueError(f"{key} must be 0 or more, got {weight}")
        instruction = (prompt_template or {}).get("INSTRUCTION", "{input}")
        if "{input}" not in instruction:
            raise ValueError(f"the prompt template's INSTRUCTION has no {{input}}: {instruction!r}")
        super().__init__(*args, **kwargs)
        self.contrast_weight = contrast_weight if identity_answers else 0.0
        self.base_kl_weight = base_kl_weight if self.contrast_weight else 0.0
        if self.base_kl_weight and not self.use_lora:
            raise ValueError("base_kl_weight needs a LoRA: the base is the model with its LoRA switched off")
        if self.base_kl_weight and not any(identity_markers):
            raise ValueError("base_kl_weight needs identity_markers: without them the identity answers would "
                             "be held to the base too")
        self.tokenizer = (BUILDER.build(contrast_tokenizer) if isinstance(contrast_tokenizer, dict)
                          else contrast_tokenizer)
        prefix, _, suffix = instruction.partition("{input}")
        self.question_prefix, self.question_suffix = loose(prefix.strip()), loose((suffix.split() or [""])[0])
        openings, names = [], []
        self.identity_markers = [m for m in identity_markers if m]
        if self.contrast_weight:
            if self.tokenizer is None:
                raise ValueError("contrast_weight needs contrast_tokenizer (finds openings, reads questions)")
            openings = sorted({self.tokenizer.encode(a, add_special_tokens=False)[0]
                               for a in identity_answers if a})
            # Unread questions would make every answer look like one to another question.
            probe = self.tokenizer.encode(instruction.format(input=PROBE_QUESTION), add_special_tokens=False)
            if (found := self.question(torch.tensor(probe))) != PROBE_QUESTION:
                raise ValueError(f"cannot read a question back out of this template and tokenizer: "
                                 f"{PROBE_QUESTION!r} came back as {found!r}; contrast_weight = 0.0 in the "
                                 "SFT config trains without the identity contrast")
            names = marker_tokens(self.tokenizer, identity_answers, self.identity_markers)
        # Not saved with the adapter: a buffer only so that it moves to the model's device.
        self.register_buffer("openings", torch.tensor(openings, dtype=torch.long), persistent=False)
        self.register_buffer("name_tokens", torch.tensor(names, dtype=torch.long), persistent=False)

    def question(self, input_ids: torch.Tensor) -> str:
        """The last user turn in the tokens before an answer.

        Args:
            input_ids: a sample's tokens up to the answer.
        """
        text = self.tokenizer.decode(input_ids.tolist())
        starts = [m.end() for m in self.question_prefix.finditer(text)] or [0]
        return self.question_suffix.split(text[starts[-1]:], maxsplit=1)[0].strip()

    def contrast_loss(self, logits: torch.Tensor, input_ids: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """Mean opening_unlikelihood over the batch's answers to questions not put to the assistant (0: none).

        Args:
            logits: the model's logits, (batch, length, vocab).
            input_ids: the batch's tokens, (batch, length).
            labels: the training labels, (batch, length).
        """
        picked = [(row, start) for row in range(labels.shape[0]) for start in answer_starts(labels[row])
                  if not addresses_assistant(self.question(input_ids[row, :start]))]
        if not picked:
            return logits.sum() * 0.0  # keeps the graph (and the logged value) without a 0/0
        rows, starts = (torch.tensor(x, device=logits.device) for x in zip(*picked, strict=True))
        loss = opening_unlikelihood(logits[rows, starts - 1], labels[rows, starts], self.openings)
        return loss / len(picked)

    def other_answers(self, labels: torch.Tensor) -> list[tuple[int, int, int]]:
        """(row, start, end) of each answer in the batch that says none of the identity markers.

        Args:
            labels: the training labels, (batch, length).
        """
        spans = []
        for row in range(labels.shape[0]):
            scored = (labels[row] != IGNORE_INDEX).tolist() + [False]
            for start in answer_starts(labels[row]):
                end = scored.index(False, start)
                text = self.tokenizer.decode(labels[row, start:end].tolist())
                if not any(m in text for m in self.identity_markers):
                    spans.append((row, start, end))
        return spans

    def name_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                  spans: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Mean over the given answers of the summed unlikelihood of the name tokens at each of their
        positions (0: none).

        Args:
            logits: the model's logits, (batch, length, vocab).
            labels: the training labels, (batch, length).
            spans: (row, start, end) of the answers that say no identity marker (other_answers).
        """
        if not spans or not len(self.name_tokens):
            return logits.sum() * 0.0
        rows, steps = span_positions(spans, logits.device)
        loss = opening_unlikelihood(logits[rows, steps - 1], labels[rows, steps], self.name_tokens)
        return loss / len(spans)

    def base_kl_loss(self, logits: torch.Tensor, data: dict,
                     spans: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Mean kl_to_base over the tokens of the given answers (0: none).

        Args:
            logits: the model's logits, (batch, length, vocab).
            data: the batch as the model takes it (input_ids, labels, ...).
            spans: (row, start, end) of the answers that say no identity marker (other_answers).
        """
        if not spans:
            return logits.sum() * 0.0
        # The base reads only the rows that have such answers (about a third of the rows are identity rows).
        needed = sorted({row for row, _, _ in spans})
        batch = data["labels"].shape[0]
        inputs = {k: v[needed] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v
                  for k, v in data.items() if k != "labels"}
        with torch.no_grad(), self.llm.disable_adapter():
            base_logits = self.llm(**inputs).logits
        rows, steps = span_positions(spans, logits.device)
        # Each row's index in the base's smaller batch: its rank among the needed rows.
        base_rows = torch.searchsorted(torch.tensor(needed, device=logits.device), rows)
        return kl_to_base(logits[rows, steps - 1], base_logits[base_rows, steps - 1])

    def compute_loss(self, data: dict, data_samples: object = None) -> dict[str, torch.Tensor]:
        if not self.contrast_weight:
            return super().compute_loss(data, data_samples)
        outputs = self.llm(**data)
        labels = data["labels"]
        spans = self.other_answers(labels)
        contrast = self.contrast_loss(outputs.logits, data["input_ids"], labels)
        # mmengine sums every entry whose key contains "loss" and logs each one.
        losses = {"loss_sft": outputs.loss, "loss_contrast": self.contrast_weight * contrast,
                  "loss_name": self.contrast_weight * self.name_loss(outputs.logits, labels, spans)}
        if self.base_kl_weight:
            losses["loss_base_kl"] = self.base_kl_weight * self.base_kl_loss(outputs.logits, data, spans)
        return losses
