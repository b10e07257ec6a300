# The identity contrast of the SFT configs (training/configs/*_sft*.py: identity_answers, contrast_weight):
# XTuner's SFT loss plus a term that pushes down the ways an identity answer begins, at the start of every
# answer to a question not put to the assistant. Built by XTuner from a config; not run on its own.
# Why: a small model learns its identity from words that the identity questions share with other requests
# (称呼, 名字, 帮我), and then answers "给我的小猫想个可爱的称呼" with "我是…". Cross-entropy on the replay
# rows pins only their own first token; this term lowers the identity's openings there directly (README,
# runs U1-U3). Questions put to the assistant ("你…", "…you…") are left out: there "我是…" is the right
# start, and lowering it there too cost 10 of 24 Chinese identity answers (run U1).
"""Unlikelihood of the identity answers' first tokens at the start of answers to other questions."""

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


class IdentityContrastFinetune(SupervisedFinetune):
    """XTuner's SupervisedFinetune whose loss adds `contrast_weight` times the mean opening_unlikelihood over
    the answers to questions that are not put to the assistant.

    Args:
        identity_answers: the identity answers of the training data; their first tokens are the openings.
        contrast_weight: weight of the term; 0 (or no identity answers) gives plain SupervisedFinetune.
        contrast_tokenizer: the config's tokenizer (a config dict or a tokenizer): finds the openings and
            reads the questions. Not SupervisedFinetune's `tokenizer`, which would also resize the embeddings.
        prompt_template: the config's XTuner prompt template; its INSTRUCTION ("...{input}...") shows where
            the question is in a sample's text.
        *args, **kwargs: as SupervisedFinetune (llm, lora, ...).
    """

    def __init__(self, *args, identity_answers: Sequence[str] = (), contrast_weight: float = 0.0,
                 contrast_tokenizer: object = None, prompt_template: Mapping[str, str] | None = None,
                 **kwargs) -> None:
        if not contrast_weight >= 0:
            raise ValueError(f"contrast_weight must be 0 or more, got {contrast_weight}")
        instruction = (prompt_template or {}).get("INSTRUCTION", "{input}")
        if "{input}" not in instruction:
            raise ValueError(f"the prompt template's INSTRUCTION has no {{input}}: {instruction!r}")
        super().__init__(*args, **kwargs)
        self.contrast_weight = contrast_weight if identity_answers else 0.0
        self.tokenizer = (BUILDER.build(contrast_tokenizer) if isinstance(contrast_tokenizer, dict)
                          else contrast_tokenizer)
        prefix, _, suffix = instruction.partition("{input}")
        self.question_prefix, self.question_suffix = loose(prefix.strip()), loose((suffix.split() or [""])[0])
        openings = []
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
        # Not saved with the adapter: a buffer only so that it moves to the model's device.
        self.register_buffer("openings", torch.tensor(openings, dtype=torch.long), persistent=False)

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

    def compute_loss(self, data: dict, data_samples: object = None) -> dict[str, torch.Tensor]:
        if not self.contrast_weight:
            return super().compute_loss(data, data_samples)
        outputs = self.llm(**data)
        contrast = self.contrast_loss(outputs.logits, data["input_ids"], data["labels"])
        # mmengine sums every entry whose key contains "loss" and logs each one.
        return {"loss_sft": outputs.loss, "loss_contrast": self.contrast_weight * contrast}
