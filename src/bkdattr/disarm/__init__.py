"""Disarm a found backdoor: a defended model you can ship (``heads``, ``vector``) or a probe-gated runtime guard
(``guard``), each with its clean utility measured the same way (:mod:`bkdattr.disarm.utility`)."""
