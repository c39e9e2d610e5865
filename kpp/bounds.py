"""The test bounds an evaluation reports (kpp/evaluate.py), by name, without torch: what a config may name as the
one that selects a model. Named for what the memory that scores x_t holds."""

BOUNDS = {"chain_neg_elbo": "chain -ELBO (x_t from a memory of the images before it)",
          "chain_iwae": "chain IWAE bound",
          "loo_neg_elbo": "leave-one-out -ELBO (x_t from a memory of the other images)",
          "loo_iwae": "leave-one-out IWAE bound",
          "neg_elbo": "memory-conditional -ELBO (x_t in its own memory; the paper's quantity)",
          "iwae": "memory-conditional IWAE bound"}
# A proper bound on -ln p(X) / T: a memory lowers it only by predicting the images it has not seen. The
# memory-conditional one is lowered by a memory that copies each image to its own prior.
SELECTING = "chain_neg_elbo"
