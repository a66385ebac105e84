"""The Lightning callbacks: ``PretrainingSnapshot`` for the pretraining ``Trainer``, ``MultiStageInfluence`` for
the finetuning one."""
from .finetune import MultiStageInfluence, load_pretrained
from .pretrain import PretrainingSnapshot

__all__ = ["MultiStageInfluence", "PretrainingSnapshot", "load_pretrained"]
