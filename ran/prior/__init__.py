"""The attention prior: a frozen self-supervised ViT's [CLS] attention, one map per record,
for the ``vitmask`` network (:mod:`ran.models.vitmask`): the ViT (:mod:`.vit`), the stage
that computes the maps (:mod:`.stage`) and how the other stages read them (:mod:`.maps`)."""
