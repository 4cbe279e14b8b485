"""Target kinds: how a set stores each row's soft targets, one codec per kind.

| kind | codec | stores |
|---|---|---|
| dense | `Dense` | every logit, and the probabilities at each stored T |
| topk | `TopK` | the k largest logits and each T's log-sum-exp |
| sample | `Sampled` | k classes drawn from p_T at each stored T |
| hybrid | `Hybrid` | a nucleus head plus an importance-sampled tail |

`Layout.target` is the set's codec, chosen once from its metadata; every stage goes through
its interface (`base.TargetKind`) and never asks which kind a set is.
"""

from softlabels.format.targets.base import TargetKind, TeacherOutputs, Uniforms, refuse_unstored
from softlabels.format.targets.dense import Dense
from softlabels.format.targets.hybrid import QUANTIZE_CHOICES, Hybrid
from softlabels.format.targets.sampled import Sampled
from softlabels.format.targets.topk import TopK

__all__ = ["QUANTIZE_CHOICES", "Dense", "Hybrid", "Sampled", "TargetKind", "TeacherOutputs",
           "TopK", "Uniforms", "refuse_unstored"]
