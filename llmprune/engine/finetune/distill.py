"""Knowledge distillation for recovery fine-tuning: the student learns the teacher's logits.

The step loss is `w * T² * KL(teacher_T || student_T) + (1 - w) * LM loss`, where
`_T` means softmax at temperature T (Hinton et al.; the T² keeps the gradient scale
independent of T). Minitron (NVIDIA) found that a pruned model recovers with far
fewer tokens this way than with the LM loss alone: every position gives a whole
distribution to match, not one token.

The teacher runs in eval mode under `no_grad`, in bf16 on a GPU (fp32 on a CPU),
and is never wrapped by accelerate: it has no gradients or optimizer state to
shard or synchronise. With `top_k`, only the teacher's k most likely tokens per
position (and the mass of all the others) enter the loss, which is what one would
store to distil from saved logits; k = vocab gives the exact KL.

A NaN/Inf anywhere in the teacher's logits makes the KD part (hence the loss) NaN,
so the step guard refuses that very step; `LossParts.teacher_finite` also says so,
so that the alert can name the teacher rather than the student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmprune.engine.core.errors import UserInputError


@dataclass
class LossParts:
    """One forward pass's loss and its parts (tensors; `total` carries the graph)."""

    total: torch.Tensor
    lm: torch.Tensor
    kd: torch.Tensor | None = None
    teacher_finite: torch.Tensor | None = None  # bool scalar: every teacher logit was finite


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over positions; computed in fp32.

    `top_k`: the KL over the teacher's k most likely tokens plus one bucket for all
    the others (both models' remaining mass). That is what k logits and one number
    per position keep of the teacher; it is 0 when the student equals the teacher,
    never more than the full KL, and equal to it when k covers the vocabulary.
    """
    vocab = student_logits.shape[-1]
    student_log_probs = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    if top_k is not None and top_k < vocab:
        teacher_log_probs, index = teacher_log_probs.topk(top_k, dim=-1)
        student_log_probs = student_log_probs.gather(-1, index)
        teacher_log_probs = _with_rest_bucket(teacher_log_probs)
        student_log_probs = _with_rest_bucket(student_log_probs)
    teacher_probs = teacher_log_probs.exp()
    # a token the teacher gives no mass adds nothing (0 · log 0 = 0), not NaN
    terms = torch.where(teacher_probs > 0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0)
    terms = torch.where(torch.isnan(teacher_probs), teacher_probs, terms)  # a NaN teacher stays visible
    return terms.sum(-1).mean() * temperature**2


def _with_rest_bucket(top_log_probs: torch.Tensor) -> torch.Tensor:
    """Append log(1 - Σ top probabilities): the mass of every token outside the top k."""
    rest = (1.0 - top_log_probs.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
    return torch.cat([top_log_probs, rest.log()], dim=-1)


@dataclass
class Distiller:
    """The teacher and how its logits enter the loss."""

    teacher: torch.nn.Module
    temperature: float = 1.0
    weight: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    @torch.no_grad()
    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.teacher(input_ids=ids, use_cache=False).logits

    def loss(self, model: torch.nn.Module, ids: torch.Tensor) -> LossParts:
        """The student's forward pass on `ids` and the weighted sum of the KD and LM losses."""
        teacher_logits = self.teacher_logits(ids.to(next(self.teacher.parameters()).device))
        output = model(input_ids=ids, labels=ids, use_cache=False)
        kd = kd_loss(output.logits, teacher_logits.to(output.logits.device), self.temperature, self.top_k)
        total = self.weight * kd + (1.0 - self.weight) * output.loss
        return LossParts(total=total, lm=output.loss, kd=kd, teacher_finite=torch.isfinite(teacher_logits).all())


def lm_only_loss(model: torch.nn.Module, ids: torch.Tensor) -> LossParts:
    """The plain next-token loss (no teacher)."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return LossParts(total=loss, lm=loss)


def validate_kd_settings(temperature: float, weight: float, top_k: int | None) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserInputError(
            f"--kd-temperature must be a positive number, got {temperature}", "use e.g. --kd-temperature 1"
        )
    if not (0.0 <= weight <= 1.0):
        raise UserInputError(
            f"--kd-weight must be between 0 and 1, got {weight}", "use e.g. --kd-weight 0.5 (1: KD only)"
        )
    if top_k is not None and top_k < 1:
        raise UserInputError(
            f"--kd-top-k must be ≥ 1, got {top_k}", "leave it out for the full distribution, or use e.g. 64"
        )


def check_teacher_matches(student: torch.nn.Module, teacher: torch.nn.Module, teacher_spec: str) -> None:
    """Distillation compares logits position by position: the vocabularies must be the same."""
    student_vocab = _vocab_size(student)
    teacher_vocab = _vocab_size(teacher)
    if student_vocab != teacher_vocab:
        raise UserInputError(
            f"the teacher {teacher_spec} has a vocabulary of {teacher_vocab} tokens, the student {student_vocab}",
            "distil from the model this one was pruned from (same tokenizer)",
        )


def _vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def teacher_placement(device: torch.device) -> Any:
    """bf16 on a GPU (half the memory, and logits only feed a softmax), fp32 on a CPU."""
    from llmprune.engine.core.device import Placement

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return Placement(device=device, dtype=dtype)


def load_teacher(
    spec: str, device: torch.device, *, base_model: str | None = None, trust_pickle: bool = False
) -> torch.nn.Module:
    from llmprune.engine.io.models import load_model

    return load_model(spec, base_model=base_model, trust_pickle=trust_pickle, placement=teacher_placement(device)).model


@dataclass(frozen=True)
class TeacherFit:
    """Whether a teacher fits next to the student being trained, and the estimate behind the answer."""

    fits: bool
    needed_bytes: int
    available_bytes: int | None
    reason: str


# bytes per student parameter while training: fp32 weights, gradients and AdamW's two moments
# (full), or fp32 frozen weights plus adapters (LoRA); activations and logits get a 25 % margin
TRAINING_BYTES_PER_PARAMETER = {"full": 16, "lora": 4}
ACTIVATION_MARGIN = 1.25


def teacher_fits(
    teacher_parameters: int, student_parameters: int, device: torch.device, method: str = "full"
) -> TeacherFit:
    """Estimate the memory of distillation (teacher weights in the run dtype + the student's training state)."""
    from llmprune.engine.core.device import available_memory_bytes

    teacher_bytes = teacher_parameters * teacher_placement(device).dtype.itemsize
    student_bytes = student_parameters * TRAINING_BYTES_PER_PARAMETER.get(method, 16)
    needed = int((teacher_bytes + student_bytes) * ACTIVATION_MARGIN)
    available = available_memory_bytes(device)
    where = "GPU memory" if device.type == "cuda" else "RAM"
    if available is None:
        return TeacherFit(True, needed, None, f"needs about {needed / 2**30:.1f} GiB; free {where} unknown")
    fits = needed <= available
    verdict = "fits in" if fits else "does not fit in"
    return TeacherFit(
        fits,
        needed,
        available,
        f"teacher + student need about {needed / 2**30:.1f} GiB, which {verdict} the {available / 2**30:.1f} GiB of"
        f" free {where}",
    )
