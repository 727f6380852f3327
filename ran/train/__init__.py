"""Training: the loop (:mod:`.loop`), its data order and augmentation (:mod:`.data`,
:mod:`.augment`), the recipe (:mod:`.recipe`), checkpoints (:mod:`.checkpoint`), DDP
(:mod:`.distributed`) and the stage that ties them to MLflow (:mod:`.stage`).

Nothing is imported here, so that importing one part does not load the rest."""
