"""Classifier distillation methods built from the functional layer, in one registry.

The loss functions are public under stable names; :func:`register_method` adds a method
that then trains in :func:`divergent.train.classifier.train_classifier` and in
``divergent compare`` rows. Formulas, defaults and sources: ``docs/methods.md``.
"""

from divergent.methods.dkd import dkd_loss
from divergent.methods.kd import abkd_loss, divergence_kd_loss, hinton_kd_loss, sinkd_loss
from divergent.methods.mcmi import class_centroids, mcmi_teacher_loss
from divergent.methods.nd import nd_loss, teacher_class_centers
from divergent.methods.nkd import nkd_loss
from divergent.methods.ofa import ofa_loss
from divergent.methods.online import bdkd_online_losses, dml_losses
from divergent.methods.registry import (
    MethodSpec,
    available_methods,
    get_method,
    method_kind,
    register_method,
    resolve_method_params,
    unregister_method,
)
from divergent.methods.self_kd import pskd_alpha, pskd_loss, uskd_loss, uskd_rank_scores, zipf_non_target_labels

__all__ = [
    "hinton_kd_loss",
    "dkd_loss",
    "nkd_loss",
    "uskd_loss",
    "uskd_rank_scores",
    "zipf_non_target_labels",
    "pskd_loss",
    "pskd_alpha",
    "nd_loss",
    "teacher_class_centers",
    "ofa_loss",
    "mcmi_teacher_loss",
    "class_centroids",
    "dml_losses",
    "bdkd_online_losses",
    "abkd_loss",
    "sinkd_loss",
    "divergence_kd_loss",
    "MethodSpec",
    "register_method",
    "unregister_method",
    "get_method",
    "available_methods",
    "method_kind",
    "resolve_method_params",
]
