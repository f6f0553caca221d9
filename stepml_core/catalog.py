"""Model and GPU catalogue (data/catalog/*.json) as frozen spec objects.

Per-GPU constants follow docs/features.md §1 with TP degree t:
  A = 2 d² + 2 d d_kv           attention projection params per layer (d_kv = H_kv d_h)
  M = 3 d d_ff                   SwiGLU params per expert per layer
  R = d E                        router params per layer (MoE only)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from stepml_core.errors import StepMLError
from stepml_core.paths import CATALOG_DIR

BYTES_PER_PARAM = 2  # bf16 / fp16 weights
BYTES_PER_KV_ELEMENT = 2  # bf16 / fp16 KV cache


class UnknownModelError(StepMLError, KeyError):
    """A run names a model that is not in data/catalog/models.json."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    num_experts: int
    experts_per_token: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def attn_params_per_layer(self) -> int:
        """A = 2d² + 2 d d_kv."""
        d = self.hidden_size
        return 2 * d * d + 2 * d * self.num_kv_heads * self.head_dim

    @property
    def mlp_params_per_expert_per_layer(self) -> int:
        """M = 3 d d_ff (gate, up, down)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def router_params_per_layer(self) -> int:
        """R = d E for MoE, 0 for dense."""
        return self.hidden_size * self.num_experts if self.is_moe else 0

    @property
    def active_param_ratio(self) -> float:
        """Per-layer active/total params: (A + kM + R) / (A + EM + R); 1 for dense."""
        a, m, r = self.attn_params_per_layer, self.mlp_params_per_expert_per_layer, self.router_params_per_layer
        return (a + self.experts_per_token * m + r) / (a + self.num_experts * m + r)

    @property
    def total_params(self) -> int:
        """All weights incl. input embedding and LM head (2 V d)."""
        per_layer = (
            self.attn_params_per_layer
            + self.num_experts * self.mlp_params_per_expert_per_layer
            + self.router_params_per_layer
        )
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_flops: float  # FLOP/s, dense bf16
    hbm_bandwidth_bytes_per_s: float
    hbm_capacity_bytes: float
    nvlink_bandwidth_bytes_per_s: float

    @property
    def balance_flops_per_byte(self) -> float:
        """Nominal machine balance Π/β (295.4 FLOP/B for the H100 SXM)."""
        return self.peak_flops / self.hbm_bandwidth_bytes_per_s


@lru_cache(maxsize=None)
def _models_doc() -> dict:
    return json.loads((CATALOG_DIR / "models.json").read_text())["models"]


def known_model_names() -> list[str]:
    return sorted(_models_doc())


def canonical_model_name(slug: str) -> str:
    """Map a run-id model slug (e.g. 'llama-2-70b-hf') to its catalogue key."""
    s = slug.lower()
    for name, m in _models_doc().items():
        if s == name or s in m.get("aliases", []):
            return name
    raise UnknownModelError(
        f"model '{slug}' is not in the catalogue (data/catalog/models.json; known: "
        f"{', '.join(known_model_names())}). Add an entry with the fields of its Hugging Face "
        "config.json: num_layers, hidden_size, num_attention_heads, num_kv_heads, "
        "intermediate_size, num_experts, experts_per_token, vocab_size (and an alias for this slug)."
    )


@lru_cache(maxsize=None)
def model_spec(slug: str) -> ModelSpec:
    name = canonical_model_name(slug)
    m = _models_doc()[name]
    return ModelSpec(
        name=name,
        hf_id=m["hf_id"],
        num_layers=m["num_layers"],
        hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"],
        num_kv_heads=m["num_kv_heads"],
        intermediate_size=m["intermediate_size"],
        num_experts=m["num_experts"],
        experts_per_token=m["experts_per_token"],
        vocab_size=m["vocab_size"],
    )


@lru_cache(maxsize=None)
def gpu_spec(name: str = "h100-sxm") -> GpuSpec:
    g = json.loads((CATALOG_DIR / "gpus.json").read_text())["gpus"][name]
    return GpuSpec(
        name=g["name"],
        peak_flops=g["peak_dense_bf16_tflops"] * 1e12,
        hbm_bandwidth_bytes_per_s=g["hbm_bandwidth_tbs"] * 1e12,
        hbm_capacity_bytes=g["hbm_capacity_gb"] * 1e9,
        nvlink_bandwidth_bytes_per_s=g["nvlink_bandwidth_gbs"] * 1e9,
    )
