"""Training: the loop (:mod:`.loop`), its data order and augmentation (:mod:`.data`,
:mod:`.augment`), checkpoints (:mod:`.checkpoint`), DDP (:mod:`.distributed`) and the stage
that ties them to MLflow (:mod:`.stage`)."""

from ran.train.stage import train_model

__all__ = ["train_model"]
