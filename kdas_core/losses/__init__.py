from .base import Distiller, available, build_distillers, parse_kd_spec, register
from .methods.kdas import attention_kl, kdas_terms, self_attention_map, sgm_loss
from .structure import structure_loss

__all__ = ["Distiller", "attention_kl", "available", "build_distillers", "kdas_terms", "parse_kd_spec",
           "register", "self_attention_map", "sgm_loss", "structure_loss"]
