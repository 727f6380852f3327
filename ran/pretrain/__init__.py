"""Self-supervised pretraining of the prior's ViT (DINO, with lightly's parts): the networks
and schedules (:mod:`.dino`), the multi-crop views (:mod:`.views`), the k-NN measure of the
features (:mod:`.knn`) and the tracked, resumable stage (:mod:`.stage`)."""
