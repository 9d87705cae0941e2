"""kdbench: knowledge-distillation benchmark and ablation suite for land-use scene classification."""

__version__ = "0.1.0"
