"""sentence-transformers losses: token-level OT distillation (OPTICAL) and teacher KD baselines.

Drop-in for the make_multilingual recipe (Reimers & Gurevych 2020): where it trains with
``MSELoss(student)`` on ``(english, non_english)`` columns and precomputed teacher labels, use
``OPTICALLoss(student, teacher)`` on a dataset whose **first column is the foreign sentence and
second column the English sentence**; no label column is needed, the frozen teacher runs inside
the loss::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from optical_kernels.integrations.sentence_transformers import OPTICALLoss

    teacher = SentenceTransformer(teacher_path)          # frozen by the loss
    student = SentenceTransformer(student_path)
    loss = OPTICALLoss(student, teacher, eps=0.05, kd_weight=0.0)
    SentenceTransformerTrainer(model=student, train_dataset=ds, loss=loss).train()

The teacher may have another tokenizer than the student. The trainer's collator tokenizes
every column with the *student's* tokenizer; when the two vocabularies are identical the
English token ids are fed to the teacher as they are, otherwise the English column is decoded
back to text (``skip_special_tokens=True``) and re-tokenized by the teacher (the text the
teacher sees is the student tokenizer's round trip, truncated at the student's
``max_seq_length``; for WordPiece and SentencePiece tokenizers that is the original text up
to whitespace normalisation).

Special tokens ([CLS]/[SEP]/<s>/</s>), padding and prompt tokens (``prompt_length``, set by the
trainer's ``prompts``) carry no transport mass: :func:`content_mask`.

Importing :mod:`optical_kernels` does not import this module (nor sentence-transformers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    EmbedDistillLoss,
    MultipleNegativesRankingLoss,
)
from torch import Tensor, nn

import optical_kernels

KD_KINDS = ("mse", "cosine", "contrastive")
MAXSIM_TEMPERATURE = 0.05


def content_mask(features: dict[str, Any], tokenizer: Any) -> Tensor:
    """[B, L] bool: the attended tokens that are neither special tokens nor the prompt.

    Args:
        features: a tokenized batch (``input_ids``, ``attention_mask``, optionally
            ``prompt_length``: the leading prompt tokens, as sentence-transformers counts them).
        tokenizer: the tokenizer that produced ``input_ids`` (its ``all_special_ids``).
    """
    ids = features["input_ids"]
    mask = features["attention_mask"].bool()
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=ids.device)
    mask = mask & ~torch.isin(ids, special)
    pl = features.get("prompt_length")
    if pl is not None:
        k = int(pl[0].item()) if isinstance(pl, Tensor) and pl.dim() else int(pl)
        mask[:, :k] = False
    return mask


def _same_vocabulary(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a.get_vocab() == b.get_vocab() and (
        getattr(a, "do_lower_case", None) == getattr(b, "do_lower_case", None))


class _TeacherLoss(nn.Module):
    """Shared machinery: the frozen teacher encoding the English column inside the loss.

    Args:
        model: the student ``SentenceTransformer`` (trained).
        teacher: the teacher ``SentenceTransformer`` (frozen here: eval mode, no gradients).
    """

    def __init__(self, model: SentenceTransformer, teacher: SentenceTransformer):
        super().__init__()
        if not isinstance(teacher, SentenceTransformer):
            raise TypeError(f"teacher must be a SentenceTransformer, got {type(teacher).__name__}")
        self.model = model
        # Kept out of the module tree (a tuple attribute): the teacher's weights are neither
        # trained, nor saved with the loss, nor wrapped by DDP.
        self._teacher = (teacher.eval().requires_grad_(False),)
        # The trainer may swap ``self.model`` for its DDP/compiled wrapper: keep the tokenizer.
        self.tokenizer = model.tokenizer
        self._reuse_ids = _same_vocabulary(model.tokenizer, teacher.tokenizer)

    @property
    def teacher(self) -> SentenceTransformer:
        """The frozen teacher."""
        return self._teacher[0]

    def _columns(self, sentence_features: Iterable[dict[str, Tensor]]) -> tuple[dict, dict]:
        feats = list(sentence_features)
        if len(feats) != 2:
            raise ValueError(
                f"{type(self).__name__} expects 2 text columns (foreign, english), got "
                f"{len(feats)}: give the dataset exactly the foreign and the English column"
            )
        return feats[0], feats[1]

    def teacher_features(self, english: dict[str, Tensor]) -> dict[str, Tensor]:
        """The English column as the teacher's tokenized input (see the module docstring)."""
        teacher = self.teacher
        device = english["input_ids"].device
        if self._reuse_ids:
            keep = ("input_ids", "attention_mask", "token_type_ids")
            return {k: v for k, v in english.items() if k in keep}
        texts = self.tokenizer.batch_decode(english["input_ids"], skip_special_tokens=True)
        feats = teacher.preprocess(texts)
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in feats.items()}

    @torch.no_grad()
    def teacher_output(self, english: dict[str, Tensor]) -> dict[str, Tensor]:
        """Teacher forward (no grad) on the English column: ``token_embeddings``,
        ``sentence_embedding``, ``attention_mask``, ``content_mask``."""
        feats = self.teacher_features(english)
        teacher = self.teacher.to(english["input_ids"].device)
        out = teacher(dict(feats))
        out["content_mask"] = content_mask(feats, teacher.tokenizer)
        return out


class OPTICALLoss(_TeacherLoss):
    """Token-level OT distillation loss (OPTICAL, Huang et al. 2023), optionally + MSE KD.

    ``L = mean_k <P*_k, C_k>`` between the student's content tokens of foreign sentence ``k``
    and the frozen teacher's content tokens of English sentence ``k``
    (:func:`optical_kernels.sinkhorn_loss`), plus ``kd_weight · MSE(student sentence embedding,
    teacher sentence embedding)`` when ``kd_weight > 0`` (OT+KD).

    Args:
        model: the student ``SentenceTransformer``.
        teacher: the teacher ``SentenceTransformer`` (frozen; may use another tokenizer).
        cost, eps, objective, grad, rho, max_iter, tol, check_every, eps_schedule, backend,
        cg_max_iter, cg_tol:
            passed unchanged to :func:`optical_kernels.sinkhorn_loss` (every OT option).
        kd_weight: weight of the sentence-level MSE term (0: pure OT).

    Dataset: two text columns, (foreign, english); labels are ignored.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        teacher: SentenceTransformer,
        *,
        cost: str = "cosine",
        eps: float = 0.05,
        objective: str = "linear",
        grad: str = "auto",
        rho: float | None = None,
        max_iter: int = 100,
        tol: float = 1e-4,
        check_every: int = 10,
        eps_schedule: tuple[float, float] | None = None,
        backend: str = "auto",
        cg_max_iter: int | None = None,
        cg_tol: float | None = None,
        kd_weight: float = 0.0,
    ):
        super().__init__(model, teacher)
        if not (isinstance(kd_weight, int | float) and kd_weight >= 0):
            raise ValueError(f"kd_weight must be a number >= 0, got {kd_weight!r}")
        s_dim, t_dim = model.get_embedding_dimension(), teacher.get_embedding_dimension()
        if s_dim != t_dim:
            raise ValueError(
                f"model embeddings have {s_dim} features but the teacher's have {t_dim}: "
                "token-level OT needs the same width (pick a student of the teacher's width)"
            )
        self.ot_kwargs = {
            "cost": cost, "eps": eps, "objective": objective, "grad": grad, "rho": rho,
            "max_iter": max_iter, "tol": tol, "check_every": check_every,
            "eps_schedule": tuple(eps_schedule) if eps_schedule is not None else None,
            "backend": backend, "cg_max_iter": cg_max_iter, "cg_tol": cg_tol,
        }
        self.kd_weight = float(kd_weight)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]],
                labels: Tensor | None = None) -> Tensor:
        """Scalar loss of one batch (the mean over its sentence pairs)."""
        foreign, english = self._columns(sentence_features)
        t = self.teacher_output(english)
        s = self.model(foreign)
        x_mask = content_mask(foreign, self.tokenizer)
        x = s["token_embeddings"]
        # The encoders may run under the trainer's bf16 autocast; the Sinkhorn solve runs in
        # float32 on both sides, outside autocast (its GEMMs must not drop to bf16).
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss = optical_kernels.sinkhorn_loss(
                x.float(), t["token_embeddings"].float(), x_mask=x_mask,
                y_mask=t["content_mask"], reduction="mean", **self.ot_kwargs,
            )
        if self.kd_weight > 0:
            kd = F.mse_loss(s["sentence_embedding"].float(), t["sentence_embedding"].float())
            loss = loss + self.kd_weight * kd
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        """The loss options (written into the model card by sentence-transformers)."""
        return {**self.ot_kwargs, "kd_weight": self.kd_weight}

    @property
    def citation(self) -> str:
        return (
            "@inproceedings{huang2023optical,\n  title={Improving Cross-lingual Information "
            "Retrieval on Low-Resource Languages via Optimal Transport Distillation},\n"
            "  author={Huang, Zhiqi and Yu, Puxuan and Allan, James},\n  booktitle={WSDM},\n"
            "  year={2023}\n}"
        )


class TeacherKDLoss(_TeacherLoss):
    """Sentence-level KD baselines against a teacher running inside the loss.

    The student's embedding of the foreign sentence is pulled towards the teacher's embedding
    of the English sentence. The distances are sentence-transformers' own code:

    * ``"mse"``: ``MSELoss`` / ``EmbedDistillLoss(distance_metric="mse")`` (make_multilingual);
    * ``"cosine"``: ``EmbedDistillLoss(distance_metric="cosine")``, ``1 − cos``;
    * ``"contrastive"``: ``MultipleNegativesRankingLoss`` (InfoNCE, ``scale`` = 1/temperature)
      with the student's foreign sentences as queries and the teacher's English sentences of
      the batch as documents (in-batch negatives).

    Only the teacher step is ours: sentence-transformers expects precomputed teacher labels
    (``dataset.map(teacher.encode)``), which costs a teacher pass over the whole training set
    before step 1; here the teacher encodes only the batches that are trained on.

    Args:
        model: the student ``SentenceTransformer``.
        teacher: the teacher ``SentenceTransformer`` (frozen).
        kind: one of :data:`KD_KINDS`.
        scale: InfoNCE logit scale of ``"contrastive"`` (sentence-transformers' default 20).
    """

    def __init__(self, model: SentenceTransformer, teacher: SentenceTransformer,
                 kind: str = "mse", *, scale: float = 20.0):
        super().__init__(model, teacher)
        if kind not in KD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(KD_KINDS)}, got {kind!r}")
        self.kind = kind
        self.scale = float(scale)
        # Delegates hold the student only to satisfy their constructors (no parameters).
        if kind == "contrastive":
            self._delegate = (MultipleNegativesRankingLoss(model, scale=scale),)
        else:
            self._delegate = (EmbedDistillLoss(model, distance_metric=kind),)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]],
                labels: Tensor | None = None) -> Tensor:
        """Scalar loss of one batch."""
        foreign, english = self._columns(sentence_features)
        t = self.teacher_output(english)["sentence_embedding"].float()
        s = self.model(foreign)["sentence_embedding"].float()
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"model embeddings have {s.shape[-1]} features but the teacher's "
                             f"have {t.shape[-1]}")
        delegate = self._delegate[0]
        if self.kind == "contrastive":
            return delegate.compute_loss_from_embeddings([s, t], labels)
        return delegate.compute_loss_from_embeddings([s], [t])

    def get_config_dict(self) -> dict[str, Any]:
        """The loss options."""
        return {"kind": self.kind, **({"scale": self.scale} if self.kind == "contrastive" else {})}


class SoftMaxSimLoss(_TeacherLoss):
    """Token-level non-OT control: a BERTScore-style soft max-similarity loss.

    Each content token of the student's foreign sentence is matched to the teacher's English
    content tokens by a softmax over cosine similarities (temperature ``temperature``; as it
    goes to 0 this is BERTScore's greedy max-similarity matching), and vice versa:

    ``P = mean_i sum_j softmax_j(S_ij / t) S_ij``, ``R = mean_j sum_i softmax_i(S_ij / t) S_ij``,
    ``L = 1 - (P + R) / 2`` per sentence pair, averaged over the batch,

    with ``S`` the cosine matrix of the student's and the teacher's token embeddings. It uses
    the same token states and the same content mask (special, padding and prompt tokens
    excluded, :func:`content_mask`) as ``OPTICALLoss`` but no transport plan (no marginal
    constraints): the difference between the two isolates what the *transport* adds. (No
    library ships it as a training loss — bert-score computes the metric without gradients —
    so it is written here.)

    Args:
        model: the student ``SentenceTransformer``.
        teacher: the teacher ``SentenceTransformer`` (frozen; may use another tokenizer).
        temperature: softmax temperature > 0, in cosine units.
    """

    def __init__(self, model: SentenceTransformer, teacher: SentenceTransformer, *,
                 temperature: float = MAXSIM_TEMPERATURE):
        super().__init__(model, teacher)
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        s_dim, t_dim = model.get_embedding_dimension(), teacher.get_embedding_dimension()
        if s_dim != t_dim:
            raise ValueError(f"model embeddings have {s_dim} features but the teacher's have "
                             f"{t_dim}: token similarity needs the same width")
        self.temperature = float(temperature)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]],
                labels: Tensor | None = None) -> Tensor:
        """Scalar loss of one batch (mean over its sentence pairs; a pair without content
        tokens on either side contributes 0)."""
        foreign, english = self._columns(sentence_features)
        t = self.teacher_output(english)
        s = self.model(foreign)
        xm = content_mask(foreign, self.tokenizer)
        ym = t["content_mask"].to(xm.device)
        with torch.autocast(device_type=xm.device.type, enabled=False):
            x = F.normalize(s["token_embeddings"].float(), dim=-1)
            y = F.normalize(t["token_embeddings"].float(), dim=-1)
            sim = torch.einsum("bid,bjd->bij", x, y)
            pair = xm[:, :, None] & ym[:, None, :]
            logits = (sim / self.temperature).masked_fill(~pair, float("-inf"))
            # rows/columns without any valid partner: softmax of all -inf is NaN; zero them
            w_p = torch.nan_to_num(torch.softmax(logits, dim=2), nan=0.0)
            w_r = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)
            s_masked = sim.masked_fill(~pair, 0.0)
            nx = xm.sum(1).clamp(min=1)
            ny = ym.sum(1).clamp(min=1)
            prec = ((w_p * s_masked).sum(2) * xm).sum(1) / nx
            rec = ((w_r * s_masked).sum(1) * ym).sum(1) / ny
            valid = (xm.any(1) & ym.any(1)).float()
            loss = (1.0 - 0.5 * (prec + rec)) * valid
        return loss.mean()

    def get_config_dict(self) -> dict[str, Any]:
        """The loss options."""
        return {"temperature": self.temperature}
