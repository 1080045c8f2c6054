"""Model configuration and the preset table.

The real presets copy the architecture numbers from each model's published ``config.json`` on the
Hugging Face hub (``Qwen/Qwen2.5-0.5B``, ``Qwen/Qwen3-0.6B``, ``Qwen/Qwen3-1.7B``, ``Qwen/Qwen3-8B``,
as released with transformers 4.40/4.51). Only the fields that change the computation are kept; the
published parameter count of each model is stored next to it so a test can check the shapes add up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FAMILIES = ("qwen3", "qwen2")


@dataclass(frozen=True)
class QwenConfig:
    """Architecture of one Qwen decoder.

    ``family`` selects the two differences between the generations this project covers:
    Qwen3 normalises q and k per head (``q_norm``/``k_norm``) and has no projection bias;
    Qwen2/Qwen2.5 has a bias on the q, k and v projections and no q/k norm.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    # Published total parameter count (for presets), used only for a sanity test.
    published_params: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"QwenConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> "QwenConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict:
        """The transformers ``config.json`` fields that describe this architecture."""
        model_type = "qwen3" if self.family == "qwen3" else "qwen2"
        d = {
            "model_type": model_type,
            "architectures": ["Qwen3ForCausalLM" if model_type == "qwen3" else "Qwen2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
        }
        if model_type == "qwen3":
            d["attention_bias"] = False
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, *, where: str = "config.json") -> "QwenConfig":
        """Build a config from a transformers ``config.json`` dictionary (Qwen2/Qwen2.5/Qwen3).

        Every problem is a ``ValueError`` whose message starts with ``where`` and names the field.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object of config fields (as save_pretrained writes), "
                             f"got {type(d).__name__} {_short(d)}")
        model_type = d.get("model_type")
        if model_type not in ("qwen3", "qwen2"):
            raise ValueError(
                f"{where}: model_type {_short(model_type)} is not supported; detbench reads Qwen3 "
                f"('qwen3') and Qwen2/Qwen2.5 ('qwen2') checkpoints"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {_short(act)} is not supported (Qwen uses 'silu')")
        if model_type == "qwen3" and _flag(d, "attention_bias", False, where):
            raise ValueError(f"{where}: attention_bias=true is not supported for qwen3")
        rope = {}
        for key in ("rope_scaling", "rope_parameters"):
            value = d.get(key)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{where}: field {key!r} must be an object or null, got {_short(value)}")
            rope = rope or (value or {})
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"{where}: rope_type {_short(rope_type)} is not supported (only 'default')")
        if _flag(d, "use_sliding_window", False, where):
            raise ValueError(f"{where}: use_sliding_window=true is not supported")
        heads = _positive_int(d, "num_attention_heads", where)
        hidden = _positive_int(d, "hidden_size", where)
        fields = dict(
            family=model_type,
            vocab_size=_positive_int(d, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_positive_int(d, "intermediate_size", where),
            num_hidden_layers=_positive_int(d, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=_positive_int(d, "num_key_value_heads", where, default=heads),
            head_dim=_positive_int(d, "head_dim", where, default=hidden // heads),
            rms_norm_eps=_positive_number(d.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
            rope_theta=_positive_number(rope_theta, "rope_theta", where),
            max_position_embeddings=_positive_int(d, "max_position_embeddings", where, default=32768),
            tie_word_embeddings=_flag(d, "tie_word_embeddings", False, where),
            source=where,
        )
        try:
            return cls(**fields)
        except ValueError as e:  # an invalid combination (heads vs kv heads, odd head_dim)
            raise ValueError(f"{where}: {e}") from None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_REQUIRED = object()


def _positive_int(d: dict, key: str, where: str, default=_REQUIRED) -> int:
    """``d[key]`` as a positive int (an integral float such as 64.0 is accepted); null or absent means
    ``default``, and is an error when there is none."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            what = "is missing" if key not in d else "is null"
            raise ValueError(f"{where}: required field {key!r} {what}; it must be a positive integer")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: field {key!r} must be a positive integer, got {_short(value)}")
    return value


def _positive_number(value, key: str, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or value == float("inf"):
        raise ValueError(f"{where}: field {key!r} must be a positive number, got {_short(value)}")
    return float(value)


def _flag(d: dict, key: str, default: bool, where: str) -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} must be true or false, got {_short(value)}")
    return value


PRESETS: dict[str, QwenConfig] = {
    # Tiny presets: same structure (GQA with 2 query heads per kv head, q/k-norm or qkv bias,
    # tied embeddings), small enough for the Triton interpreter and CPU tests.
    "qwen3-tiny": QwenConfig(
        family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, source="detbench tiny test preset",
    ),
    "qwen2.5-tiny": QwenConfig(
        family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, source="detbench tiny test preset",
    ),
    "qwen2.5-0.5b": QwenConfig(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=True,
        published_params=0.49e9, source="Qwen/Qwen2.5-0.5B config.json (model card: 0.49B)",
    ),
    "qwen3-0.6b": QwenConfig(
        family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=True,
        published_params=0.6e9, source="Qwen/Qwen3-0.6B config.json (model card: 0.6B)",
    ),
    "qwen3-1.7b": QwenConfig(
        family="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=True,
        published_params=1.7e9, source="Qwen/Qwen3-1.7B config.json (model card: 1.7B)",
    ),
    "qwen3-8b": QwenConfig(
        family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=False,
        published_params=8.2e9, source="Qwen/Qwen3-8B config.json (model card: 8.2B)",
    ),
}


def get_preset(name: str) -> QwenConfig:
    """Return the preset called ``name``; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
