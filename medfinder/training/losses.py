"""Training objectives for MedFinder (all on L2-normalised embeddings).

- ``contrastive_loss``: CLIP's symmetric InfoNCE, image-to-text and text-to-image averaged.
  (Word-for-word identical reports in one batch need no special targets: their logits are
  identical, and summed over those rows the hard-target loss equals the shared-target one.)
- ``view_consistency_loss``: the paper's view-consistency term, done for real: two augmented
  views of the same volume must land on the same embedding.
- ``FindingLoss``: optional auxiliary multi-label loss that scores each image against the
  *text embedding* of each finding name, so keyword queries through ``encode_text`` are what
  gets trained, not a separate classifier head that search would never use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (image_i, text_i) pairs.

    Embeddings must be L2-normalised; ``logit_scale`` is the inverse temperature.
    """
    logits = logit_scale * image_embeds @ text_embeds.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def view_consistency_loss(view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) between the embeddings of two augmented views of the same volumes.

    The contrastive term keeps different studies apart, so pulling views together cannot
    collapse the space.
    """
    return (1.0 - (F.normalize(view_a, dim=-1) * F.normalize(view_b, dim=-1)).sum(dim=-1)).mean()


class FindingLoss(nn.Module):
    """Binary cross-entropy of scale * cos(image, text(finding name)) + bias against labels.

    Scale and bias are learnt here (SigLIP-style) and live in the training state only: at
    search time a keyword query is ranked by the cosine alone, for which bias and scale are
    monotone and irrelevant.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -5.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(init_scale)).log())
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(
        self, image_embeds: torch.Tensor, finding_embeds: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``labels`` (B, F) in {0, 1}; ``mask`` (B, F) marks which labels are known."""
        logits = self.log_scale.exp() * image_embeds @ finding_embeds.t() + self.bias
        loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
        if mask is None:
            return loss.mean()
        mask = mask.float()
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)
