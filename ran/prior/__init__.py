"""The attention prior: a frozen self-supervised ViT's [CLS] attention, one map per record,
for the ``vitmask`` network (:mod:`ran.models.vitmask`)."""

from ran.prior.stage import load_prior, make_prior, tracked_prior

__all__ = ["load_prior", "make_prior", "tracked_prior"]
